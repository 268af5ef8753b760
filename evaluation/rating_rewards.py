"""Rating rewards and soft-reward metrics for a VLM judge (seeds/soft-rewards.txt, sec. 3-4).

The judge answers in a fixed format, optionally after reasoning: "... Score: k". One module
holds what both sides need, so training rewards and evaluation cannot drift:

- ``parse_rating`` / ``format_rating``: the answer format;
- ``reward_parts``: the paper's three GRPO rewards (sec. 4): format (the response ends with a
  parseable "Score: k"), exact match (k == target) and approximate match (|k - target| = 0, 1,
  2 -> 1, 0.75, 0.5, else 0);
- ``GRPORewardJudge``: the score stage's judge (conf/judge/grpo_reward.yaml). ``Scored.score`` is
  the weighted reward scaled into [0, 1]; ``score_parts`` holds the raw parts and ``reward`` (the
  unscaled sum that GRPO's advantages use);
- the soft reward E[r | C] = sum_r r * softmax over the rating tokens only (sec. 3) is
  ``evaluation.judges.expected_rating``, shared with judge=rating;
- ``ordered_pairs``, ``pairwise_accuracy``, ``mean_at_k``: pairwise accuracy of any per-item
  score (soft rating, or Mean@k: the mean of k sampled ratings, Table 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from models.records import Candidate, Query, Scored

RATING_MARKER = "Score:"
_RATING = re.compile(r"(?:^|\s)Score:\s*(-?\d+)\s*$")


def format_rating(rating: int) -> str:
    """The well-formed answer for ``rating``: "Score: 4"."""
    return f"{RATING_MARKER} {rating}"


def parse_rating(text: str | None) -> int | None:
    """k when ``text`` ends with "Score: k" (anything may precede it, e.g. reasoning), else None."""
    if not text:
        return None
    match = _RATING.search(text.strip())
    return int(match.group(1)) if match else None


def reward_parts(response: str, target: int, approx_rewards: Sequence[float] = (1.0, 0.75, 0.5)) -> dict:
    """{"format", "exact", "approx"} in [0, 1] and the parsed ``predicted`` rating (None if
    unparseable; then every part is 0). ``approx_rewards[d]`` is the reward at distance d."""
    predicted = parse_rating(response)
    if predicted is None:
        return {"format": 0.0, "exact": 0.0, "approx": 0.0, "predicted": None}
    distance = abs(predicted - target)
    approx = approx_rewards[distance] if distance < len(approx_rewards) else 0.0
    return {"format": 1.0, "exact": float(distance == 0), "approx": float(approx), "predicted": predicted}


@dataclass
class GRPORewardJudge:
    """The GRPO judge-training reward: format + exact + approximate match against the query's
    true rating (its ``answer`` is the ideal response "Score: k", as data=judge_pairs writes it).

    reward = format_weight * format + exact_weight * exact + approx_weight * approx
    score  = reward / (format_weight + exact_weight + approx_weight)        in [0, 1]
    """

    format_weight: float = 1.0
    exact_weight: float = 1.0
    approx_weight: float = 1.0
    approx_rewards: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])

    needs_model = False

    def reward(self, response: str, target: int) -> tuple[float, dict]:
        parts = reward_parts(response, target, self.approx_rewards)
        total = (self.format_weight * parts["format"] + self.exact_weight * parts["exact"]
                 + self.approx_weight * parts["approx"])
        return total, parts

    def score(self, candidates: list[Candidate], queries: dict[str, Query], evaluator=None) -> list[Scored]:
        """``evaluator`` is accepted for the score stage's judge interface and unused (no model)."""
        top = self.format_weight + self.exact_weight + self.approx_weight
        if top <= 0:
            raise ValueError("judge=grpo_reward needs a positive sum of reward weights")
        scored = []
        for cand in candidates:
            target = parse_rating(queries[cand["query_id"]]["answer"])
            if target is None:
                raise ValueError(
                    f"query {cand['query_id']} has no rating answer ('{RATING_MARKER} k'); "
                    "judge=grpo_reward scores rating queries: use data=judge_pairs"
                )
            total, parts = self.reward(cand["response"], target)
            scored.append(Scored(**cand, score=total / top, score_parts={**parts, "target": target, "reward": total}))
        return scored


# --- soft rewards and pairwise accuracy -------------------------------------------------------


def ordered_pairs(truths: Sequence[float], groups: Sequence[str]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of items that share a group (the same prompt) and differ in
    true rating."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    pairs = []
    for items in members.values():
        for a, b in ((a, b) for k, a in enumerate(items) for b in items[k + 1 :]):
            if truths[a] != truths[b]:
                pairs.append((a, b) if truths[a] > truths[b] else (b, a))
    return pairs


def pairwise_accuracy(scores: Sequence[float | None], pairs: Sequence[tuple[int, int]]) -> float:
    """Fraction of (better, worse) pairs whose scores order them correctly. A tie, or a missing
    score (no parseable rating), counts 0.5: the expected accuracy of breaking it at random."""
    if not pairs:
        raise ValueError("pairwise accuracy of an empty pair set is undefined")
    total = 0.0
    for better, worse in pairs:
        a, b = scores[better], scores[worse]
        total += 0.5 if a is None or b is None or a == b else float(a > b)
    return total / len(pairs)


def mean_at_k(samples: Sequence[Sequence[int | None]], k: int) -> list[float | None]:
    """Mean@k: per item, the mean of the parseable ratings among its first k samples (None when
    none parses)."""
    means = []
    for item in samples:
        parsed = [r for r in item[:k] if r is not None]
        means.append(sum(parsed) / len(parsed) if parsed else None)
    return means
