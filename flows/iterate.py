"""``python -m flows.iterate [overrides]``: iterative preference optimisation of a VLM.

Hydra composes conf/ -> the Prefect flow ``iterate`` runs UV-CoT's Algorithm 2:

    evaluate(f_0)                                            round_0/eval
    for round i in 1..rounds:
        candidates = generate(f_{i-1}, X_i)                  round_i/candidates
                     (generate.shards=N: N shard tasks on the task runner, merged in order)
        scores     = score(candidates, judge)                round_i/scores
        pairs      = pair(scores, method) + ref log-probs    round_i/pairs
        f_i        = train(f_{i-1}, pairs, loss)             round_i/checkpoint
        evaluate(f_i)                                        round_i/eval

Every stage writes an atomic directory under runs/<experiment>/<key>/, where <key> hashes
the resolved config (minus keys that do not change results), so re-running a command
resumes it: finished stages are skipped, unfinished ones redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

# Forward the library's progress logger to Prefect's run logs (read when prefect is imported).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "prefloop")
# With no Prefect server configured, Prefect starts a temporary one and waits 20 s for it by
# default; on a fresh machine its first start (creating and migrating its database) on 2 busy
# cores took longer and the main command failed with "Timed out while attempting to connect
# to ephemeral Prefect API server" (session 13). A user's own setting still wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The temporary server's anonymous telemetry heartbeat runs while the server is still
# migrating its sqlite database and logs a "database is locked" traceback at every start
# (session 14); it cannot reach the internet on an offline machine anyway.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import hydra
from omegaconf import DictConfig, OmegaConf
from prefect import flow

from flows.checks import check_data, hide_user_error_tracebacks, is_user_error, user_message
from flows.runners import with_task_runner
from flows.schema import KEY_NEUTRAL_DEFAULTS, NON_RESULT_KEYS, generate_key, register, validate
from models.load import check_available
from tasks import tracking
from tasks.artifacts import read_manifest
from tasks.evaluate import evaluate
from tasks.generate import generate_round
from tasks.pair import pair
from tasks.score import score
from tasks.train import train


LAUNCH_KEYS = ("launcher", "num_processes", "accelerate_config")


def run_key(cfg: dict) -> str:
    """Short hash of the config fields that change results."""
    relevant = {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS}
    # Where training runs does not change what it computes (tests/integration/test_distributed_train.py:
    # 2 ranks match one process to 1e-6), so the launcher settings stay out of the key.
    relevant["train"] = {k: v for k, v in cfg["train"].items() if k not in LAUNCH_KEYS}
    for path, off in KEY_NEUTRAL_DEFAULTS.items():
        relevant = _without(relevant, path, off)
    if generate_key(cfg):
        relevant["generate"] = generate_key(cfg)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _without(tree: dict, path: tuple, off) -> dict:
    """``tree`` without the entry at ``path`` when it holds ``off``; copies only along the path."""
    head, *rest = path
    node = tree.get(head)
    if rest and isinstance(node, dict):
        return {**tree, head: _without(node, tuple(rest), off)}
    if not rest and head in tree and node == off:
        return {k: v for k, v in tree.items() if k != head}
    return tree


@flow(name="iterate")
def iterate(cfg: dict, sweep: str | None = None) -> list[dict]:
    key = run_key(cfg)
    run_dir = Path(cfg["runs_dir"]) / cfg["experiment_name"] / key
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    mlflow = tracking.client(cfg["tracking_uri"])
    parent_id = tracking.start_experiment(mlflow, cfg, key, run_dir, sweep)

    rounds = [{"round": 0, "evaluate": evaluate(str(run_dir), 0, cfg, None)}]
    tracking.log_round(mlflow, parent_id, 0, {"evaluate": rounds[0]["evaluate"]})
    policy = None  # None = the base model, f_0
    for i in range(1, cfg["rounds"] + 1):
        stages = {"generate": generate_round(str(run_dir), i, cfg, policy)}
        stages["score"] = score(str(run_dir), i, cfg, stages["generate"], policy)
        stages["pair"] = pair(str(run_dir), i, cfg, stages["score"], policy)
        stages["train"] = train(str(run_dir), i, cfg, stages["pair"], policy)
        start, policy = policy, stages["train"]
        stages["evaluate"] = evaluate(str(run_dir), i, cfg, policy, reference_ckpt=start)
        tracking.log_round(mlflow, parent_id, i, stages)
        rounds.append({"round": i, **stages})

    summary = [summarise(r) for r in rounds]
    tracking.finish_experiment(mlflow, parent_id, summary)
    print_summary(summary, run_dir, parent_id, cfg, sweep)
    return summary


def summarise(stages: dict) -> dict:
    """One table row from a round's manifests: accuracy, pair count, stage wall times."""
    row = {"round": stages["round"], "accuracy": read_manifest(stages["evaluate"])["metrics"]["accuracy"],
           "malformed": read_manifest(stages["evaluate"])["metrics"]["malformed_rate"]}
    if "pair" in stages:
        row["pairs"] = read_manifest(stages["pair"])["counts"]["pairs"]
    for name in ("generate", "score", "pair", "train", "evaluate"):
        if name in stages:
            row[f"{name}_s"] = read_manifest(stages[name])["timings"]["total_s"]
    return row


def print_summary(summary: list[dict], run_dir: Path, parent_id: str, cfg: dict, sweep: str | None) -> None:
    columns = ["round", "accuracy", "malformed", "pairs", "generate_s", "score_s", "pair_s", "train_s", "evaluate_s"]
    print("\n" + " | ".join(f"{c:>10}" for c in columns))
    for row in summary:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:>10.3f}" if isinstance(v, float) else f"{v!s:>10}")
        print(" | ".join(cells))
    uri = cfg["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or tracking.DEFAULT_URI
    print(f"\nartifacts: {run_dir}\nMLflow parent run: {parent_id}\n"
          f"open the UI: mlflow ui --backend-store-uri {uri}")
    if sweep:
        print(f"sweep: {sweep}  (compare its runs: python -m flows.compare {sweep})")


def quiet_third_party_logs() -> None:
    """Keep the console to stage progress: no per-request HTTP lines, no weight-loading bars."""
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    for name in ("httpx", "httpcore", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def sweep_id() -> str | None:
    """Under ``-m`` (Hydra multirun) every job of one sweep shares this id (its sweep dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir).as_posix().replace("/", "_").removeprefix("multirun_")


register()


def ablation_plan(cfg: DictConfig) -> dict:
    """The experiment's ``ablation`` block, unresolved: a variant's override may hold an
    interpolation (``${seed}``) that must resolve in each of its runs, not once here."""
    return OmegaConf.to_container(cfg.ablation, resolve=False)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> None:
    quiet_third_party_logs()
    hide_user_error_tracebacks()
    try:
        validate(cfg)
        container = OmegaConf.to_container(cfg, resolve=True)
        check_available(container["model"])
        check_data(container)
        if container["ablation"]["variants"]:  # an experiment of variants x seeds (conf/experiment/*_ablation)
            from hydra.core.hydra_config import HydraConfig

            from flows.ablate import ablate

            ablate(container["experiment_name"], list(HydraConfig.get().overrides.task), ablation_plan(cfg))
            return
        with_task_runner(iterate, container)(container, sweep=sweep_id())
    except Exception as err:  # a bad model, config, dataset or a full disk: one line, no traceback
        if not is_user_error(err):
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
