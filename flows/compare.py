"""``python -m flows.compare <sweep id | experiment name> [--out DIR]``

Prints the held-out accuracy per round of every parent run of a sweep (the id printed by a
``-m`` run, also the ``prefloop.sweep`` tag) or of an experiment, writes the table as
Markdown and a PNG chart of accuracy per round, and logs both to MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.report import accuracy_chart, accuracy_table
from tasks import tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("selector", help="a sweep id (tag prefloop.sweep) or an MLflow experiment name")
    parser.add_argument("--out", default="outputs/compare", help="where to write the table and chart")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)

    client = tracking.client(args.tracking_uri)
    rows = tracking.parent_runs(client, args.selector)
    if not rows:
        print(f"error: no PrefLoop runs found for {args.selector!r} (neither an experiment name nor a "
              "sweep id); list sweeps with the prefloop.sweep tag in the MLflow UI", file=sys.stderr)
        return 2
    table = accuracy_table(rows)
    print(table)
    out = Path(args.out) / args.selector
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(table + "\n")
    chart = accuracy_chart(rows, out / "accuracy_per_round.png", f"held-out accuracy: {args.selector}")
    run_id = tracking.log_comparison(client, args.selector, [out / "accuracy.md", chart])
    print(f"\nwrote {out / 'accuracy.md'} and {chart}; logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
