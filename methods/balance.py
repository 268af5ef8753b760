"""Symmetric pair filter: keep as many A-over-B pairs as B-over-A pairs, for every answer pair.

Why: on short answers a DPO step on "A over B" raises A and lowers B for *every* image that
shares the question's form, not only for this image. When a round's pairs lean one way
(more "no over yes" than "yes over no", because the policy is biased or one class is easier to
sample), training mostly shifts the answer prior, and greedy accuracy on a balanced test set
trades one class's errors for another's (measured in issue 6: exist answers flipping between
all-yes and all-no round to round). Keeping ``min(n(A>B), n(B>A))`` pairs of each direction
cancels the prior shift exactly, so what remains to learn is which answer *this image* supports.

Answers are compared after ``evaluation.metrics.normalise``; long free-text responses rarely
repeat, so on CoT or captioning data the filter keeps few pairs and should stay off.
"""

from __future__ import annotations

import random
from collections import defaultdict

from evaluation.metrics import normalise
from models.records import message_text


def answer_key(messages: list[dict]) -> str:
    return normalise(message_text(messages))


def symmetric_pairs(pairs: list[dict], seed: int) -> tuple[list[dict], int]:
    """(kept pairs in their original order, number dropped). Which pairs of an over-represented
    direction are kept is a seeded random choice, so the result is reproducible."""
    by_direction: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_direction[(answer_key(p["chosen"]), answer_key(p["rejected"]))].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for (a, b), forward in by_direction.items():
        backward = by_direction.get((b, a), [])
        n = min(len(forward), len(backward))
        keep.update(rng.sample(forward, n))
    kept = [p for i, p in enumerate(pairs) if i in keep]
    return kept, len(pairs) - len(kept)
