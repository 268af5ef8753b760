"""Stage 1: the round's starting policy answers the round's fresh queries (method-specific).

``generate.shards=1`` (default): one task writes ``round_i/candidates/``.
``generate.shards=N``: the flow calls ``generate_round``, which submits one ``generate_shard``
task per contiguous slice of the round's queries to the flow's task runner (Dask workers with
``generate.task_runner=dask``). Each shard is an artifact of its own,
``round_i/candidates_shards/shard_k_of_N/``, skipped once finished, so a lost worker loses only
its shard; ``merge_shards`` then concatenates them in order into ``round_i/candidates/``.

``generate.backend=vllm`` samples with vLLM (models/vllm_sampling.py) in a child process, so
the engine's GPU memory is returned when the shard or stage ends.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from prefect import task

from models.load import read_policy
from models.records import Candidate, Query
from models.vllm_sampling import require_vllm
from tasks.artifacts import is_done, read_jsonl, read_manifest, stage_output, write_jsonl
from tasks.common import (
    STAGE_OPTIONS,
    build,
    forget_policy,
    frozen_policy,
    inject_fault,
    round_dir,
    round_queries,
)

# Shards that share a process (the thread task runner) take turns: they share one cached model,
# and generation mutates the tokenizer's padding side.
_one_model = threading.Lock()


def generate_round(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None) -> str:
    """The generate stage as the flow runs it: one task, or N shard tasks and a merge.

    Runs in the flow (not a task) because shards must be submitted from the flow to run on
    its task runner."""
    shards = cfg["generate"]["shards"]
    out = round_dir(run_dir, round_index) / "candidates"
    if shards == 1 or is_done(out):
        return generate(run_dir, round_index, cfg, policy_ckpt)
    started_at = time.time()
    if cfg["generate"]["backend"] == "vllm":
        require_vllm()
        merged_policy(run_dir, round_index, cfg, policy_ckpt)  # once, before the shards read it
    futures = [generate_shard.submit(run_dir, round_index, cfg, policy_ckpt, k) for k in range(shards)]
    return merge_shards(run_dir, round_index, cfg, policy_ckpt, [f.result() for f in futures], started_at)


@task(name="generate", **STAGE_OPTIONS)
def generate(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None) -> str:
    out = round_dir(run_dir, round_index) / "candidates"
    if is_done(out):
        return str(out)
    inject_fault(cfg, "generate", round_index, out)
    if cfg["generate"]["backend"] == "vllm":
        require_vllm()
        merged_policy(run_dir, round_index, cfg, policy_ckpt)
    with stage_output(out, "generate", {"policy": policy_ckpt}) as (tmp, manifest):
        queries = round_queries(cfg, round_index)
        candidates = sample(run_dir, round_index, cfg, policy_ckpt, queries, stage_seed(cfg, round_index))
        write_jsonl(tmp / "candidates.jsonl", candidates)
        manifest["counts"] = {"queries": len(queries), "candidates": len(candidates)}
    return str(out)


@task(name="generate_shard", **STAGE_OPTIONS)
def generate_shard(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None, shard: int) -> str:
    """Shard ``shard`` of ``generate.shards``: queries [k*q//N, (k+1)*q//N) of the round.
    (``fault.stage=generate`` fails each shard's first attempt.)"""
    shards = cfg["generate"]["shards"]
    out = shard_dir(run_dir, round_index, shard, shards)
    if is_done(out):
        return str(out)
    inject_fault(cfg, "generate", round_index, out)
    with stage_output(out, "generate_shard", {"policy": policy_ckpt}) as (tmp, manifest):
        queries = round_queries(cfg, round_index)
        lo, hi = shard * len(queries) // shards, (shard + 1) * len(queries) // shards
        seed = shard_seed(stage_seed(cfg, round_index), shards, shard)
        candidates = sample(run_dir, round_index, cfg, policy_ckpt, queries[lo:hi], seed) if hi > lo else []
        write_jsonl(tmp / "candidates.jsonl", candidates)
        manifest["counts"] = {"queries": hi - lo, "candidates": len(candidates)}
        manifest["shard"] = {"index": shard, "of": shards, "queries": [lo, hi], "seed": seed}
        manifest["worker"] = worker_info()
    return str(out)


@task(name="merge_shards", **STAGE_OPTIONS)
def merge_shards(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None, shard_dirs: list[str],
                 started_at: float | None = None) -> str:
    """The shards' candidates, in shard order, as the round's ``candidates/`` (what the score
    stage reads either way). ``total_s`` is the stage's wall time from ``started_at``."""
    out = round_dir(run_dir, round_index) / "candidates"
    if is_done(out):
        return str(out)
    inputs = {"policy": policy_ckpt} | {f"shard_{k}": d for k, d in enumerate(shard_dirs)}
    with stage_output(out, "generate", inputs, started_at=started_at) as (tmp, manifest):
        candidates = [c for d in shard_dirs for c in read_jsonl(Path(d) / "candidates.jsonl")]
        write_jsonl(tmp / "candidates.jsonl", candidates)
        shard_manifests = [read_manifest(d) for d in shard_dirs]
        manifest["counts"] = {"queries": sum(m["counts"]["queries"] for m in shard_manifests),
                              "candidates": len(candidates), "shards": len(shard_dirs)}
        manifest["timings"]["shards_s"] = round(sum(m["timings"]["total_s"] for m in shard_manifests), 3)
    return str(out)


def stage_seed(cfg: dict, round_index: int) -> int:
    return cfg["seed"] * 1000 + round_index


def shard_seed(seed: int, shards: int, shard: int) -> int:
    """Shard k of N's sampling seed, hashed from (stage seed, N, k) so that no two shards of
    any round share a random stream, and the same on any worker. Below 2**31 - 16: methods add
    small offsets (seed + 1, seed + 2) and some RNGs take 32-bit seeds."""
    digest = hashlib.sha256(f"{seed}/{shards}/{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 16)


def shard_dir(run_dir: str, round_index: int, shard: int, shards: int) -> Path:
    return round_dir(run_dir, round_index) / "candidates_shards" / f"shard_{shard}_of_{shards}"


def worker_info() -> dict:
    """Which process computed a shard, with how many torch threads (for timings' sake)."""
    import torch

    return {"pid": os.getpid(), "host": os.uname().nodename, "torch_threads": torch.get_num_threads()}


def sample(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None, queries: list[Query],
           seed: int) -> list[Candidate]:
    """The method's candidates for ``queries``, sampled by the configured backend."""
    if cfg["generate"]["backend"] == "vllm":
        return sample_with_vllm(cfg, vllm_model_dir(run_dir, round_index, cfg, policy_ckpt), queries, seed)
    method = build(cfg["method"])
    with _one_model:
        return method.generate(frozen_policy(cfg, policy_ckpt), queries, seed=seed)


# --- vLLM backend ------------------------------------------------------------------------------


def vllm_model_dir(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None) -> str:
    """A full model directory (or hub id) for vLLM: the policy itself when it is full weights,
    else its merged copy (``merged_policy``), since vLLM cannot stack PrefLoop's adapters."""
    policy = read_policy(policy_ckpt, cfg["model"])
    if policy["kind"] == "full":
        return policy["path"]
    merged = round_dir(run_dir, round_index) / "policy_merged"
    if not is_done(merged):
        raise RuntimeError(f"{merged} is missing: merged_policy must run before vLLM sampling")
    return str(merged.resolve())


def merged_policy(run_dir: str, round_index: int, cfg: dict, policy_ckpt: str | None) -> str | None:
    """``round_i/policy_merged/``: base + the policy's adapters merged, saved with its
    processor, when the round's policy is a LoRA chain (None when it is already full weights).
    Written once per round, before any shard needs it."""
    if read_policy(policy_ckpt, cfg["model"])["kind"] == "full":
        return None
    out = round_dir(run_dir, round_index) / "policy_merged"
    if not is_done(out):
        with stage_output(out, "merge_policy", {"policy": policy_ckpt}) as (tmp, manifest):
            manifest["merged"] = read_policy(policy_ckpt, cfg["model"])
            policy = frozen_policy(cfg, policy_ckpt)  # load_policy merges the adapters in order
            policy.model.save_pretrained(tmp, safe_serialization=True)
            policy.processor.save_pretrained(tmp)
    return str(out)


def sample_with_vllm(cfg: dict, model_dir: str, queries: list[Query], seed: int) -> list[Candidate]:
    """Run the method's ``generate`` against a vLLM engine in a spawned child process: the
    engine and its GPU memory go away with the process, and the HF policy this process may
    hold is dropped first so the engine finds the memory free."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    require_vllm()
    forget_policy()
    _empty_cuda_cache()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_vllm_generate, cfg, model_dir, queries, seed).result()


def _vllm_generate(cfg: dict, model_dir: str, queries: list[Query], seed: int) -> list[Candidate]:
    from models.vllm_sampling import VLLMPolicy

    options = cfg["generate"]["vllm"]
    policy = VLLMPolicy(model_dir, dtype=cfg["model"]["dtype"], gpu_memory_utilization=options["gpu_memory_utilization"],
                        max_model_len=options["max_model_len"], max_images_per_prompt=options["max_images_per_prompt"])
    return build(cfg["method"]).generate(policy, queries, seed=seed)


def _empty_cuda_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
