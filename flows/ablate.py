"""An experiment of several variants x seeds, plus the continued-SFT control, and its report.

    python -m flows.iterate experiment=seva_ablation

An experiment config (conf/experiment/*.yaml) fills ``ablation``: ``variants`` maps a label
to Hydra overrides, ``seeds`` lists the seeds, ``control`` adds continued SFT on the ground
truth of the same queries (methods/sft_control.py). Every (variant, seed) is an ordinary
``iterate`` run (its own run directory, resumable, its own MLflow parent run tagged with its
label) in the experiment ``experiment_name``; a run that another experiment already finished
with the same run key (same settings and seed) is reused from there instead of recomputed.
A control runs after its variant with the variant's train settings and, round by round,
exactly its optimizer steps (``train.steps_per_round``); ``control_for`` limits which
variants get one (an ablation usually needs one, for its main variant). At the end the report
(evaluation/report.py) is printed, written to ``<runs_dir>/<experiment>/report/`` and logged
to MLflow.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Lock

from hydra import compose
from omegaconf import OmegaConf
from prefect import flow

from evaluation.report import (
    INDEX,
    collect_runs,
    control_label,
    summarise_variants,
    variants_table,
    write_report,
)
from flows.runners import worker_env
from flows.schema import validate
from models.progress import log
from tasks import tracking
from tasks.artifacts import read_manifest

# Overrides that choose what the control replaces: the method, its loss and their settings.
METHOD_KEYS = ("method", "loss", "+method", "+loss", "~loss", "~method")


def compose_run(overrides: list[str]) -> dict:
    cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def control_overrides(variant: list[str], variant_cfg: dict, steps: list[int]) -> list[str]:
    """Continued SFT on the same queries with the variant's train settings and, round by round,
    exactly the optimizer steps the variant took (``train.steps_per_round``). The round size, the
    round count and the embedded base's SFT formats are carried over explicitly: a method may
    re-default them (conf/method/reasoner.yaml, uvcot.yaml, seva.yaml), and sft_control would
    otherwise fall back to the schema's and train on other queries, or from another base."""
    kept = [o for o in variant if not o.split("=", 1)[0].split(".", 1)[0] in METHOD_KEYS]
    train = [f"train.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in variant_cfg["train"].items()
             if k != "steps_per_round"]
    formats = [f"tiny_formats.{k}={v}" for k, v in variant_cfg["tiny_formats"].items()]
    return [*kept, "method=sft_control", "loss=sft", *train, f"train.steps_per_round=[{','.join(map(str, steps))}]",
            f"queries_per_round={variant_cfg['queries_per_round']}", f"rounds={variant_cfg['rounds']}", *formats]


def finished_elsewhere(cfg: dict, key: str) -> Path | None:
    """A finished run with this run key and round count in another experiment's folder, or None.

    The key hashes every setting that changes results, and runs are deterministic per seed, so
    such a run is the run this experiment would compute (e.g. ``seva_ablation``'s default
    variant is ``methods``' seva run); reusing it saves its whole cost."""
    import yaml

    for candidate in sorted(Path(cfg["runs_dir"]).glob(f"*/{key}")):
        if candidate.parent.name == cfg["experiment_name"] or not (candidate / "config.yaml").exists():
            continue
        planned = yaml.safe_load((candidate / "config.yaml").read_text())["rounds"]
        final = candidate / f"round_{cfg['rounds']}" / "eval" / "manifest.json"
        if planned == cfg["rounds"] and final.exists():
            return candidate
    return None


def steps_taken(run_dir: Path, rounds: int) -> list[int]:
    """Optimizer steps of each round of a finished run (0 for a carried-forward round)."""
    return [read_manifest(run_dir / f"round_{i}" / "checkpoint")["counts"]["steps"] for i in range(1, rounds + 1)]


def prebuild_models(cfg: dict) -> None:
    """Build (cache) a run's embedded tiny base and evaluator here, once, before children that
    share them start: concurrent builds of one model are safe but each costs minutes."""
    from models.load import base_model_path
    from tasks.score import evaluator_config

    base_model_path(cfg["model"])
    if evaluator_config(cfg):
        base_model_path(evaluator_config(cfg))


