"""Scorers shared by pairing and evaluation, so the two cannot drift.

A judge maps candidates (with their queries) to scores in [0, 1]:
    score(candidates, queries_by_id) -> list[Scored]
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.metrics import exact_match
from models.records import Candidate, Query, Scored


def extract_answer(response: str, marker: str | None) -> str:
    """The text after the last ``marker`` (e.g. "### Answer:"), or the whole response."""
    if marker and marker in response:
        return response.rsplit(marker, 1)[1].strip()
    return response.strip()


@dataclass
class CorrectnessJudge:
    """1.0 when the (extracted) answer matches the ground truth after normalisation, else 0.0."""

    answer_marker: str | None = None

    needs_model = False

    def score_one(self, response: str, answer: str) -> float:
        return float(exact_match(extract_answer(response, self.answer_marker), answer))

    def score(self, candidates: list[Candidate], queries: dict[str, Query]) -> list[Scored]:
        scored = []
        for cand in candidates:
            answer = queries[cand["query_id"]]["answer"]
            if answer is None:
                raise ValueError(
                    f"query {cand['query_id']} has no ground-truth answer; judge=correctness needs "
                    "answers (map an answer column in data=..., or choose a model-based judge)"
                )
            value = self.score_one(cand["response"], answer)
            scored.append(Scored(**cand, score=value, score_parts={"correct": value}))
        return scored
