"""``python -m evaluation.report <experiment> [--runs-dir runs]`` (this module does the work):
rebuild an experiment's report from its run directories, print the table, write
``<runs_dir>/<experiment>/report/report.md`` with PNG charts, and log them to MLflow.

It lives in flows/ because it logs to MLflow, which evaluation/ never imports; the
table and chart code is evaluation/report.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.report import collect_runs, summarise_variants, variants_table, write_report
from tasks import tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment name (runs/<experiment>/), e.g. seva_ablation")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--no-mlflow", action="store_true", help="only write the files")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(Path(args.runs_dir), args.experiment)
        files = write_report(args.experiment, runs, Path(args.runs_dir) / args.experiment / "report")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(variants_table(summarise_variants(runs)))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    if not args.no_mlflow:
        run_id = tracking.log_comparison(tracking.client(args.tracking_uri), args.experiment, files)
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
