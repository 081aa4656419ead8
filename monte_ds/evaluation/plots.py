"""The report's figures: reliability diagrams and training curves (matplotlib, no pyplot state)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from monte_ds.errors import UserError
from monte_ds.monteclora.engine import REGULARISER_TERMS


# What the trainer logs and the report plots: the task loss and each regulariser term.
TRAINING_SERIES = ("loss", *REGULARISER_TERMS)


def read_log_history(path: str | Path) -> list[dict[str, Any]]:
    """The HF Trainer `log_history` from a JSON file (the trainer's metrics.json)."""
    path = Path(path)
    try:
        history = json.loads(path.read_text())["log_history"]
    except FileNotFoundError:
        raise UserError(f"no such file {path}", key="training_log") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a JSON object with a log_history list ({err})", key="training_log") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise UserError(f"{path}: log_history must be a list of objects", key="training_log")
    return history


def training_curves(history: list[dict[str, Any]]) -> Figure | None:
    """One panel per logged series (scales differ by orders of magnitude); None if none was logged."""
    series = {
        name: [(entry["step"], entry[name]) for entry in history if name in entry and "step" in entry]
        for name in TRAINING_SERIES
    }
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    figure, grid = _grid(len(series), max_cols=3, panel_size=(4.0, 3.0))
    for axes, (name, points) in zip(grid, series.items()):
        steps, values = zip(*points)
        axes.plot(steps, values, marker="." if len(points) < 50 else None)
        axes.set(title=name, xlabel="step")
    return figure


def reliability_diagram(
    calibrations: dict[str, dict[str, Any]], predictive: dict[str, dict[str, Any]] | None
) -> Figure:
    """Per task: accuracy against confidence per bin, against the diagonal of perfect calibration."""
    figure, grid = _grid(len(calibrations), max_cols=4, panel_size=(3.4, 3.4))
    for axes, (task, calibration) in zip(grid, calibrations.items()):
        series = [("mean", calibration)] + ([("predictive", predictive[task])] if predictive else [])
        width = 1.0 / len(calibration["bins"]) / len(series)
        for offset, (label, cal) in enumerate(series):
            bins = [b for b in cal["bins"] if b["count"]]
            bars = axes.bar(
                [b["lower"] + width * (offset + 0.5) for b in bins],
                [b["accuracy"] for b in bins],
                width=width,
                alpha=0.7,
                label=f"{label} (ECE {cal['ece']:.3f})",
            )
            # The count makes a bin with accuracy 0 visible and shows how much each bar weighs.
            axes.bar_label(bars, labels=[str(b["count"]) for b in bins], fontsize="x-small")
        axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        axes.set(title=task, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.08))
        axes.legend(fontsize="small", loc="upper left")
    return figure


def _grid(panels: int, max_cols: int, panel_size: tuple[float, float]) -> tuple[Figure, list[Any]]:
    """A figure with `panels` axes in rows of at most `max_cols`; spare cells are hidden."""
    n_cols = min(max_cols, panels)
    n_rows = math.ceil(panels / n_cols)
    figure = Figure(figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows), layout="constrained")
    grid = list(figure.subplots(n_rows, n_cols, squeeze=False).ravel())
    for axes in grid[panels:]:
        axes.set_axis_off()
    return figure, grid[:panels]
