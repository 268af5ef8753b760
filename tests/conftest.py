"""Shared fixtures. The tiny model is built once per test session with few SFT steps (~15 s),
into a session temp dir; tests that need a model reuse it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small, fast builds: the architecture of the embedded default, far fewer SFT steps.
TEST_TINY = {"sft_steps": 60, "sft_queries": 600, "check_queries": 50}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache) -> Path:
    from models.tiny import TinySpec, ensure_tiny

    # The same spec the flow builds from tiny_overrides: the model's suite is the data suite.
    from omegaconf import OmegaConf

    suite = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "shapes.yaml").source.suite)
    return ensure_tiny(TinySpec(**TEST_TINY, suite=suite), tiny_cache)


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    return frozen_tiny(tiny_model_dir)


def frozen_tiny(model_dir: Path):
    """(model, processor) of a built tiny model, frozen, on CPU."""
    from models.load import load_policy

    cfg = {"name_or_path": str(model_dir), "dtype": "float32", "device": "cpu", "lora": {"enabled": False}}
    return load_policy(cfg, None, trainable=False)


@pytest.fixture(scope="session")
def judge_tiny_model_dir(tiny_cache) -> Path:
    """The tiny model built for data=judge_pairs' suite (conf/data/judge_pairs.yaml: the suite's
    defaults), the base a judge_grpo run starts from."""
    from models.tiny import TinySpec, ensure_tiny

    return ensure_tiny(TinySpec(**TEST_TINY), tiny_cache)


@pytest.fixture(scope="session")
def judge_tiny_policy(judge_tiny_model_dir):
    return frozen_tiny(judge_tiny_model_dir)


def tiny_overrides(tmp_path: Path, tiny_cache: Path) -> list[str]:
    """Hydra overrides for a fast end-to-end run writing only under tmp_path."""
    return [
        f"runs_dir={tmp_path / 'runs'}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"model.cache_dir={tiny_cache}",
        *(f"model.tiny.{k}={v}" for k, v in TEST_TINY.items()),
        "queries_per_round=40",
        "eval.size=60",
    ]


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "prefloop")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs 8-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
