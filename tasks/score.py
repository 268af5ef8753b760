"""Stage 2: the judge scores every candidate in [0, 1].

A model-based judge (``judge.needs_model``) reads an evaluator: the round's starting policy
(``policy_ckpt``, None = the base model) when ``judge.model`` is null, else the separate model
that ``judge.model`` configures (its unset keys taken from the top-level ``model`` config)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from models.sampling import Policy
from tasks.artifacts import is_done, read_jsonl, stage_output, write_jsonl
from tasks.common import STAGE_OPTIONS, build, frozen_policy, round_dir, round_queries


def evaluator_config(cfg: dict) -> dict | None:
    """The model config of a separate evaluator, or None for self-evaluation."""
    judge_model = cfg["judge"].get("model")
    if not judge_model:
        return None
    # A separate model: the policy's device/dtype/batch settings unless given, never its
    # embedded-tiny spec (which would override name_or_path) nor its LoRA settings.
    base = {k: v for k, v in cfg["model"].items() if k not in ("name_or_path", "tiny", "lora")}
    return base | {"tiny": None, "lora": {"enabled": False}} | judge_model


def evaluator_policy(cfg: dict, policy_ckpt: str | None) -> Policy:
    model_cfg = evaluator_config(cfg)
    if model_cfg is None:
        return frozen_policy(cfg, policy_ckpt)
    from models.load import check_available

    check_available(model_cfg)
    return frozen_policy({"model": model_cfg}, None)


@task(name="score", **STAGE_OPTIONS)
def score(run_dir: str, round_index: int, cfg: dict, candidates_dir: str, policy_ckpt: str | None = None) -> str:
    out = round_dir(run_dir, round_index) / "scores"
    if is_done(out):
        return str(out)
    judge = build(cfg["judge"])
    needs_model = getattr(judge, "needs_model", False)
    separate = evaluator_config(cfg) if needs_model else None
    inputs = {"candidates": candidates_dir}
    if needs_model and separate is None:
        inputs["evaluator"] = policy_ckpt  # self-evaluation: the round's starting policy
    with stage_output(out, "score", inputs) as (tmp, manifest):
        if separate is not None:
            manifest["evaluator"] = separate
        queries = {q["id"]: q for q in round_queries(cfg, round_index)}
        candidates = read_jsonl(Path(candidates_dir) / "candidates.jsonl")
        evaluator = evaluator_policy(cfg, policy_ckpt) if needs_model and candidates else None
        scored = judge.score(candidates, queries, evaluator=evaluator)
        write_jsonl(tmp / "scores.jsonl", scored)
        mean = sum(s["score"] for s in scored) / len(scored) if scored else 0.0
        manifest["counts"] = {"scored": len(scored), "mean_score": mean}
    return str(out)
