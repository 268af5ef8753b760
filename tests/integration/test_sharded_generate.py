"""Sharded generation on the tiny model: shards cover the round's queries once and in order, a
lost shard is recomputed alone (the others' artifacts untouched, the merge identical), and
shards run on a Dask LocalCluster of worker processes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from prefect import flow

from tasks.artifacts import read_jsonl, read_manifest
from tasks.common import round_queries
from tasks.generate import generate_round, shard_dir
from tests.conftest import tiny_overrides
from tests.integration.test_iterate import compose_cfg

pytestmark = pytest.mark.slow

# Sampling (temperature 1, two answers per query) so that the shards' seeds matter.
SHARDED = ["method=reasoner", "method.num_samples=2", "queries_per_round=10", "generate.shards=2"]


@flow(name="generate-round")
def generate_round_flow(run_dir: str, cfg: dict) -> str:
    return generate_round(run_dir, 1, cfg, None)


def query_order(candidates_dir: Path) -> list[str]:
    """Query ids in the order their candidates appear, each once."""
    seen: list[str] = []
    for row in read_jsonl(candidates_dir / "candidates.jsonl"):
        if not seen or seen[-1] != row["query_id"]:
            seen.append(row["query_id"])
    return seen


def test_shards_cover_queries_in_order_and_a_lost_shard_is_recomputed_alone(
        prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    cfg = compose_cfg(tiny_overrides(tmp_path, tiny_cache) + SHARDED)
    run_dir = tmp_path / "run"
    merged = Path(generate_round_flow(str(run_dir), cfg))

    ids = [q["id"] for q in round_queries(cfg, 1)]
    assert query_order(merged) == ids  # every query once, in the round's order
    assert len(read_jsonl(merged / "candidates.jsonl")) == 2 * len(ids)
    shards = [shard_dir(str(run_dir), 1, k, 2) for k in range(2)]
    assert [read_manifest(s)["shard"]["queries"] for s in shards] == [[0, 5], [5, 10]]
    assert read_manifest(shards[0])["shard"]["seed"] != read_manifest(shards[1])["shard"]["seed"]
    assert read_manifest(merged)["counts"] == {"queries": 10, "candidates": 20, "shards": 2}
    before = (merged / "candidates.jsonl").read_text()
    kept_manifest = (shards[0] / "manifest.json").read_text()

    # A worker lost with shard 1 (and so the merge never happened): only shard 1 is recomputed.
    shutil.rmtree(shards[1])
    shutil.rmtree(merged)
    assert Path(generate_round_flow(str(run_dir), cfg)) == merged
    assert (shards[0] / "manifest.json").read_text() == kept_manifest  # finished_at and all unchanged
    assert (merged / "candidates.jsonl").read_text() == before


def test_shards_run_on_a_dask_local_cluster(prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    from flows.runners import with_task_runner

    dask = ["generate.task_runner=dask", "generate.dask.n_workers=2", "generate.dask.torch_threads=1"]
    cfg = compose_cfg(tiny_overrides(tmp_path, tiny_cache) + SHARDED + dask)
    run_dir = tmp_path / "run"
    merged = Path(with_task_runner(generate_round_flow, cfg)(str(run_dir), cfg))

    assert query_order(merged) == [q["id"] for q in round_queries(cfg, 1)]
    for k in range(2):
        worker = read_manifest(shard_dir(str(run_dir), 1, k, 2))["worker"]
        assert worker["pid"] != os.getpid()  # computed in a Dask worker process
        assert worker["torch_threads"] == 1
