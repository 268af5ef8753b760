"""Comparison tables and charts of runs' held-out accuracy per round (no tracking imports:
callers pass plain rows, see tasks.tracking.parent_runs)."""

from __future__ import annotations

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
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