def run_in_child(job: dict, env: dict[str, str], log_dir: Path) -> None:
    """One iterate run in its own process (flows/run_config.py) with ``env`` added to this
    process's environment (flows/runners.worker_env), output to its own log file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{job['label']}-seed{job['seed']}")
    config_file, log_file = log_dir / f"{stem}.json", log_dir / f"{stem}.log"
    config_file.write_text(json.dumps(job["cfg"]))
    env = os.environ | env
    with open(log_file, "w") as out:
        code = subprocess.run([sys.executable, "-m", "flows.run_config", str(config_file), job["name"]],
                              check=False, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        raise RuntimeError(f"{job['name']} failed (exit {code}); its output: {log_file}. Fix the cause and run "
                           "the experiment again: finished runs and stages are reused.")


@flow(name="ablate")
def ablate(experiment: str, base_overrides: list[str], ablation: dict) -> str:
    """Run every (variant, seed), then each matched control, then write the report.

    With ``ablation.workers`` = W > 1, W runs at a time each run in their own process with
    cores // W torch threads: the tiny model's small matrices use two threads poorly, so two
    one-thread runs finish in about 0.7x the time of two two-thread runs in a row (2 cores)."""
    from flows.iterate import iterate, run_key

    variants, seeds = ablation["variants"], ablation["seeds"]
    targets = list(variants) if ablation.get("control_for") is None else list(ablation["control_for"])
    unknown = sorted(set(targets) - set(variants))
    if unknown:
        raise ValueError(f"ablation.control_for names {unknown}, which are not variants ({sorted(variants)})")
    workers = int(ablation.get("workers") or 1)
    if workers < 1:
        raise ValueError(f"ablation.workers={workers}: use 1 (runs one after another here) or more")
    total = len(variants) * len(seeds) + (len(targets) * len(seeds) if ablation["control"] else 0)
    entries: list[dict] = []
    start, lock, done = time.perf_counter(), Lock(), 0  # done: runs finished or reused, for the ETA

    def plan(label: str, seed: int, overrides: list[str]) -> dict:
        cfg = compose_run([*base_overrides, *overrides, f"seed={seed}", f"label='{label}'"])
        key = run_key(cfg)
        run_dir = Path(cfg["runs_dir"]) / cfg["experiment_name"] / key
        reused = None if (run_dir / "config.yaml").exists() else finished_elsewhere(cfg, key)
        if reused:
            log.info("%s: %s seed %d is the finished run %s (same config): reused, not re-run", experiment, label,
                     seed, reused)
        return {"label": label, "seed": seed, "overrides": overrides, "cfg": cfg, "reused": bool(reused),
                "run_dir": reused or run_dir, "name": f"iterate-{label}-seed{seed}"}

    def progress(job: dict, event: str, finished: int = 0) -> None:
        nonlocal done
        with lock:
            done += finished
            elapsed = time.perf_counter() - start
            eta = f"ETA {elapsed / done * (total - done):.0f}s" if done else "ETA unknown"
            log.info("%s: run %s (%s, seed %d) %s; %d/%d done, %.0fs so far, %s", experiment, job["name"],
                     job["label"], job["seed"], event, done, total, elapsed, eta)

    def execute(jobs: list[dict]) -> None:
        """Run each distinct run of ``jobs`` (here one after another, or ``workers`` at a time in
        child processes), then index every job in plan order. Two variants may be one config
        (same run key): it runs once and both index it."""
        nonlocal done
        todo, seen = [], set()
        for job in jobs:
            if not job["reused"] and job["run_dir"] not in seen:
                seen.add(job["run_dir"])
                todo.append(job)
        done += len(jobs) - len(todo)
        if workers == 1:
            for job in todo:
                progress(job, "starts")
                iterate.with_options(name=job["name"])(job["cfg"])
                done += 1
        elif todo:
            run_parallel(todo)
        entries.extend({k: job[k] for k in ("label", "seed", "overrides")} | {"run_dir": str(job["run_dir"])}
                       for job in jobs)

    def run_parallel(todo: list[dict]) -> None:
        for job in todo:
            prebuild_models(job["cfg"])
        # the tracking store and experiment exist before children start: two processes creating
        # a fresh MLflow sqlite database at once race on its schema migration
        for uri, name in {(job["cfg"]["tracking_uri"], job["cfg"]["experiment_name"]) for job in todo}:
            tracking.experiment_id_for(tracking.client(uri), name)
        threads = max(1, (os.cpu_count() or 1) // workers)
        env, log_dir = worker_env(threads), Path(todo[0]["cfg"]["runs_dir"]) / experiment / "logs"

        def one(job: dict) -> None:
            progress(job, f"starts in its own process ({threads} threads)")
            run_in_child(job, env, log_dir)
            progress(job, "finished", finished=1)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            # each thread runs in a copy of this flow run's context, so its progress lines reach
            # the flow run's log in the Prefect UI
            futures = [pool.submit(contextvars.copy_context().run, one, job) for job in todo]
            for future in futures:
                future.result()  # re-raises the first failure once the running ones end

    jobs = [plan(label, seed, overrides) for label, overrides in variants.items() for seed in seeds]
    execute(jobs)
    if ablation["control"]:
        finished = {(job["label"], job["seed"]): job for job in jobs}
        controls = []
        for label in targets:
            for seed in seeds:
                job = finished[(label, seed)]
                steps = steps_taken(Path(job["run_dir"]), job["cfg"]["rounds"])
                controls.append(plan(control_label(label), seed, control_overrides(variants[label], job["cfg"], steps)))
        execute(controls)
    cfg = jobs[-1]["cfg"]

    root = Path(cfg["runs_dir"]) / experiment
    (root / INDEX).write_text(json.dumps({"experiment": experiment, "runs": entries}, indent=2))
    runs = collect_runs(Path(cfg["runs_dir"]), experiment)  # reads the index just written
    files = write_report(experiment, runs, root / "report")
    print("\n" + variants_table(summarise_variants(runs)))
    client = tracking.client(cfg["tracking_uri"])
    run_id = tracking.log_comparison(client, experiment, files)
    print(f"\nreport: {files[0]}  (MLflow run {run_id}); rebuild it with: python -m evaluation.report {experiment}")
    return str(files[0])
