"""What every stage task shares: retry policy, component construction, queries, models.

Tasks receive the resolved config as a plain dict and paths as strings, never live objects.
Components are built from their ``_target_`` here, in one place.
"""

from __future__ import annotations

from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from prefect.cache_policies import NO_CACHE

from models.load import ModelUnavailable, load_policy, set_threads
from models.records import Query
from models.sampling import Policy
from tasks.artifacts import DiskFull


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures; a bad config, bad input, missing model or full disk fails at once."""
    try:
        state.result()
    except (ModelUnavailable, DiskFull, ValueError, KeyError, TypeError):
        return False
    except Exception:
        return True
    return True


# Directory artifacts are the source of truth for resuming, so Prefect's input-hash cache is
# off: a cached return value could point at a directory a user deleted. Results are still
# persisted so the UI shows each stage's output path.
STAGE_OPTIONS = dict(
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_user_error,
    persist_result=True,
    cache_policy=NO_CACHE,
)


def build(component_cfg: dict):
    """Instantiate a ``_target_`` config (method, loss, judge, data source).

    A component's own ValueError/TypeError (a bad option) is re-raised as itself, not wrapped
    in Hydra's InstantiationException, so it reads clearly and is not retried."""
    try:
        return instantiate(component_cfg, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, TypeError)):
            raise err.__cause__ from None
        raise


def round_queries(cfg: dict, round_index: int) -> list[Query]:
    """Round i's fresh slice of the pool: queries [(i-1)*q, i*q) (UV-CoT Algorithm 2)."""
    q = cfg["queries_per_round"]
    source = build(cfg["data"]["source"])
    return source.queries(cfg["data"]["split"], (round_index - 1) * q, round_index * q, cfg["seed"])


def eval_queries(cfg: dict) -> list[Query]:
    source = build(cfg["eval"]["source"])
    return source.queries(cfg["eval"]["split"], 0, cfg["eval"]["size"], cfg["seed"])


_cached: dict = {}


def frozen_policy(cfg: dict, checkpoint: str | None) -> Policy:
    """The policy in ``checkpoint`` (None: base) for inference; kept between stages of one
    process so generate, pair (reference pass) and the next round's generate load it once."""
    key = (checkpoint, repr(cfg["model"]))
    if _cached.get("key") != key:
        _cached.clear()
        set_threads()
        model, processor = load_policy(cfg["model"], checkpoint, trainable=False)
        _cached.update(key=key, policy=Policy(model, processor, batch_size=cfg["model"]["gen_batch_size"]))
    return _cached["policy"]


def forget_policy() -> None:
    _cached.clear()


class InjectedFault(RuntimeError):
    """Raised by fault injection (config ``fault.stage``); retried like any transient error."""


STAGES = ("generate", "score", "pair", "train", "evaluate")


def inject_fault(cfg: dict, stage: str, round_index: int, out_dir: Path) -> None:
    """Fail this stage's first attempt when ``fault.stage`` names it (off by default).

    A marker file beside the stage directory records that the fault fired, so the retry
    (or a re-run of the command) goes through."""
    fault = cfg.get("fault") or {}
    if fault.get("stage") is None:
        return
    if fault["stage"] not in STAGES:
        raise ValueError(f"fault.stage={fault['stage']!r} is not a stage; choose from {', '.join(STAGES)}")
    if fault["stage"] != stage or fault.get("round", 1) != round_index:
        return
    marker = out_dir.parent / f"{out_dir.name}.fault-injected"
    if marker.exists():
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("1")
    raise InjectedFault(f"injected fault in stage {stage!r} of round {round_index} (first attempt)")


def round_dir(run_dir: str, round_index: int) -> Path:
    return Path(run_dir) / f"round_{round_index}"
