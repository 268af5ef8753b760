"""An experiment of variants x seeds with the continued-SFT control (flows/ablate.py) runs every
(variant, seed) as an ordinary iterate run and writes a report whose numbers come from those
runs' artifacts; `python -m evaluation.report` rebuilds it."""

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

REASONER = ["method=reasoner", "method.num_samples=4", "method.accuracy_band=[0.0,1.0]"]


def test_variants_seeds_and_matched_control(prefect_harness, tmp_path, tiny_cache, tiny_model_dir, capsys):
    from hydra import initialize_config_module

    from evaluation.report import collect_runs
    from flows.ablate import ablate
    from flows.report import main as report_main
    from flows.schema import register

    register()
    base = [*tiny_overrides(tmp_path, tiny_cache), "rounds=1", "train.epochs=1", "experiment_name=exp_test",
            "eval.sampled_temperature=1.0"]
    ablation = {"seeds": [0, 1], "control": True, "control_for": ["reasoner"],
                "variants": {"reasoner": REASONER, "reasoner_1pair": [*REASONER, "method.max_pairs_per_query=1"]}}
    with initialize_config_module("conf", version_base="1.3"):
        report = Path(ablate("exp_test", base, ablation))

    runs = collect_runs(tmp_path / "runs", "exp_test")
    assert sorted((r["label"], r["seed"]) for r in runs) == sorted(
        (label, seed) for label in ("reasoner", "reasoner_1pair", "control (reasoner)") for seed in (0, 1))
    # the control spends, round by round, the optimizer steps its variant took
    steps = {(r["label"], r["seed"]): r["rounds"][1]["train/steps"] for r in runs}
    assert steps[("control (reasoner)", 0)] == steps[("reasoner", 0)] > 0
    control = next(r for r in runs if r["label"] == "control (reasoner)")
    assert control["method"] == "ContinuedSFT" and control["loss"] == "SFTLoss"
    pairs = json.loads((Path(control["dir"]) / "round_1" / "pairs" / "manifest.json").read_text())["counts"]
    assert pairs["pairs"] == 40  # one ground-truth pair per query of the round
    # seeds differ (each builds its own base), and the report's base column is their mean
    by_seed = {r["seed"]: r["rounds"][0]["accuracy"] for r in runs if r["label"] == "reasoner"}
    text = report.read_text()
    mean0 = sum(by_seed.values()) / 2
    assert f"| reasoner | 2 | {mean0:.3f} ± " in text
    assert "sampled" in text and (report.parent / "accuracy_per_round.png").exists()
    printed = capsys.readouterr().out
    assert "| control (reasoner) | 2 |" in printed

    assert report_main(["exp_test", "--runs-dir", str(tmp_path / "runs"), "--no-mlflow"]) == 0
    assert f"| reasoner | 2 | {mean0:.3f} ± " in capsys.readouterr().out


def test_parallel_workers_run_each_run_in_its_own_process(prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    """ablation.workers=2: runs go to child processes (flows/run_config.py) two at a time,
    report to this session's Prefect server, and the controls still match their variants'
    steps; a variant that is another's config (same run key) runs once."""
    from hydra import initialize_config_module

    from evaluation.report import collect_runs
    from flows.ablate import ablate
    from flows.schema import register

    register()
    base = [*tiny_overrides(tmp_path, tiny_cache), "rounds=1", "train.epochs=1", "experiment_name=exp_par",
            "eval.sampled_temperature=0"]
    ablation = {"seeds": [0, 1], "control": True, "control_for": ["reasoner"], "workers": 2,
                "variants": {"reasoner": REASONER, "same_again": list(REASONER)}}
    with initialize_config_module("conf", version_base="1.3"):
        ablate("exp_par", base, ablation)

    runs = collect_runs(tmp_path / "runs", "exp_par")
    assert sorted((r["label"], r["seed"]) for r in runs) == sorted(
        (label, seed) for label in ("reasoner", "same_again", "control (reasoner)") for seed in (0, 1))
    dirs = {(r["label"], r["seed"]): r["dir"] for r in runs}
    assert dirs[("same_again", 0)] == dirs[("reasoner", 0)]
    steps = {(r["label"], r["seed"]): r["rounds"][1]["train/steps"] for r in runs}
    assert steps[("control (reasoner)", 1)] == steps[("reasoner", 1)] > 0
    logs = sorted(p.name for p in (tmp_path / "runs" / "exp_par" / "logs").glob("*.log"))
    assert logs == ["control_reasoner_-seed0.log", "control_reasoner_-seed1.log", "reasoner-seed0.log",
                    "reasoner-seed1.log"]


def test_a_failing_child_run_names_its_log(tmp_path):
    from flows.ablate import run_in_child

    job = {"label": "broken", "seed": 0, "name": "iterate-broken-seed0", "cfg": {"not": "a run config"}}
    with pytest.raises(RuntimeError, match=r"iterate-broken-seed0 failed .*broken-seed0\.log"):
        run_in_child(job, env={"OMP_NUM_THREADS": "1", "PREFECT_API_URL": "http://127.0.0.1:9/api"}, log_dir=tmp_path)
    assert "Traceback" in (tmp_path / "broken-seed0.log").read_text()  # the child's own error, kept
