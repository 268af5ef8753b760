from pathlib import Path

import pytest

from evaluation.report import accuracy_chart, accuracy_table
from tasks.common import InjectedFault, inject_fault, retry_unless_user_error


def test_fault_fires_once_in_the_named_stage_and_round(tmp_path):
    cfg = {"fault": {"stage": "train", "round": 2}}
    out = tmp_path / "round_2" / "checkpoint"
    inject_fault(cfg, "train", 1, tmp_path / "round_1" / "checkpoint")  # other round: no fault
    inject_fault(cfg, "pair", 2, tmp_path / "round_2" / "pairs")  # other stage: no fault
    with pytest.raises(InjectedFault, match="stage 'train' of round 2"):
        inject_fault(cfg, "train", 2, out)
    inject_fault(cfg, "train", 2, out)  # the retry goes through


def test_fault_off_by_default_and_bad_stage_is_named(tmp_path):
    inject_fault({"fault": {"stage": None, "round": 1}}, "train", 1, tmp_path / "x")
    with pytest.raises(ValueError, match="fault.stage='trian' is not a stage"):
        inject_fault({"fault": {"stage": "trian", "round": 1}}, "train", 1, tmp_path / "x")


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


def test_retry_policy_retries_transient_errors_only():
    assert retry_unless_user_error(None, None, _State(InjectedFault("x")))
    assert retry_unless_user_error(None, None, _State(OSError("disk hiccup")))
    assert not retry_unless_user_error(None, None, _State(ValueError("bad config")))


ROWS = [
    {"name": "a", "method": "SeVa", "loss": "DPOLoss", "accuracy": {0: 0.5, 1: 0.55, 2: 0.6}},
    {"name": "b", "method": "Reasoner", "loss": "IPOLoss", "accuracy": {0: 0.5, 1: 0.45}},
]


def test_accuracy_table_has_rounds_and_gain():
    table = accuracy_table(ROWS).splitlines()
    assert table[0] == "| run | method | loss | round 0 | round 1 | round 2 | final - base |"
    assert table[2] == "| a | SeVa | DPOLoss | 0.500 | 0.550 | 0.600 | +0.100 |"
    assert table[3] == "| b | Reasoner | IPOLoss | 0.500 | 0.450 |  | -0.050 |"


def test_accuracy_chart_writes_png(tmp_path: Path):
    path = accuracy_chart(ROWS, tmp_path / "chart.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
