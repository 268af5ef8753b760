"""Stage 3: the method turns scored candidates into chosen/rejected pairs, and the round's
starting policy (the reference) scores them once in a batched no-grad pass.

Output: ``pairs/`` as a Hugging Face dataset in TRL's conversational preference format
(prompt, chosen, rejected, images) plus ref_chosen_logp / ref_rejected_logp columns, and
``preview.jsonl`` (the first pairs, without images) for humans and MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from methods.balance import symmetric_pairs
from models.trainer import encode_pairs, reference_pass
from tasks.artifacts import is_done, read_jsonl, stage_output, write_jsonl
from tasks.common import STAGE_OPTIONS, build, frozen_policy, inject_fault, round_dir, round_queries

PREVIEW_ROWS = 20


@task(name="pair", **STAGE_OPTIONS)
def pair(run_dir: str, round_index: int, cfg: dict, scores_dir: str, policy_ckpt: str | None) -> str:
    import datasets

    out = round_dir(run_dir, round_index) / "pairs"
    if is_done(out):
        return str(out)
    inject_fault(cfg, "pair", round_index, out)
    with stage_output(out, "pair", {"scores": scores_dir, "policy": policy_ckpt}) as (tmp, manifest):
        queries = {q["id"]: q for q in round_queries(cfg, round_index)}
        scored = read_jsonl(Path(scores_dir) / "scores.jsonl")
        method = build(cfg["method"])
        pairs, method_counts = method.pair(scored, queries, seed=cfg["seed"] * 1000 + round_index)
        if cfg["train"].get("balance_pairs") and not getattr(method, "trains_on_ground_truth", False):
            pairs, method_counts["dropped_unbalanced"] = symmetric_pairs(pairs, seed=cfg["seed"] * 1000 + round_index)
        dropped_long = 0
        rows_are_pairs = not hasattr(method, "reference_pass")
        if pairs and not rows_are_pairs:
            # Hook: a method whose training rows are not chosen/rejected pairs (judge_grpo: GRPO
            # rollout groups) scores them under the round's starting policy itself and returns
            # (rows with their old/reference log-probs, number dropped as too long).
            start = time.perf_counter()
            pairs, dropped_long = method.reference_pass(frozen_policy(cfg, policy_ckpt), pairs, cfg["train"])
            manifest["timings"]["reference_s"] = round(time.perf_counter() - start, 3)
        elif pairs:  # DPO-family methods: chosen/rejected reference log-probs
            policy = frozen_policy(cfg, policy_ckpt)
            start = time.perf_counter()
            encoded, kept, dropped_long = encode_pairs(policy.processor, pairs, cfg["train"]["max_length"])
            ref_chosen, ref_rejected, ref_extra = reference_pass(
                policy.model, policy.processor, encoded, cfg["train"]["ref_batch_size"]
            )
            manifest["timings"]["reference_s"] = round(time.perf_counter() - start, 3)
            pairs = [pairs[i] | {"ref_chosen_logp": c, "ref_rejected_logp": r, "ref_rejected_extra_logp": e}
                     for i, c, r, e in zip(kept, ref_chosen, ref_rejected, ref_extra)]
        if pairs:
            datasets.Dataset.from_list(pairs).save_to_disk(str(tmp / "dataset"))
        write_jsonl(tmp / "preview.jsonl", [{k: v for k, v in p.items() if k != "images"} for p in pairs[:PREVIEW_ROWS]])
        manifest["counts"] = {"candidates": len(scored), "pairs": len(pairs), "dropped_too_long": dropped_long,
                              **method_counts}
        # pair quality in the judge's terms; a group-relative method's rows are not pairs
        manifest["metrics"] = judge_score_means(pairs) if rows_are_pairs else {}
    return str(out)


def judge_score_means(pairs: list[dict]) -> dict[str, float]:
    """Mean judge score of the chosen and of the rejected responses over the round's pairs.

    How good a method's pairs are, in the judge's terms: with the correctness judge it is the
    share of chosen (rejected) answers that are right. A self-supervised method (SeVa) pairs
    without the judge, so this is the one place its pairs' quality shows; NLL-only anchors
    (chosen == rejected) are left out."""
    scored = [p for p in pairs if p["chosen"] != p["rejected"]
              and isinstance(p.get("score_chosen"), (int, float)) and isinstance(p.get("score_rejected"), (int, float))]
    if not scored:
        return {}
    return {"judge_score_chosen": sum(p["score_chosen"] for p in scored) / len(scored),
            "judge_score_rejected": sum(p["score_rejected"] for p in scored) / len(scored)}
