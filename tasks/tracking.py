"""MLflow tracking: one parent run per experiment (config key), one nested run per round.

The only module that imports mlflow. Everything is logged from finished stage manifests,
so tracking is idempotent: re-running a finished experiment finds its parent run by the
``prefloop.key`` tag and its round runs by ``prefloop.round``, and logs nothing twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.artifacts import read_jsonl, read_manifest

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_CHECKPOINT_MB = 200  # bigger full checkpoints stay on disk; their policy.json is logged


def client(uri: str | None) -> MlflowClient:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def experiment_id_for(c: MlflowClient, name: str) -> str:
    """The MLflow experiment ``name``, created if missing. Parallel runs of one experiment
    (ablation.workers > 1) may both find it missing: the one whose create loses reads the
    winner's."""
    experiment = c.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException:
        experiment = c.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_experiment(c: MlflowClient, cfg: dict, key: str, run_dir: Path, sweep: str | None = None) -> str:
    """The parent run of this experiment key: found if it exists, else created with params.
    ``sweep`` tags the run with the Hydra multirun it belongs to (latest sweep wins)."""
    experiment_id = experiment_id_for(c, cfg["experiment_name"])
    found = c.search_runs([experiment_id], f"tags.`prefloop.key` = '{key}' and tags.`prefloop.kind` = 'parent'")
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        if sweep:
            c.set_tag(run_id, "prefloop.sweep", sweep)
        return run_id
    name = cfg.get("label") or cfg["method"]["_target_"].split(".")[-1]
    run = c.create_run(experiment_id, run_name=f"{name}-seed{cfg['seed']}-{key}",
                       tags={"prefloop.key": key, "prefloop.kind": "parent", "prefloop.run_dir": str(run_dir),
                             **({"prefloop.sweep": sweep} if sweep else {}),
                             **({"prefloop.label": cfg["label"]} if cfg.get("label") else {})})
    params = flatten(cfg)
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        c.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]])
    c.log_artifact(run.info.run_id, str(run_dir / "config.yaml"))
    return run.info.run_id


def _round_run(c: MlflowClient, parent_id: str, round_index: int):
    parent = c.get_run(parent_id)
    query = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`prefloop.round` = '{round_index}'"
    found = c.search_runs([parent.info.experiment_id], query)
    if found:
        return found[0]
    return c.create_run(parent.info.experiment_id, run_name=f"round_{round_index}",
                        tags={"mlflow.parentRunId": parent_id, "prefloop.round": str(round_index)})


def _metric(name: str, value, step: int, timestamp: int = 0):
    import time

    return mlflow.entities.Metric(name, float(value), timestamp or int(time.time() * 1000), step)


def log_round(c: MlflowClient, parent_id: str, round_index: int, stages: dict[str, str]) -> None:
    """Log one finished round from its stage directories (skipped if already logged)."""
    run = _round_run(c, parent_id, round_index)
    run_id = run.info.run_id
    if run.data.tags.get("prefloop.logged") == "1":
        return
    metrics = []
    manifests = {name: read_manifest(path) for name, path in stages.items()}
    for name, manifest in manifests.items():
        metrics.append(_metric(f"time/{name}_s", manifest["timings"]["total_s"], round_index))
        for count, value in manifest.get("counts", {}).items():
            metrics.append(_metric(f"count/{count}", value, round_index))
    evaluation = manifests["evaluate"]["metrics"]
    for name, value in evaluation.items():
        metrics.append(_metric(f"eval/{name}", value, round_index))
    for name, value in manifests.get("pair", {}).get("metrics", {}).items():
        metrics.append(_metric(f"pair/{name}", value, round_index))
    if "train" in manifests:
        for name, value in manifests["train"].get("metrics", {}).items():
            metrics.append(_metric(f"train/{name}", value, round_index))
        log_file = Path(stages["train"]) / "train_log.jsonl"
        if log_file.exists():
            for row in read_jsonl(log_file):
                metrics += [_metric(f"step/{k}", v, row["step"]) for k, v in row.items() if k != "step"]
    for start in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[start : start + 1000])
    # The parent carries the headline curves, step = round, for side-by-side comparison.
    c.log_batch(parent_id, metrics=[_metric(f"eval/{k}", v, round_index) for k, v in evaluation.items()
                                     if k.startswith(("accuracy", "box_cot/accuracy", "box_cot/box_iou", "rerank/", "pairwise"))
                                     or k == "malformed_rate"])
    c.log_artifact(run_id, str(Path(stages["evaluate"]) / "eval.json"), "eval")
    c.log_artifact(run_id, str(Path(stages["evaluate"]) / "predictions.jsonl"), "eval")
    if "pair" in stages:
        c.log_artifact(run_id, str(Path(stages["pair"]) / "preview.jsonl"), "pairs")
    if "train" in stages:
        _log_checkpoint(c, run_id, Path(stages["train"]))
    c.set_tag(run_id, "prefloop.logged", "1")
    c.set_terminated(run_id, "FINISHED")


def _log_checkpoint(c: MlflowClient, run_id: str, checkpoint: Path) -> None:
    """Adapters (and small full models) are logged as files; mlflow.transformers.log_model
    does not handle LLaVA + LoRA."""
    files = [p for p in checkpoint.iterdir() if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    for path in files:
        if size_mb <= MAX_CHECKPOINT_MB or path.suffix in (".json", ".jsonl"):
            c.log_artifact(run_id, str(path), "checkpoint")


def finish_experiment(c: MlflowClient, parent_id: str, summary: list[dict]) -> None:
    c.log_dict(parent_id, {"rounds": summary}, "summary.json")
    c.set_terminated(parent_id, "FINISHED")


def parent_runs(c: MlflowClient, selector: str) -> list[dict]:
    """Parent runs of a sweep id or an experiment name, with their per-round accuracy curves.

    Returns [{"run_id", "name", "method", "loss", "sweep", "accuracy": {round: value}}]."""
    experiments = c.search_experiments()
    by_name = [e for e in experiments if e.name == selector]
    ids = [e.experiment_id for e in (by_name or experiments)]
    query = "tags.`prefloop.kind` = 'parent'"
    if not by_name:
        query += f" and tags.`prefloop.sweep` = '{selector}'"
    rows = []
    for run in c.search_runs(ids, query, order_by=["attributes.start_time ASC"]):
        history = c.get_metric_history(run.info.run_id, "eval/accuracy")
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "method": run.data.params.get("method._target_", "?").rsplit(".", 1)[-1],
            "loss": run.data.params.get("loss._target_", "?").rsplit(".", 1)[-1],
            "sweep": run.data.tags.get("prefloop.sweep", ""),
            "accuracy": {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)},
        })
    return rows


def log_comparison(c: MlflowClient, selector: str, files: list[Path]) -> str:
    """Log comparison outputs (table, chart) to a run named ``compare-<selector>``."""
    experiment = c.get_experiment_by_name(selector)
    experiment_id = experiment.experiment_id if experiment else c.get_experiment_by_name("Default").experiment_id
    run = c.create_run(experiment_id, run_name=f"compare-{selector}", tags={"prefloop.kind": "comparison"})
    for path in files:
        c.log_artifact(run.info.run_id, str(path))
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
