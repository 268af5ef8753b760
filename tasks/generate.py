"""Stage 1: the round's starting policy answers the round's fresh queries (method-specific)."""

from __future__ import annotations

from prefect import task

from tasks.artifacts import is_done, stage_output, write_jsonl
from tasks.common import STAGE_OPTIONS, build, frozen_policy, inject_fault, round_dir, round_queries


@task(name="generate", **STAGE_OPTIONS)
def generate(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None) -> str:
    out = round_dir(run_dir, round_index) / "candidates"
    if is_done(out):
        return str(out)
    inject_fault(cfg, "generate", round_index, out)
    with stage_output(out, "generate", {"policy": policy_ckpt}) as (tmp, manifest):
        queries = round_queries(cfg, round_index)
        policy = frozen_policy(cfg, policy_ckpt)
        method = build(cfg["method"])
        candidates = method.generate(policy, queries, seed=cfg["seed"] * 1000 + round_index)
        write_jsonl(tmp / "candidates.jsonl", candidates)
        manifest["counts"] = {"queries": len(queries), "candidates": len(candidates)}
    return str(out)
