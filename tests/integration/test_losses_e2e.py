"""Every loss config trains one tiny end-to-end round: selectable as ``loss=<name>`` on the
command line, the round completes, the policy's weights change and the loss is finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.integration.test_iterate import compose_cfg

pytestmark = pytest.mark.slow

LOSSES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "loss").glob("*.yaml"))
# Reasoner pairs from a wide accuracy band always exist on the tiny model (multi-negative
# extras through the trainer are covered in tests/unit/test_trainer.py).
METHOD = ["method=reasoner", "method.num_samples=4", "method.accuracy_band=[0.0,1.0]"]


@pytest.mark.parametrize("loss", LOSSES)
def test_one_round_per_loss(loss, prefect_harness, tmp_path, tiny_cache, tiny_model_dir):
    from flows.iterate import iterate, run_key

    cfg = compose_cfg(tiny_overrides(tmp_path, tiny_cache) + METHOD + [f"loss={loss}", "rounds=1",
                                                                       "queries_per_round=24", "eval.size=20"])
    summary = iterate(cfg)
    assert summary[1]["pairs"] > 0
    checkpoint = tmp_path / "runs" / "prefloop" / run_key(cfg) / "round_1" / "checkpoint"
    metrics = json.loads((checkpoint / "manifest.json").read_text())["metrics"]
    assert math.isfinite(metrics["loss"])
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(checkpoint / "model.safetensors"))
    assert any(not (base[k] == trained[k]).all() for k in base), f"loss={loss} left the weights unchanged"
