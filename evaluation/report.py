"""Comparison tables and charts of runs' held-out accuracy per round (no tracking imports:
callers pass plain rows, see tasks.tracking.parent_runs)."""

from __future__ import annotations

import math
from pathlib import Path


def accuracy_table(rows: list[dict]) -> str:
    """A Markdown table: one line per run, one column per round, then the final-minus-base gain."""
    rounds = sorted({r for row in rows for r in row["accuracy"]})
    header = ["run", "method", "loss", *[f"round {r}" for r in rounds], "final - base"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        acc = row["accuracy"]
        cells = [row["name"], row["method"], row["loss"]]
        cells += [f"{acc[r]:.3f}" if r in acc else "" for r in rounds]
        gain = acc[max(acc)] - acc[min(acc)] if acc else float("nan")
        cells.append(f"{gain:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_chart(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps = sorted(row["accuracy"])
        ax.plot(steps, [row["accuracy"][s] for s in steps], marker="o", label=f"{row['method']} / {row['loss']}")
    return _finish_chart(fig, ax, "held-out accuracy (greedy)", title, path)


def _finish_chart(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label a per-round chart, save it as PNG and free the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- Experiment reports: variants x seeds, read from the runs' artifact directories ---------
#
# ``python -m evaluation.report <experiment>`` (entry point below; MLflow logging is done by
# flows/report.py because evaluation/ never imports tracking code). The artifact directories are
# the source of truth: runs/<experiment>/<key>/config.yaml + round_i/{eval,pairs,checkpoint}.

INDEX = "experiment_index.json"
CONTROL = "control"  # labels of continued-SFT controls start with this (flows/ablate.py)  # written by flows/ablate.py: which run dirs the latest invocation used


def read_run(run_dir: Path, label: str | None = None) -> dict:
    """One run's per-round metrics from its manifests: {label, seed, method, rounds: {i: {...}}}.
    ``label``: the experiment's name for the run, which wins over the one in its config: a run
    reused from another experiment (flows/ablate.finished_elsewhere) carries that one's label."""
    import json

    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rounds: dict[int, dict] = {}
    for round_path in sorted(run_dir.glob("round_*")):
        index = int(round_path.name.split("_")[1])
        manifest = round_path / "eval" / "manifest.json"
        if not manifest.exists():
            continue  # an unfinished round: reported runs must be complete (checked by the caller)
        row = dict(json.loads(manifest.read_text())["metrics"])
        for stage, folder in (("pair", "pairs"), ("train", "checkpoint")):
            path = round_path / folder / "manifest.json"
            if path.exists():
                stage_manifest = json.loads(path.read_text())
                row |= {f"{stage}/{k}": v for k, v in stage_manifest.get("counts", {}).items()}
                row |= {f"{stage}/{k}": v for k, v in stage_manifest.get("metrics", {}).items()}
        rounds[index] = row
    loss_target = (cfg.get("loss") or {}).get("_target_", "")
    method = cfg["method"]["_target_"].rsplit(".", 1)[-1]
    return {"dir": str(run_dir), "label": label or cfg.get("label") or method, "seed": cfg["seed"], "method": method,
            "loss": loss_target.rsplit(".", 1)[-1], "planned_rounds": cfg["rounds"], "rounds": rounds}


def collect_runs(runs_dir: Path, experiment: str) -> list[dict]:
    """The runs of ``experiment``: those its latest ablation invocation listed, else every run dir."""
    import json

    root = Path(runs_dir) / experiment
    if not root.is_dir():
        raise FileNotFoundError(f"no runs under {root}; run `python -m flows.iterate experiment={experiment}` first "
                                "or pass --runs-dir")
    index = root / INDEX
    if index.exists():
        entries = json.loads(index.read_text())["runs"]
        return [read_run(Path(entry["run_dir"]), entry.get("label")) for entry in entries]
    return [read_run(d) for d in sorted(p for p in root.iterdir() if (p / "config.yaml").exists())]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); SE is nan for fewer than 2 values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, (var / n) ** 0.5


def control_label(variant: str) -> str:
    """The label of a variant's matched continued-SFT control."""
    return f"{CONTROL} ({variant})"


def control_of(label: str, labels: set[str]) -> str | None:
    """The continued-SFT control a variant is compared with: its own matched control
    ('control (<label>)'), else the experiment's only control; None for controls themselves."""
    if label.startswith(CONTROL):
        return None
    if control_label(label) in labels:
        return control_label(label)
    controls = [lab for lab in labels if lab.startswith(CONTROL)]
    return controls[0] if len(controls) == 1 else None


def summarise_variants(runs: list[dict]) -> list[dict]:
    """One row per label: per-round mean and SE over seeds, and for the final round the paired
    (same seed) gain over round 0 and over the variant's continued-SFT control."""
    by_label: dict[str, list[dict]] = {}
    for run in runs:
        by_label.setdefault(run["label"], []).append(run)
    finals = {label: {r["seed"]: r["rounds"][max(r["rounds"])] for r in group if r["rounds"]}
              for label, group in by_label.items()}
    rows = []
    for label, group in by_label.items():
        unfinished = [r["dir"] for r in group if not set(r["rounds"]) >= set(range(r["planned_rounds"] + 1))]
        if unfinished:
            raise ValueError(f"variant {label!r} has unfinished runs {unfinished}; re-run the experiment to finish them")
        last = min(r["planned_rounds"] for r in group)
        row = {"label": label, "method": group[0]["method"], "loss": group[0]["loss"],
               "seeds": sorted(r["seed"] for r in group), "rounds": list(range(last + 1))}
        for i in row["rounds"]:
            for metric in ("accuracy", "sampled/accuracy", "malformed_rate", "sampled/malformed_rate",
                           "pair/pairs", "train/steps", "train/rewards/margin", *PAIR_SCORES, *OPTIONAL_COLUMNS, BOX_COT):
                values = [r["rounds"][i][metric] for r in group if metric in r["rounds"][i]]
                if values:
                    row[(metric, i)] = mean_se(values)
        row["gain"] = mean_se([r["rounds"][last]["accuracy"] - r["rounds"][0]["accuracy"] for r in group])
        control = control_of(label, set(by_label))
        if control:
            row["control"] = control
            row["vs_control"] = mean_se([finals[label][s]["accuracy"] - finals[control][s]["accuracy"]
                                         for s in finals[label] if s in finals[control]])
        chain = [r for r in group if BOX_COT in r["rounds"][0] and BOX_COT in r["rounds"][last]]
        if chain:  # UV-CoT's own inference (box -> crop -> answer), paired by seed like the greedy gain
            row["box_cot_gain"] = mean_se([r["rounds"][last][BOX_COT] - r["rounds"][0][BOX_COT] for r in chain])
            if control:  # against the control's greedy answers: its own way of answering
                row["box_cot_vs_control"] = mean_se([finals[label][s][BOX_COT] - finals[control][s]["accuracy"]
                                                     for s in finals[label] if s in finals[control]
                                                     and BOX_COT in finals[label][s]])
        rows.append(row)
    return rows


# UV-CoT's inference through its chain (evaluation/boxcot.py): its gain over round 0 gets columns
# of its own, since the chain, not the direct answer, is how a UV-CoT model answers (seeds/uv-cot.txt).
BOX_COT = "box_cot/accuracy"

# Metrics some runs have (re-ranking): a column each when any variant reports them.
# Mean judge score of the final round's chosen / rejected responses (tasks/pair.judge_score_means):
# with the correctness judge, how often each side is right; one column when any variant has them.
PAIR_SCORES = ("pair/judge_score_chosen", "pair/judge_score_rejected")
OPTIONAL_COLUMNS = {"rerank/best_of_n": "best-of-N", "rerank/weighted_vote": "weighted vote",
                    "rerank/majority_vote": "majority vote"}


def verdict(mean: float, se: float) -> str:
    """Whether a paired difference is beyond 2 standard errors, in words."""
    if math.isnan(se) or se == 0:  # nan (one seed) or identical values
        return "n/a (one seed)" if math.isnan(se) else ("above" if mean > 0 else "below" if mean < 0 else "equal")
    if mean > 2 * se:
        return "above (> 2 SE)"
    if mean < -2 * se:
        return "below (> 2 SE)"
    return "within 2 SE"


def _cell(stat: tuple[float, float] | None, digits: int = 3) -> str:
    if stat is None:
        return ""
    mean, se = stat
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def variants_table(rows: list[dict]) -> str:
    """Markdown: greedy accuracy per round (mean ± SE over seeds), the final round's gain over
    round 0 and over the continued-SFT control (paired by seed), sampled accuracy, malformed
    rates, and pairs / optimizer steps / reward margin of the last round; for runs that
    evaluate UV-CoT's chain, its accuracy and gains (over round 0 and over the control's
    greedy accuracy) too."""
    rounds = max((len(r["rounds"]) for r in rows), default=0)
    header = ["variant", "seeds", *[f"round {i}" for i in range(rounds)], "final − base", "vs base",
              "final − control", "vs control", "sampled acc (0 → final)", "malformed greedy / sampled (final)",
              "pairs", "steps", "reward margin"]
    optional = [m for m in OPTIONAL_COLUMNS if any((m, r["rounds"][-1]) in r for r in rows)]
    header += [f"{OPTIONAL_COLUMNS[m]} (final)" for m in optional]
    pair_scores = any((PAIR_SCORES[0], r["rounds"][-1]) in r for r in rows)
    header += ["judge score chosen / rejected (final)"] if pair_scores else []
    chain = any("box_cot_gain" in r for r in rows)
    header += ["box-CoT acc (0 → final)", "box-CoT final − base", "vs base",
               "box-CoT final − control (greedy)", "vs control"] if chain else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        last = row["rounds"][-1]
        gain = row["gain"]
        vs = row.get("vs_control")
        sampled = f"{_cell(row.get(('sampled/accuracy', 0)))} → {_cell(row.get(('sampled/accuracy', last)))}"
        malformed = f"{_cell(row.get(('malformed_rate', last)))} / {_cell(row.get(('sampled/malformed_rate', last)))}"
        cells = [row["label"], str(len(row["seeds"])),
                 *[_cell(row.get(("accuracy", i))) for i in range(rounds)],
                 _cell(gain), verdict(*gain), _cell(vs) if vs else "", verdict(*vs) if vs else "",
                 sampled, malformed, _cell(row.get(("pair/pairs", last)), 0), _cell(row.get(("train/steps", last)), 0),
                 _cell(row.get(("train/rewards/margin", last)), 3)]
        cells += [_cell(row.get((m, last))) for m in optional]
        if pair_scores:
            chosen, rejected = (row.get((m, last)) for m in PAIR_SCORES)
            cells.append(f"{_cell(chosen, 2)} / {_cell(rejected, 2)}" if chosen else "")
        if chain:
            gain, vs = row.get("box_cot_gain"), row.get("box_cot_vs_control")
            cells += [f"{_cell(row.get((BOX_COT, 0)))} → {_cell(row.get((BOX_COT, last)))}" if gain else "",
                      _cell(gain) if gain else "", verdict(*gain) if gain else "",
                      _cell(vs) if vs else "", verdict(*vs) if vs else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_round_chart(rows: list[dict], metric: str, ylabel: str, path: Path, title: str) -> Path | None:
    """Mean ± SE of ``metric`` per round, one line per variant; None when no variant has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = 0
    for row in rows:
        points = [(i, row[(metric, i)]) for i in row["rounds"] if (metric, i) in row]
        if not points:
            continue
        xs = [i for i, _ in points]
        means = [m for _, (m, _) in points]
        errs = [0.0 if math.isnan(se) else se for _, (_, se) in points]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=row["label"])
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    return _finish_chart(fig, ax, ylabel, title, path)


def write_report(experiment: str, runs: list[dict], out_dir: Path, notes: str = "") -> list[Path]:
    """report.md (the table + charts) and the PNGs under ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise_variants(runs)
    table = variants_table(rows)
    charts = [per_round_chart(rows, "accuracy", "held-out accuracy (greedy)", out_dir / "accuracy_per_round.png",
                              f"{experiment}: greedy held-out accuracy"),
              per_round_chart(rows, "train/rewards/margin", "reward margin (final quarter of steps)",
                              out_dir / "reward_margin_per_round.png", f"{experiment}: reward margin")]
    charts = [c for c in charts if c is not None]
    seeds = sorted({r["seed"] for r in runs})
    page = [f"# {experiment}", "",
            (f"{len(runs)} runs, seeds {seeds}. Mean ± standard error over seeds. 'final − base' and "
            "'final − control' are paired by seed (same base model, pool and test set); 'vs' says whether the "
            "difference is beyond 2 standard errors. A control ('control (<variant>)') is continued SFT on the "
            "ground-truth answers of the same round queries for the same optimizer steps as its variant, round by "
            "round (SeVa Table 3). 'pairs', 'steps' and 'reward margin' (final quarter of the steps) are the final "
            "round's."), "",
            table, ""]
    if notes:
        page += [notes, ""]
    page += [f"![{c.stem}]({c.name})" for c in charts]
    report = out_dir / "report.md"
    report.write_text("\n".join(page) + "\n")
    return [report, *charts]


if __name__ == "__main__":  # the command the docs name; MLflow logging lives in flows/report.py
    import sys

    from flows.report import main

    sys.exit(main())
