"""Stage 2: the judge scores every candidate in [0, 1]."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.artifacts import is_done, read_jsonl, stage_output, write_jsonl
from tasks.common import STAGE_OPTIONS, build, round_dir, round_queries


@task(name="score", **STAGE_OPTIONS)
def score(run_dir: str, round_index: int, cfg: dict, candidates_dir: str) -> str:
    out = round_dir(run_dir, round_index) / "scores"
    if is_done(out):
        return str(out)
    with stage_output(out, "score", {"candidates": candidates_dir}) as (tmp, manifest):
        queries = {q["id"]: q for q in round_queries(cfg, round_index)}
        candidates = read_jsonl(Path(candidates_dir) / "candidates.jsonl")
        scored = build(cfg["judge"]).score(candidates, queries)
        write_jsonl(tmp / "scores.jsonl", scored)
        mean = sum(s["score"] for s in scored) / len(scored) if scored else 0.0
        manifest["counts"] = {"scored": len(scored), "mean_score": mean}
    return str(out)
