"""An experiment of several variants x seeds, plus the continued-SFT control, and its report.

    python -m flows.iterate experiment=seva_ablation

An experiment config (conf/experiment/*.yaml) fills ``ablation``: ``variants`` maps a label
to Hydra overrides, ``seeds`` lists the seeds, ``control`` adds continued SFT on the ground
truth of the same queries (methods/sft_control.py). Every (variant, seed) is an ordinary
``iterate`` run (its own run directory, resumable, its own MLflow parent run tagged with its
label) in the experiment ``experiment_name``; a run that another experiment already finished
with the same run key (same settings and seed) is reused from there instead of recomputed.
A control runs after its variant with the variant's train settings and, round by round,
exactly its optimizer steps (``train.steps_per_round``); ``control_for`` limits which
variants get one (an ablation usually needs one, for its main variant). At the end the report
(evaluation/report.py) is printed, written to ``<runs_dir>/<experiment>/report/`` and logged
to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hydra import compose
from omegaconf import OmegaConf
from prefect import flow

from evaluation.report import (
    INDEX,
    collect_runs,
    control_label,
    summarise_variants,
    variants_table,
    write_report,
)
from flows.schema import validate
from models.progress import log
from tasks import tracking
from tasks.artifacts import read_manifest

# Overrides that choose what the control replaces: the method, its loss and their settings.
METHOD_KEYS = ("method", "loss", "+method", "+loss", "~loss", "~method")


def compose_run(overrides: list[str]) -> dict:
    cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def control_overrides(variant: list[str], variant_cfg: dict, steps: list[int]) -> list[str]:
    """Continued SFT on the same queries with the variant's train settings and, round by round,
    exactly the optimizer steps the variant took (``train.steps_per_round``)."""
    kept = [o for o in variant if not o.split("=", 1)[0].split(".", 1)[0] in METHOD_KEYS]
    train = [f"train.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in variant_cfg["train"].items()
             if k != "steps_per_round"]
    return [*kept, "method=sft_control", "loss=sft", *train, f"train.steps_per_round=[{','.join(map(str, steps))}]"]


def finished_elsewhere(cfg: dict, key: str) -> Path | None:
    """A finished run with this run key and round count in another experiment's folder, or None.

    The key hashes every setting that changes results, and runs are deterministic per seed, so
    such a run is the run this experiment would compute (e.g. ``seva_ablation``'s default
    variant is ``methods``' seva run); reusing it saves its whole cost."""
    import yaml

    for candidate in sorted(Path(cfg["runs_dir"]).glob(f"*/{key}")):
        if candidate.parent.name == cfg["experiment_name"] or not (candidate / "config.yaml").exists():
            continue
        planned = yaml.safe_load((candidate / "config.yaml").read_text())["rounds"]
        final = candidate / f"round_{cfg['rounds']}" / "eval" / "manifest.json"
        if planned == cfg["rounds"] and final.exists():
            return candidate
    return None


def steps_taken(run_dir: Path, rounds: int) -> list[int]:
    """Optimizer steps of each round of a finished run (0 for a carried-forward round)."""
    return [read_manifest(run_dir / f"round_{i}" / "checkpoint")["counts"]["steps"] for i in range(1, rounds + 1)]


@flow(name="ablate")
def ablate(experiment: str, base_overrides: list[str], ablation: dict) -> str:
    """Run every (variant, seed), then each matched control, then write the report."""
    from flows.iterate import iterate, run_key

    variants, seeds = ablation["variants"], ablation["seeds"]
    targets = list(variants) if ablation.get("control_for") is None else list(ablation["control_for"])
    unknown = sorted(set(targets) - set(variants))
    if unknown:
        raise ValueError(f"ablation.control_for names {unknown}, which are not variants ({sorted(variants)})")
    total = len(variants) * len(seeds) + (len(targets) * len(seeds) if ablation["control"] else 0)
    entries: list[dict] = []
    start = time.perf_counter()

    def run(label: str, seed: int, overrides: list[str]) -> tuple[dict, Path]:
        cfg = compose_run([*base_overrides, *overrides, f"seed={seed}", f"label='{label}'"])
        done, elapsed = len(entries), time.perf_counter() - start
        eta = f"ETA {elapsed / done * (total - done):.0f}s" if done else "ETA unknown"
        log.info("%s: run %d/%d (%s, seed %d); %.0fs so far, %s", experiment, done + 1, total, label, seed,
                 elapsed, eta)
        key = run_key(cfg)
        run_dir = Path(cfg["runs_dir"]) / cfg["experiment_name"] / key
        reused = None if (run_dir / "config.yaml").exists() else finished_elsewhere(cfg, key)
        if reused:
            log.info("%s: %s seed %d is the finished run %s (same config): reused, not re-run", experiment, label,
                     seed, reused)
            run_dir = reused
        else:
            iterate.with_options(name=f"iterate-{label}-seed{seed}")(cfg)
        entries.append({"label": label, "seed": seed, "run_dir": str(run_dir), "overrides": overrides})
        return cfg, run_dir

    finished = {(label, seed): run(label, seed, overrides) for label, overrides in variants.items() for seed in seeds}
    if ablation["control"]:
        for label in targets:
            for seed in seeds:
                cfg, run_dir = finished[(label, seed)]
                steps = steps_taken(run_dir, cfg["rounds"])
                run(control_label(label), seed, control_overrides(variants[label], cfg, steps))

    root = Path(cfg["runs_dir"]) / experiment
    (root / INDEX).write_text(json.dumps({"experiment": experiment, "runs": entries}, indent=2))
    runs = collect_runs(Path(cfg["runs_dir"]), experiment)  # reads the index just written
    files = write_report(experiment, runs, root / "report")
    print("\n" + variants_table(summarise_variants(runs)))
    client = tracking.client(cfg["tracking_uri"])
    run_id = tracking.log_comparison(client, experiment, files)
    print(f"\nreport: {files[0]}  (MLflow run {run_id}); rebuild it with: python -m evaluation.report {experiment}")
    return str(files[0])
