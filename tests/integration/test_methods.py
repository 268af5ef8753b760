"""Each method completes two rounds on the tiny model, end to end through the flow
(generate -> score -> pair -> train -> evaluate), with method-specific checks on the
artifacts. Add a method by adding a case to CASES."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.integration.test_iterate import compose_cfg

pytestmark = pytest.mark.slow


def _manifest(run_dir: Path, round_index: int, stage: str) -> dict:
    return json.loads((run_dir / f"round_{round_index}" / stage / "manifest.json").read_text())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_mpo(run_dir: Path, summary: list[dict]) -> None:
    counts = _manifest(run_dir, 1, "pairs")["counts"]
    assert counts["pairs"] == counts["correctness_pairs"] + counts["dropout_ntp_pairs"]
    candidates = _rows(run_dir / "round_1" / "candidates" / "candidates.jsonl")
    blind = [c for c in candidates if c["extras"].get("role") == "rejected"]
    # half the queries went through DropoutNTP, each to a pair or a counted drop
    assert len(blind) == 20
    assert counts["dropout_ntp_pairs"] + sum(counts[k] for k in ("dropped_equal", "dropped_empty",
                                                                 "dropped_no_prefix")) == len(blind)
    assert all(i["type"] == "text" for c in blind for m in c["prompt"] for i in m["content"])  # no image
    # loss=mpo: the mix's components reach the training metrics
    metrics = _manifest(run_dir, 1, "checkpoint")["metrics"]
    assert {"loss/dpo", "loss/bco", "loss/sft"} <= set(metrics), metrics


def check_yesno_rerank(run_dir: Path, summary: list[dict]) -> None:
    scores = _rows(run_dir / "round_1" / "scores" / "scores.jsonl")
    assert scores and all(0.0 <= s["score"] <= 1.0 and "p_yes" in s["score_parts"] for s in scores)
    assert _manifest(run_dir, 1, "scores")["input_paths"]["evaluator"] is None  # round 1 judge: the base
    assert _manifest(run_dir, 2, "scores")["input_paths"]["evaluator"].endswith("round_1/checkpoint")
    base = json.loads((run_dir / "round_0" / "eval" / "eval.json").read_text())
    assert not any(k.startswith("rerank/") for k in base)  # round 0 has no trained policy to verify with
    for i in (1, 2):
        table = json.loads((run_dir / f"round_{i}" / "eval" / "eval.json").read_text())
        for key in ("rerank/best_of_n", "rerank/weighted_vote", "rerank/majority_vote", "rerank/any_correct"):
            assert 0.0 <= table[key] <= 1.0, key
        assert table["rerank/n_samples"] == 4
        assert table["rerank/best_of_n"] <= table["rerank/any_correct"]


def check_rerank_final_only(run_dir: Path, summary: list[dict]) -> None:
    first = json.loads((run_dir / "round_1" / "eval" / "eval.json").read_text())
    final = json.loads((run_dir / "round_2" / "eval" / "eval.json").read_text())
    assert not any(k.startswith("rerank/") for k in first)
    assert final["rerank/n_samples"] == 4


CASES = {
    "mpo": (["method=mpo", "loss=mpo", "method.num_samples=4", "method.answerless_fraction=0.5"], check_mpo),
    "reasoner-yesno-rerank": (["method=reasoner", "judge=yesno", "method.num_samples=4",
                               "method.accuracy_band=[0.0,1.0]", "eval.rerank_samples=4"], check_yesno_rerank),
    "reasoner-rerank-final-only": (["method=reasoner", "method.num_samples=4", "method.accuracy_band=[0.0,1.0]",
                                    "eval.rerank_samples=4", "eval.rerank_final_only=true"], check_rerank_final_only),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_completes_two_rounds(case, prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    from flows.iterate import iterate, run_key

    overrides, check = CASES[case]
    cfg = compose_cfg(tiny_overrides(tmp_path, tiny_cache) + overrides + ["rounds=2"])
    summary = iterate(cfg)
    assert [row["round"] for row in summary] == [0, 1, 2]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in summary)
    check(tmp_path / "runs" / "prefloop" / run_key(cfg), summary)
