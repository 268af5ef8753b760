"""Judge GRPO end to end on the tiny model: two rounds of rollouts, rewards, rollout groups with
old log-probs, GRPO training (parameters change) and the judge's pairwise-accuracy metrics."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.integration.test_iterate import compose_cfg

pytestmark = pytest.mark.slow

METRICS = ("pairwise_accuracy/soft", "pairwise_accuracy/mean_at_1", "pairwise_accuracy/mean_at_3")


def test_two_rounds_of_judge_grpo(prefect_harness, tmp_path, tiny_cache, judge_tiny_model_dir):
    import datasets

    from flows.iterate import iterate, run_key
    from methods.judge_grpo import JudgeGRPO
    from tasks.common import build, frozen_policy

    overrides = tiny_overrides(tmp_path, tiny_cache) + ["method=judge_grpo", "rounds=2", "method.eval_prompts=20"]
    cfg = compose_cfg(overrides)
    summary = iterate(cfg)
    assert [row["round"] for row in summary] == [0, 1, 2]
    assert all(row["pairs"] > 0 for row in summary[1:])

    run_dir = tmp_path / "runs" / "prefloop" / run_key(cfg)
    # data=judge_pairs has its own suite (conf/data/judge_pairs.yaml), so its base is built for it
    base = load_file(str(judge_tiny_model_dir / "model.safetensors"))
    for i in (1, 2):
        trained = load_file(str(run_dir / f"round_{i}" / "checkpoint" / "model.safetensors"))
        assert [k for k in base if not (base[k] == trained[k]).all()], f"round {i} left every parameter unchanged"
        pair_manifest = json.loads((run_dir / f"round_{i}" / "pairs" / "manifest.json").read_text())
        pairs = pair_manifest["counts"]
        assert pairs["groups"] == pairs["pairs"] and pairs["format_rate"] == 1.0
        assert pair_manifest["metrics"] == {}  # rollout groups are not chosen/rejected pairs
        train = json.loads((run_dir / f"round_{i}" / "checkpoint" / "manifest.json").read_text())
        assert {"loss", "kl", "clip_fraction", "ratio"} <= set(train["metrics"])
    rows = datasets.load_from_disk(str(run_dir / "round_1" / "pairs" / "dataset"))
    assert {"completions", "rewards", "advantages", "old_logps"} <= set(rows.column_names)
    assert all(len(r["old_logps"]) == cfg["method"]["group_size"] for r in rows)

    # The judge's metrics for the trained policy.
    method = build(cfg["method"])
    assert isinstance(method, JudgeGRPO)
    metrics = method.evaluate(frozen_policy(cfg, str(run_dir / "round_2" / "checkpoint")), cfg)
    assert metrics["n/judge_pairs"] == 60
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRICS)

    # ... reported in the round's eval.json (tasks/evaluate.py merges the method's hook).
    reported = json.loads((run_dir / "round_2" / "eval" / "eval.json").read_text())
    assert reported["pairwise_accuracy/soft"] == pytest.approx(metrics["pairwise_accuracy/soft"])
