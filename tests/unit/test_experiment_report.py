"""Experiment reports (evaluation/report.py): statistics over seeds, paired gains, the table,
reading run directories, and refusing unfinished runs."""

import json
from pathlib import Path

import pytest
import yaml

from evaluation.report import (
    INDEX,
    collect_runs,
    mean_se,
    summarise_variants,
    variants_table,
    verdict,
    write_report,
)


def make_run(root: Path, label: str, seed: int, accuracies: list[float], method: str = "methods.seva.SeVa",
             margin: float = 1.0) -> Path:
    run = root / f"{label}-{seed}"
    run.mkdir(parents=True)
    cfg = {"label": label, "seed": seed, "rounds": len(accuracies) - 1, "method": {"_target_": method},
           "loss": {"_target_": "models.losses.DPOLoss"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for i, acc in enumerate(accuracies):
        metrics = {"accuracy": acc, "malformed_rate": 0.01 * i, "sampled/accuracy": acc - 0.1}
        (run / f"round_{i}" / "eval").mkdir(parents=True)
        (run / f"round_{i}" / "eval" / "manifest.json").write_text(json.dumps({"metrics": metrics}))
        if i:
            (run / f"round_{i}" / "pairs").mkdir()
            (run / f"round_{i}" / "pairs" / "manifest.json").write_text(json.dumps({"counts": {"pairs": 40}}))
            (run / f"round_{i}" / "checkpoint").mkdir()
            (run / f"round_{i}" / "checkpoint" / "manifest.json").write_text(json.dumps(
                {"counts": {"steps": 10}, "metrics": {"rewards/margin": margin * i}}))
    return run


def test_mean_and_standard_error():
    mean, se = mean_se([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and se == pytest.approx(0.1 / 3**0.5)
    assert mean_se([0.4])[1] != mean_se([0.4])[1]  # nan: one seed has no error estimate


def test_verdict_uses_two_standard_errors():
    assert verdict(0.05, 0.01) == "above (> 2 SE)"
    assert verdict(0.015, 0.01) == "within 2 SE"
    assert verdict(-0.03, 0.01) == "below (> 2 SE)"


def test_paired_gains_over_base_and_control(tmp_path):
    runs_root = tmp_path / "exp"
    for seed, (base, final, control) in enumerate([(0.50, 0.56, 0.54), (0.52, 0.57, 0.55), (0.48, 0.55, 0.52)]):
        make_run(runs_root, "seva", seed, [base, (base + final) / 2, final])
        make_run(runs_root, "control (seva)", seed, [base, base, control], method="methods.sft_control.ContinuedSFT")
    runs = collect_runs(tmp_path, "exp")
    rows = {r["label"]: r for r in summarise_variants(runs)}
    gain, gain_se = rows["seva"]["gain"]
    assert gain == pytest.approx((0.06 + 0.05 + 0.07) / 3)
    assert gain_se == pytest.approx(mean_se([0.06, 0.05, 0.07])[1])
    assert rows["seva"]["vs_control"][0] == pytest.approx((0.02 + 0.02 + 0.03) / 3)
    assert "vs_control" not in rows["control (seva)"]
    table = variants_table(list(rows.values()))
    assert "| seva | 3 | 0.500 ± 0.012 |" in table and "above (> 2 SE)" in table
    files = write_report("exp", runs, tmp_path / "report")
    assert files[0].read_text().count("| seva |") == 1 and all(f.exists() for f in files)
    assert {f.name for f in files} >= {"report.md", "accuracy_per_round.png", "reward_margin_per_round.png"}


def test_index_selects_the_latest_invocations_runs(tmp_path):
    root = tmp_path / "exp"
    keep = make_run(root, "seva", 0, [0.5, 0.6])
    make_run(root, "stale", 0, [0.5, 0.1])
    (root / INDEX).write_text(json.dumps({"runs": [{"run_dir": str(keep)}]}))
    assert [r["label"] for r in collect_runs(tmp_path, "exp")] == ["seva"]


def test_unfinished_runs_are_refused_not_averaged(tmp_path):
    run = make_run(tmp_path / "exp", "seva", 0, [0.5, 0.6, 0.7])
    (run / "round_2" / "eval" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="unfinished runs"):
        summarise_variants(collect_runs(tmp_path, "exp"))
    with pytest.raises(FileNotFoundError, match="experiment=nothing"):
        collect_runs(tmp_path, "nothing")


def test_pair_judge_scores_become_one_column(tmp_path):
    """The pair stage's mean judge scores of chosen / rejected (tasks/pair.judge_score_means)
    reach the table as one 'chosen / rejected' cell, averaged over seeds."""
    root = tmp_path / "exp"
    for seed, chosen in enumerate([0.6, 0.5, 0.4]):
        run = make_run(root, "seva", seed, [0.5, 0.5])
        manifest = run / "round_1" / "pairs" / "manifest.json"
        manifest.write_text(json.dumps({"counts": {"pairs": 40},
                                        "metrics": {"judge_score_chosen": chosen, "judge_score_rejected": 0.2}}))
    table = variants_table(summarise_variants(collect_runs(tmp_path, "exp")))
    assert "judge score chosen / rejected (final)" in table
    assert "| 0.50 ± 0.06 / 0.20 ± 0.00 |" in table


def test_judge_score_means_leave_out_anchors_and_unscored_pairs():
    from tasks.pair import judge_score_means

    def pair(chosen, rejected, s_c, s_r):
        return {"chosen": chosen, "rejected": rejected, "score_chosen": s_c, "score_rejected": s_r}

    pairs = [pair("a", "b", 1.0, 0.0), pair("c", "d", 0.0, 1.0), pair("a", "b", 1.0, 0.0),
             pair("e", "e", 1.0, 1.0),  # an NLL-only anchor (SeVa anchor_equal): no preference
             pair("f", "g", None, 0.0)]  # no judge score
    assert judge_score_means(pairs) == {"judge_score_chosen": pytest.approx(2 / 3),
                                        "judge_score_rejected": pytest.approx(1 / 3)}
    assert judge_score_means([]) == {}


def test_box_cot_gains_are_paired_over_base_and_against_the_controls_greedy_answers(tmp_path):
    """UV-CoT answers through its chain: the table shows the chain's accuracy from round 0 to
    the final round, its paired gain, and its final accuracy minus the control's greedy one."""
    root = tmp_path / "exp"
    for seed, (base, final, control) in enumerate([(0.43, 0.50, 0.52), (0.45, 0.51, 0.50), (0.44, 0.52, 0.53)]):
        run = make_run(root, "uvcot", seed, [0.47, 0.47, 0.47], method="methods.uvcot.UVCoT")
        for i, chain in ((0, base), (2, final)):
            manifest = run / f"round_{i}" / "eval" / "manifest.json"
            metrics = json.loads(manifest.read_text())["metrics"] | {"box_cot/accuracy": chain}
            manifest.write_text(json.dumps({"metrics": metrics}))
        make_run(root, "control (uvcot)", seed, [0.47, 0.47, control], method="methods.sft_control.ContinuedSFT")
    rows = {r["label"]: r for r in summarise_variants(collect_runs(tmp_path, "exp"))}
    gain, se = rows["uvcot"]["box_cot_gain"]
    assert gain == pytest.approx((0.07 + 0.06 + 0.08) / 3) and se == pytest.approx(mean_se([0.07, 0.06, 0.08])[1])
    assert rows["uvcot"]["box_cot_vs_control"][0] == pytest.approx((-0.02 + 0.01 - 0.01) / 3)
    assert "box_cot_gain" not in rows["control (uvcot)"]
    table = variants_table(list(rows.values()))
    assert "box-CoT final − base" in table and "box-CoT acc (final)" not in table  # one set of box-CoT columns
    uvcot_line = next(line for line in table.splitlines() if line.startswith("| uvcot |"))
    assert "0.440 ± 0.006 → 0.510 ± 0.006 | 0.070 ± 0.006 | above (> 2 SE) | -0.007 ± 0.009 | within 2 SE |" in uvcot_line
