"""``python -m flows.serve [--name prefloop] [--cron '0 3 * * *'] [--limit 1] [override ...]``

Registers the Prefect deployment ``iterate-overrides/<name>`` and serves it: this process polls
the Prefect API (``PREFECT_API_URL``) and runs each flow run of the deployment in a
subprocess. The deployment has one parameter, ``overrides``: Hydra overrides exactly as on the
``python -m flows.iterate`` command line (``["method=reasoner", "rounds=4"]``). A run composes
conf/ with them, validates the result against the schemas and runs the ``iterate`` flow (as a
subflow, so each round's stages show in the UI under the run). So a run can be started from
the UI or the CLI with any overrides, scheduled (``--cron``), and re-run with others:

    prefect deployment run 'iterate-overrides/prefloop' --param overrides='["rounds=1"]'

Positional overrides given here are the deployment's defaults (used by scheduled runs and by
runs started without parameters); they are composed once at start-up, so a typo fails here,
not at 3 a.m. Relative paths in the config (runs_dir, the default sqlite tracking URI) are
relative to this process's working directory.
"""

from __future__ import annotations

import argparse
import os
import sys

# Forward the library's progress logger to Prefect's run logs (read when prefect is imported).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "prefloop")

from omegaconf import OmegaConf
from prefect import flow

from flows.checks import check_data
from flows.iterate import iterate, quiet_third_party_logs
from flows.runners import with_task_runner
from flows.schema import ConfigError, register, validate
from models.load import check_available

FLOW_NAME = "iterate-overrides"
DEPLOYMENT_NAME = "prefloop"


def compose_config(overrides: list[str]) -> dict:
    """conf/ composed with Hydra overrides, validated, resolved to a plain dict (what
    ``python -m flows.iterate`` passes to the flow). Bad overrides raise ConfigError."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_module("conf", version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        validate(cfg)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"overrides {list(overrides)} do not compose: {err}") from None


def preflight(cfg: dict) -> None:
    """Fail in seconds, before any stage, on an unreachable model or a dataset that cannot be
    read as configured (path, split, columns; flows/checks.py)."""
    check_available(cfg["model"])
    check_data(cfg)


@flow(name=FLOW_NAME, log_prints=True)
def iterate_overrides(overrides: list[str] | None = None) -> list[dict]:
    """Compose conf/ with Hydra ``overrides`` (as on the command line) and run ``iterate``."""
    quiet_third_party_logs()
    cfg = compose_config(overrides or [])
    preflight(cfg)
    return with_task_runner(iterate, cfg)(cfg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description=f"Serve the '{FLOW_NAME}' Prefect deployment: runs of it take a list of Hydra overrides.")
    parser.add_argument("overrides", nargs="*",
                        help="default overrides of the deployment (a run's own 'overrides' parameter replaces them)")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (default: %(default)s)")
    parser.add_argument("--cron", default=None, help="run on this cron schedule with the default overrides, "
                        "e.g. '0 3 * * *' (server time zone UTC)")
    parser.add_argument("--limit", type=int, default=1,
                        help="flow runs this process executes at once (default %(default)s: a run uses every core)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        compose_config(args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # Import the flow by its module path, not from __main__, so Prefect's runner re-imports it by
    # reference in the subprocess that executes each run.
    from flows.serve import iterate_overrides as served

    served.serve(
        name=args.name,
        cron=args.cron,
        parameters={"overrides": list(args.overrides)},
        limit=args.limit,
        tags=["prefloop"],
        description="PrefLoop's iterate flow with Hydra overrides, e.g. overrides=[\"method=reasoner\", \"rounds=4\"].",
    )


if __name__ == "__main__":
    main()
