"""The evaluation report's figures: retrieval recall@K curves and the training log's metrics over steps
(matplotlib, the [eval] extra, imported only when a figure is drawn)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

NOT_PLOTTED = frozenset({"step", "epoch", "world_size"})  # training-log bookkeeping, not metrics


def plot_recall_curves(retrieval: dict, path: str | Path) -> Path:
    """Recall@K against K (log scale) for both retrieval directions."""
    from matplotlib.figure import Figure

    curve = retrieval["curve"]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for key, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
        ax.plot(curve["k"], curve[key], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Retrieval over {retrieval['images']} images, {retrieval['texts']} captions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def read_training_log(path: str | Path) -> list[dict]:
    """Rows of a trainer's metrics.jsonl (given the file or its run directory); unreadable lines are left out."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def plot_training_metrics(rows: Sequence[dict], path: str | Path) -> Path:
    """One panel per logged metric against the training step, one line per split; `lr/<part>` keys share a panel."""
    from matplotlib.figure import Figure

    series: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in NOT_PLOTTED or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            panel, _, part = key.partition("/")
            label = " ".join(x for x in (str(row.get("split", "train")), part) if x)
            xs, ys = series.setdefault(panel, {}).setdefault(label, ([], []))
            xs.append(row["step"])
            ys.append(value)
    if not series:
        raise ValueError("the training log has no numeric metrics")
    labels = sorted({label for lines in series.values() for label in lines})
    columns = min(3, len(series))
    rows_n = -(-len(series) // columns)
    fig = Figure(figsize=(4.5 * columns, 3.2 * rows_n), dpi=110)
    for index, (name, lines) in enumerate(sorted(series.items())):
        ax = fig.add_subplot(rows_n, columns, index + 1)
        for label, (xs, ys) in sorted(lines.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label, color=f"C{labels.index(label) % 10}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_plots(report: dict, directory: str | Path, run_dir: str | Path | None = None) -> list[str]:
    directory = Path(directory)
    written = []
    if "retrieval" in report:
        written.append(str(plot_recall_curves(report["retrieval"], directory / "recall_at_k.png")))
    if run_dir is not None:
        written.append(str(plot_training_metrics(read_training_log(run_dir), directory / "training_metrics.png")))
    return written
