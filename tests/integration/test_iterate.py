"""The whole loop on the tiny model: rounds run, parameters change, MLflow gets the metrics,
and a SIGKILLed run resumes without recomputing finished stages."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def compose_cfg(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from flows.schema import register, validate

    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


REASONER = ["method=reasoner", "method.num_samples=4", "method.accuracy_band=[0.0,1.0]"]


def test_two_rounds_change_parameters_and_reach_mlflow(prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from flows.iterate import iterate, run_key

    cfg = compose_cfg(tiny_overrides(tmp_path, tiny_cache) + REASONER + ["rounds=2"])
    summary = iterate(cfg)
    assert [row["round"] for row in summary] == [0, 1, 2]
    assert all(row["pairs"] > 0 for row in summary[1:])

    run_dir = tmp_path / "runs" / "prefloop" / run_key(cfg)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(run_dir / "round_1" / "checkpoint" / "model.safetensors"))
    changed = [k for k in base if not (base[k] == trained[k]).all()]
    assert changed, "training left every parameter unchanged"

    client = MlflowClient(cfg["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("prefloop").experiment_id])
    parents = [r for r in runs if r.data.tags.get("prefloop.kind") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.data.tags["prefloop.round"] for r in children) == ["0", "1", "2"]
    round_1 = next(r for r in children if r.data.tags["prefloop.round"] == "1")
    for metric in ("eval/accuracy", "eval/accuracy/colour", "train/loss", "train/rewards/accuracy",
                   "train/rewards/margin", "count/pairs", "count/candidates", "time/train_s", "time/generate_s",
                   "pair/judge_score_chosen", "pair/judge_score_rejected"):
        assert metric in round_1.data.metrics, metric
    # correctness pairs: every chosen answer is right, every rejected one wrong
    assert (round_1.data.metrics["pair/judge_score_chosen"], round_1.data.metrics["pair/judge_score_rejected"]) == (1, 0)
    history = client.get_metric_history(parents[0].info.run_id, "eval/accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(round_1.info.run_id)} >= {"eval", "pairs", "checkpoint"}

    # Same config again: every stage is skipped, MLflow gets no duplicate runs.
    again = iterate(cfg)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in summary]
    runs_after = client.search_runs([parents[0].info.experiment_id])
    assert len(runs_after) == len(runs)


def test_zero_pair_round_carries_policy_forward(prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    """Bad input case 9 (tests/unit/test_bad_input.py): the round is recorded with zero pairs
    (manifests, MLflow round metrics, a log line) and the policy is carried forward."""
    from mlflow.tracking import MlflowClient

    from flows.iterate import iterate, run_key

    # An empty accuracy band keeps no query: the round yields zero pairs.
    cfg = compose_cfg(tiny_overrides(tmp_path, tiny_cache) + ["method=reasoner", "method.num_samples=2",
                                                              "method.accuracy_band=[2.0,3.0]", "rounds=1"])
    # Listen on the prefloop logger itself: which console stream Prefect's handler holds depends
    # on which earlier test configured logging first.
    records: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = records.append
    logging.getLogger("prefloop").addHandler(listener)
    try:
        summary = iterate(cfg)
    finally:
        logging.getLogger("prefloop").removeHandler(listener)
    assert summary[1]["pairs"] == 0
    logged = "\n".join(r.getMessage() for r in records)
    assert "round 1 yielded zero preference pairs" in logged and "carried forward unchanged" in logged
    checkpoint = tmp_path / "runs" / "prefloop" / run_key(cfg) / "round_1" / "checkpoint"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 0, "steps": 0, "carried_forward": 1}
    assert json.loads((checkpoint / "policy.json").read_text())["path"] == str(tiny_model_dir)
    assert summary[1]["accuracy"] == summary[0]["accuracy"]

    client = MlflowClient(cfg["tracking_uri"])
    experiment = client.get_experiment_by_name("prefloop").experiment_id
    (round_1,) = client.search_runs([experiment], "tags.`prefloop.round` = '1'")
    metrics = round_1.data.metrics
    assert metrics["count/pairs"] == 0 and metrics["count/carried_forward"] == 1 and metrics["count/steps"] == 0
    assert "train/loss" not in metrics and "eval/accuracy" in metrics


def _finished(run_dir: Path) -> dict[str, str]:
    return {str(m.parent.relative_to(run_dir)): json.loads(m.read_text())["finished_at"]
            for m in run_dir.glob("round_*/*/manifest.json")}


def _accuracies(run_dir: Path) -> list[float]:
    return [json.loads((run_dir / f"round_{i}" / "eval" / "eval.json").read_text())["accuracy"] for i in range(3)]


KILL_OVERRIDES = REASONER + ["rounds=2", "queries_per_round=200", "train.max_steps=100"]
KILL_POINTS = {
    "during-generate": ("round_1/candidates.tmp-*", 0.3),
    "between-stages": ("round_1/scores/manifest.json", 0.0),
    "during-train": ("round_2/checkpoint.tmp-*", 1.0),
}


def _command(tmp_path: Path, tiny_cache: Path) -> list[str]:
    return [sys.executable, "-m", "flows.iterate", *tiny_overrides(tmp_path, tiny_cache), *KILL_OVERRIDES,
            "queries_per_round=200"]


def _env() -> dict:
    from prefect.settings import get_current_settings

    return os.environ | {"PREFECT_API_URL": str(get_current_settings().api.url)}


@pytest.fixture(scope="module")
def uninterrupted(prefect_harness, tmp_path_factory, tiny_cache, tiny_model_dir) -> list[float]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(_command(tmp, tiny_cache), cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp / "runs" / "prefloop").iterdir()
    return _accuracies(run_dir)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_resumes_without_recomputing(point, uninterrupted, tmp_path, tiny_cache):
    pattern, wait_s = KILL_POINTS[point]
    command = _command(tmp_path, tiny_cache)
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    hit = []
    while time.time() < deadline and proc.poll() is None and not hit:
        hit = list((tmp_path / "runs").glob(f"prefloop/*/{pattern}"))
        time.sleep(0.01)
    assert hit, f"the run never reached {pattern}"
    time.sleep(wait_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = next((tmp_path / "runs" / "prefloop").iterdir())
    before = _finished(run_dir)
    assert "round_2/eval" not in before, "the run finished before it was killed"

    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _finished(run_dir)
    assert {k: after[k] for k in before} == before, "a finished stage was recomputed"
    assert not list(run_dir.glob("round_*/*.tmp-*"))
    assert _accuracies(run_dir) == uninterrupted
