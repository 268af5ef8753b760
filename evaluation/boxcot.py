"""Box-CoT evaluation: UV-CoT's inference (seeds/uv-cot.txt sec. 3, Fig. 2) on held-out queries.

For every query the policy first gives a box (greedy), the box is parsed and its region
cropped exactly as in training (methods.uvcot.UVCoT.chain_inputs: released fallback box and
square crop), and the policy answers with both images (greedy). The answer is scored by the
judge (default: the CorrectnessJudge, the same scorer the pairing and the plain evaluation
use); where the query has a ground-truth box (Query.target_box, the shapes suite), the box is
also scored by IoU.

    evaluate_box_cot(policy, queries, cfg_method) -> {
        "accuracy", "accuracy/<qtype>", "n", "n/<qtype>",      exact match of the chain's answer
        "malformed_rate"                                        if ``answers`` (the answer space) is given
        "box_parse_rate"                                        share of box texts that hold a box
        "box_iou_mean", "n_box_iou"                             over queries with a target box
    }
Every value is a number, so the dict can be merged into an evaluate stage's metrics (and so
reach MLflow) under a prefix, e.g. ``box_cot/accuracy``.
"""

from __future__ import annotations

from evaluation.judges import CorrectnessJudge
from evaluation.metrics import accuracy_table, normalise
from methods.boxes import iou
from methods.uvcot import UVCoT
from models.records import Candidate, Query


def method_from_config(cfg_method) -> UVCoT:
    """A UVCoT from the method config (a dict with or without ``_target_``) or an instance."""
    if isinstance(cfg_method, UVCoT):
        return cfg_method
    return UVCoT(**{k: v for k, v in dict(cfg_method).items() if k != "_target_"})


def run_box_cot(policy, queries: list[Query], cfg_method, judge=None, answers: set[str] | None = None,
                label: str = "box-CoT eval") -> tuple[dict, list[dict]]:
    """(metrics, per-query predictions): see the module docstring for the metrics."""
    if not queries:
        raise ValueError("box-CoT evaluation of an empty query set is undefined; check eval.size")
    method = method_from_config(cfg_method)
    judge = judge or CorrectnessJudge()
    chains = method.infer(policy, queries, label=label)
    candidates = [Candidate(query_id=q["id"], candidate_id=f"{q['id']}/boxcot", prompt=c["prompt"], response=c["answer"],
                            extras={"box_text": c["box_text"], "box": c["box"]}) for q, c in zip(queries, chains)]
    scored = judge.score(candidates, {q["id"]: q for q in queries})
    correct = [s["score"] >= 0.5 for s in scored]
    malformed = [normalise(c["answer"]) not in answers for c in chains] if answers is not None else [False] * len(chains)
    metrics = accuracy_table([q["qtype"] for q in queries], correct, malformed)
    if answers is None:
        metrics.pop("malformed_rate")
    metrics["box_parse_rate"] = sum(c["parsed"] for c in chains) / len(chains)
    ious = []
    predictions = []
    for q, c, ok, s in zip(queries, chains, correct, scored):
        target = list(q.get("target_box") or [])
        value = iou(c["box"], target) if target else None
        if value is not None:
            ious.append(value)
        predictions.append({"id": q["id"], "qtype": q["qtype"], "question": q["question"], "answer": q["answer"],
                            "box_text": c["box_text"], "box": c["box"], "parsed": c["parsed"], "iou": value,
                            "response": c["answer"], "score": s["score"], "correct": ok})
    metrics["n_box_iou"] = len(ious)
    if ious:
        metrics["box_iou_mean"] = sum(ious) / len(ious)
    return metrics, predictions


def evaluate_box_cot(policy, queries: list[Query], cfg_method, judge=None, answers: set[str] | None = None) -> dict:
    """Box-CoT metrics of ``policy`` on ``queries`` (flat dict of numbers)."""
    return run_box_cot(policy, queries, cfg_method, judge=judge, answers=answers)[0]
