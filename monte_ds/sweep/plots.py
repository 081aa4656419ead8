"""Box plots of a sweep, one PNG per (task, metric) with the methods side by side (paper Figs. 4-6).

Drawn on a bare matplotlib `Figure` (no pyplot state, no backend to choose) and written atomically.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from monte_ds.atomic import atomic_write_bytes
from monte_ds.sweep.stats import Score


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def plot_filename(task: str, metric: str) -> str:
    """`gsm8k`, `exact_match,strict-match` -> `gsm8k__exact_match_strict-match.png`."""
    return f"{_file_safe(task)}__{_file_safe(metric)}.png"


def _file_safe(name: str) -> str:
    return _UNSAFE_FILE_CHARS.sub("_", name).strip("_")


def box_plot(
    path: Path,
    task: str,
    metric: str,
    scores_by_method: Mapping[str, Sequence[Score]],
    higher_is_better: bool,
) -> None:
    """Boxes of the finished runs, every run drawn as a point; failed runs are counted under each box."""
    methods = list(scores_by_method)
    finished = [[s for s in scores_by_method[m] if s is not None] for m in methods]
    figure = Figure(figsize=(1.6 + 1.4 * len(methods), 3.6))
    axes = figure.subplots()
    positions = np.arange(1, len(methods) + 1)
    drawn = [(pos, values) for pos, values in zip(positions, finished) if values]
    if drawn:
        axes.boxplot(
            [values for _, values in drawn],
            positions=[pos for pos, _ in drawn],
            widths=0.5,
            whis=(0, 100),  # whiskers at best and worst: the spread of the finished runs
            medianprops={"color": "black"},
        )
    jitter = np.random.default_rng(0)  # fixed: the same sweep gives the same picture
    for pos, values in zip(positions, finished):
        axes.scatter(pos + jitter.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.7, zorder=3)
    labels = []
    for method in methods:
        n_failed = sum(s is None for s in scores_by_method[method])
        labels.append(f"{method}\n({n_failed} failed)" if n_failed else method)
    axes.set_xticks(positions, labels)
    axes.set_xlim(0.4, len(methods) + 0.6)
    axes.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    axes.set_title(task)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, dpi=110, format="png")
    atomic_write_bytes(path, png.getvalue())


def reliability_plot(path: Path, task: str, series: Sequence[Mapping]) -> None:
    """Pooled reliability diagram: accuracy against confidence per bin, one line per method (and
    MonteCLoRA's posterior-predictive), each point's area its number of items; the diagonal is
    perfect calibration."""
    figure = Figure(figsize=(5.2, 4.4))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for entry in series:
        filled = [b for b in entry["bins"] if b["count"]]
        ece = entry.get("pooled_ece")
        label = f"{entry['label']} ({entry['runs']} runs" + (f", ECE {ece:.3f})" if ece is not None else ")")
        line = axes.plot(
            [b["confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            marker="o",
            markersize=3,
            linestyle=":" if entry.get("predictive") else "-",
            label=label,
        )[0]
        total = max(sum(b["count"] for b in filled), 1)
        axes.scatter(
            [b["confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            s=[400 * b["count"] / total for b in filled],
            color=line.get_color(),
            alpha=0.25,
        )
    axes.set(
        title=f"{task}: reliability, pooled over runs",
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    axes.legend(fontsize="x-small", loc="upper left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, dpi=110, format="png")
    atomic_write_bytes(path, png.getvalue())
