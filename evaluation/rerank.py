"""The DPO policy as a verifier: re-rank N sampled answers (seeds/llava-reasoner-dpo.txt,
sec. 5.2).

    r(y) = beta * (log pi_dpo(y | x) - log pi_ref(y | x))        implicit DPO reward

Per query, from N samples with rewards r_1..r_N:
    best-of-N      the answer of the sample with the highest reward
    weighted vote  w = softmax(r); the distinct answer with the largest sum of w
    majority vote  the most frequent answer (self-consistency; rewards unused)

Answers vote under a canonical key (``CorrectnessJudge.canonical``: the extracted, normalised
answer), so "Red." and "red" count together. Ties go to the earliest sample.
Pure functions on fixed rewards; the evaluate stage computes the log-probs.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def implicit_rewards(policy_logps: list[float], reference_logps: list[float], beta: float) -> list[float]:
    """beta * (log pi(y|x) - log ref(y|x)) per sample (summed log-probs)."""
    return [beta * (p - r) for p, r in zip(policy_logps, reference_logps)]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exp = [math.exp(v - top) for v in values]
    total = sum(exp)
    return [e / total for e in exp]


def best_of_n(keys: list[str], rewards: list[float]) -> int:
    """Index of the highest-reward sample (the first among equals)."""
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def weighted_vote(keys: list[str], rewards: list[float]) -> int:
    """Index of the first sample of the answer with the largest summed softmax(reward)."""
    weights = softmax(rewards)
    mass: dict[str, float] = {}
    for k, w in zip(keys, weights):
        mass[k] = mass.get(k, 0.0) + w
    winner = max(mass, key=lambda k: (mass[k], -keys.index(k)))
    return keys.index(winner)


def majority_vote(keys: list[str], rewards: list[float] | None = None) -> int:
    """Index of the first sample of the most frequent answer (the earliest answer among ties)."""
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    winner = max(counts, key=lambda k: (counts[k], -keys.index(k)))
    return keys.index(winner)


SELECTORS: dict[str, Callable[[list[str], list[float]], int]] = {
    "best_of_n": best_of_n,
    "weighted_vote": weighted_vote,
    "majority_vote": majority_vote,
}


def rerank_metrics(items: list[dict]) -> tuple[dict, list[dict]]:
    """Accuracy of each selector over queries.

    ``items``: one dict per query with ``keys`` (canonical answer of each of its N samples),
    ``rewards`` [N] and ``correct`` [N] (bool: the sample's answer is right).
    Returns ({"rerank/best_of_n", "rerank/weighted_vote", "rerank/majority_vote",
    "rerank/any_correct" (the oracle: some sample is right), "rerank/sample_accuracy" (mean over
    samples), "rerank/n_samples"}, per-query picks [{selector: index}])."""
    if not items:
        raise ValueError("re-ranking needs at least one query")
    hits = {name: 0 for name in SELECTORS}
    picks, any_correct, sample_acc = [], 0, 0.0
    for item in items:
        chosen = {name: select(item["keys"], item["rewards"]) for name, select in SELECTORS.items()}
        for name, i in chosen.items():
            hits[name] += bool(item["correct"][i])
        any_correct += any(item["correct"])
        sample_acc += sum(item["correct"]) / len(item["correct"])
        picks.append(chosen)
    n = len(items)
    metrics = {f"rerank/{name}": hits[name] / n for name in SELECTORS}
    metrics |= {"rerank/any_correct": any_correct / n, "rerank/sample_accuracy": sample_acc / n,
                "rerank/n_samples": len(items[0]["keys"])}
    return metrics, picks
