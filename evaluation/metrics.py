"""Answer normalisation and exact-match accuracy, overall and per question type."""

from __future__ import annotations

import re
from collections import defaultdict

_ARTICLES = {"a", "an", "the"}


def normalise(text: str | None) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace."""
    if text is None:
        return ""
    words = re.sub(r"[^\w\s.-]", " ", text.lower()).replace(".", " ").split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(response: str, answer: str) -> bool:
    return normalise(response) == normalise(answer)


def accuracy_table(qtypes: list[str], correct: list[bool], malformed: list[bool]) -> dict:
    """{"accuracy", "malformed_rate", "n", "accuracy/<qtype>", "n/<qtype>"} from per-item flags."""
    if not correct:
        raise ValueError("accuracy of an empty evaluation set is undefined; check eval.size")
    by_type: dict[str, list[bool]] = defaultdict(list)
    for qtype, ok in zip(qtypes, correct):
        by_type[qtype].append(ok)
    table = {
        "accuracy": sum(correct) / len(correct),
        "malformed_rate": sum(malformed) / len(malformed),
        "n": len(correct),
    }
    for qtype in sorted(by_type):
        table[f"accuracy/{qtype}"] = sum(by_type[qtype]) / len(by_type[qtype])
        table[f"n/{qtype}"] = len(by_type[qtype])
    return table
