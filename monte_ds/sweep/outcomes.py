"""What one training run of the sweep produced, read back from its output dir.

A run is *finished* when `metrics.json` says completed (and, when its config asks for an
evaluation, `report/report.json` exists with every suite completed) or diverged: both are results and a restart skips
them. Anything else is *pending* before the run is launched and *failed* after it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monte_ds import run_folder
from monte_ds.evaluation.report import REPORT_JSON, metric_rows
from monte_ds.run_folder import COMPLETED, CONFIG_JSON, DIVERGED, METRICS_JSON, REPORT_DIR, read_json


# A run's own statuses (run_folder's), and the sweep's for a run without one.
Status = Literal[run_folder.Status, "failed", "pending"]
# The calibration metrics of multiple-choice tasks (all lower is better), at the adapter's mean
# under their own names; averaged over posterior draws as "<name>,predictive" (with "acc").
CALIBRATION = ("nll", "ece", "brier")
PREDICTIVE = "predictive"


@dataclass(frozen=True)
class Metric:
    task: str
    name: str  # lm-eval's "metric,filter" key, or a calibration metric
    higher_is_better: bool

    @property
    def label(self) -> str:
        metric, _, filter_name = self.name.partition(",")
        return metric if filter_name in ("", "none") else f"{metric} ({filter_name})"

    @property
    def predictive(self) -> bool:
        """Scored on the posterior-predictive average of MonteCLoRA's draws."""
        return self.name.partition(",")[2] == PREDICTIVE

    @property
    def point(self) -> Metric:
        """The same quantity at the adapter's mean (lm-eval's acc, the calibration metrics)."""
        base = self.name.partition(",")[0]
        return Metric(self.task, f"{base},none" if base == "acc" else base, self.higher_is_better)


@dataclass
class Outcome:
    status: Status
    scores: dict[Metric, float] = field(default_factory=dict)
    detail: str = ""  # why a run failed
    # (task, predictive) -> the reliability-diagram bins of a multiple-choice task: at the
    # adapter's mean (False) and, where evaluated, posterior-predictive (True).
    bins: dict[tuple[str, bool], list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in (COMPLETED, DIVERGED)


def read_outcome(run_dir: Path) -> Outcome:
    """The run's result, or pending when it has not produced one (never launched, or interrupted)."""
    metrics = run_folder.read_metrics(run_dir)
    if metrics is None:
        return Outcome("pending", detail=f"no {METRICS_JSON}")
    if metrics.get("status") == DIVERGED:
        return Outcome(DIVERGED, detail=f"loss diverged at step {metrics.get('global_step')}")
    if metrics.get("status") != COMPLETED:
        return Outcome("pending", detail=f"{METRICS_JSON} status {metrics.get('status')!r}")
    if not _evaluation_configured(run_dir):
        return Outcome(COMPLETED)
    report = read_json(run_dir / REPORT_DIR / REPORT_JSON)
    if report is None:
        return Outcome("pending", detail=f"training completed but no {REPORT_DIR}/{REPORT_JSON}")
    # An interrupted evaluation leaves a report whose unfinished suites say so (partial, failed):
    # their scores are missing, so the run is not a result yet.
    unfinished = sorted(
        name for name, suite in (report.get("suites") or {}).items() if suite.get("status") != COMPLETED
    )
    if unfinished:
        return Outcome("pending", detail=f"evaluation not complete ({', '.join(unfinished)})")
    return Outcome(COMPLETED, report_scores(report), bins=report_bins(report))


def report_bins(report: dict[str, Any]) -> dict[tuple[str, bool], list[dict[str, Any]]]:
    """The reliability bins of an evaluation report, at the mean and posterior-predictive."""
    found = {}
    for predictive, tasks in (
        (False, report.get("calibration")),
        (True, (report.get("predictive") or {}).get("tasks")),
    ):
        for task, calibration in (tasks or {}).items():
            if isinstance(calibration.get("bins"), list):
                found[(task, predictive)] = calibration["bins"]
    return found


def report_scores(report: dict[str, Any]) -> dict[Metric, float]:
    """Every metric of an evaluation report: lm-eval's results, the calibration metrics and,
    where the report has them, their posterior-predictive counterparts (with the accuracy)."""
    lm_eval = report["lm_eval"]
    scores = {}
    for task, results in lm_eval["results"].items():
        direction = lm_eval.get("higher_is_better", {}).get(task, {})
        for metric, filter_name, value, _ in metric_rows(results):
            if _is_number(value):
                scores[Metric(task, f"{metric},{filter_name}", bool(direction.get(metric, True)))] = float(value)
    for task, calibration in (report.get("calibration") or {}).items():
        for name in CALIBRATION:
            if _is_number(calibration.get(name)):
                scores[Metric(task, name, higher_is_better=False)] = float(calibration[name])
    for task, calibration in ((report.get("predictive") or {}).get("tasks") or {}).items():
        for name in ("acc", *CALIBRATION):
            if _is_number(calibration.get(name)):
                scores[Metric(task, f"{name},{PREDICTIVE}", higher_is_better=name == "acc")] = float(calibration[name])
    return scores


def _evaluation_configured(run_dir: Path) -> bool:
    config = read_json(run_dir / CONFIG_JSON) or {}
    return bool((config.get("eval") or {}).get("suites"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
