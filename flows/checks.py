"""Bad input at the command line: fail before any stage, and print one message, not a traceback.

``check_data`` reads each data source's layout (path or hub id, split, mapped columns) before
the flow starts, so a misspelt column fails in seconds rather than after the model is built.

``USER_ERRORS`` are the exceptions whose message already names the problem and the fix (a
missing model, a bad config, an unreadable dataset, a full disk). ``python -m flows.iterate``
prints such an error as one ``error: ...`` line and exits 2; ``hide_user_error_tracebacks``
keeps Prefect's failed-task and failed-flow log lines to that message too (any other error
keeps its traceback: it is a bug to report).
"""

from __future__ import annotations

import errno
import logging

from evaluation.suites.hf import DataUnavailable
from flows.schema import ConfigError
from models.load import ModelUnavailable
from tasks.artifacts import DiskFull

USER_ERRORS = (ModelUnavailable, ConfigError, DataUnavailable, DiskFull)
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def check_data(cfg: dict) -> None:
    """Build the ``data`` and ``eval`` query sources and check that their split can be read
    (sources with a ``check(split)`` method: data=hf / eval=hf). Raises ConfigError naming
    the group, e.g. ``data.source: column 'label' (source.columns.answer) is not in ...``."""
    from tasks.common import build

    for group in ("data", "eval"):
        try:
            source = build(cfg[group]["source"])
            if hasattr(source, "check"):
                source.check(cfg[group]["split"])
        except (ValueError, TypeError) as err:  # DataUnavailable, or the source's own option check
            raise ConfigError(f"{group}.source: {err}") from None


def is_user_error(err: BaseException) -> bool:
    """True for errors whose message is the whole story: USER_ERRORS and any "no space left"."""
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno == errno.ENOSPC)


def user_message(err: BaseException) -> str:
    """The one line the CLI prints for a user error."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:  # outside a stage (DiskFull has its own)
        return (f"disk full: {err}. Free space (or point runs_dir=... at a larger disk) and re-run the same "
                "command: finished stages are kept.")
    return str(err)


class _UserErrorWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def hide_user_error_tracebacks() -> None:
    """Drop the traceback from Prefect's log line for a task or flow that failed with a user
    error; the line keeps the error's message. Idempotent."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorWithoutTraceback())
