"""Run one ``iterate`` flow from a resolved config file: the child process of a parallel
experiment (``ablation.workers`` > 1, flows/ablate.py).

    python -m flows.run_config <config.json> <flow run name>

The parent composes and validates the config (so a bad override fails there, once) and
writes it resolved; this process only runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m flows.run_config <config.json> <flow run name>", file=sys.stderr)
        return 2
    from flows.iterate import iterate, quiet_third_party_logs

    quiet_third_party_logs()
    cfg = json.loads(Path(argv[0]).read_text())
    iterate.with_options(name=argv[1])(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
