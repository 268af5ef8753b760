"""LLaVA-Reasoner-DPO correctness pairs (seeds/llava-reasoner-dpo.txt, sec. 3).

For each query: sample k candidates at temperature T, judge each against the ground truth.
Keep the query only if its sample accuracy lies in the band [0.25, 0.85] (too easy or too hard
queries give uninformative pairs); build up to 3 (correct, incorrect) pairs from distinct
responses; truncate responses to 90 words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from models.records import (
    Candidate,
    Pair,
    Query,
    Scored,
    assistant_message,
    group_by_query,
    user_prompt,
)
from models.sampling import Policy


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


@dataclass
class Reasoner:
    num_samples: int = 8
    temperature: float = 1.0
    accuracy_band: list[float] = field(default_factory=lambda: [0.25, 0.85])
    max_pairs_per_query: int = 3
    max_words: int = 90
    max_new_tokens: int = 8

    def generate(self, policy: Policy, queries: list[Query], seed: int) -> list[Candidate]:
        prompts = [user_prompt(q["question"]) for q in queries]
        samples = policy.generate(
            prompts, [[q["image"]] for q in queries], max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, num_samples=self.num_samples, seed=seed, label="reasoner sample",
        )
        return [
            Candidate(query_id=q["id"], candidate_id=f"{q['id']}/{j}", prompt=prompt, response=text,
                      extras={"sample": j, "temperature": self.temperature})
            for q, prompt, texts in zip(queries, prompts, samples)
            for j, text in enumerate(texts)
        ]

    def pair(self, scored: list[Scored], queries: dict[str, Query], seed: int) -> tuple[list[Pair], dict]:
        rng = random.Random(seed)
        by_query = group_by_query(scored)
        low, high = self.accuracy_band
        pairs, outside_band, no_contrast = [], 0, 0
        for qid, cands in by_query.items():
            accuracy = sum(c["score"] for c in cands) / len(cands)
            if not low <= accuracy <= high:
                outside_band += 1
                continue
            correct = _distinct(c for c in cands if c["score"] >= 0.5)
            wrong = _distinct(c for c in cands if c["score"] < 0.5)
            combos = [(c, w) for c in correct for w in wrong]
            if not combos:
                no_contrast += 1
                continue
            for c, w in rng.sample(combos, min(self.max_pairs_per_query, len(combos))):
                pairs.append(Pair(
                    pair_id=f"{c['candidate_id']}>{w['candidate_id']}", query_id=qid, prompt=c["prompt"],
                    images=[queries[qid]["image"]],
                    chosen=assistant_message(truncate_words(c["response"], self.max_words)),
                    rejected=assistant_message(truncate_words(w["response"], self.max_words)),
                    score_chosen=c["score"], score_rejected=w["score"], rejected_extra=[], method="reasoner",
                ))
        return pairs, {"dropped_outside_band": outside_band, "dropped_no_contrast": no_contrast}


def _distinct(cands) -> list[Scored]:
    """First candidate of each distinct response text, in order."""
    seen, out = set(), []
    for c in cands:
        if c["response"] not in seen:
            seen.add(c["response"])
            out.append(c)
    return out
