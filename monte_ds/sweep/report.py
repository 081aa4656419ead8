"""sweep.json, sweep.md and the box plots: the robustness statistics of a sweep's runs.

Pending runs (not run yet, e.g. still queued on a cluster) are listed but are not results;
failed and diverged runs are results and enter every statistic (see `stats`). Each paired test
comes with its effect size (median difference, bootstrap interval) and the minimum detectable
effect for its number of pairs, under the assumptions `EFFECT_ASSUMPTIONS` records.

Posterior-predictive metrics (`outcomes.PREDICTIVE`) exist for MonteCLoRA, the one method with a
posterior; every other method predicts with its single adapter, so its posterior-predictive score
is its ordinary one, and MonteCLoRA's K-draw average is compared with that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from monte_ds.atomic import atomic_write_json, atomic_write_text
from monte_ds.sweep.grid import Run
from monte_ds.sweep.outcomes import Metric, Outcome, Status
from monte_ds.sweep.plots import box_plot, plot_filename, reliability_plot
from monte_ds.sweep.stats import (
    ALPHA,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    POWER,
    Score,
    effect_size,
    paired_test,
    summarize,
)


SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
PLOTS_DIR = "plots"
STATUSES = get_args(Status)  # completed, diverged, failed, pending
REFERENCE_METHOD = "monteclora"
POSTERIOR_METHODS = ("monteclora",)  # methods whose adapters have a posterior to sample
EFFECT_ASSUMPTIONS = {
    "difference": "median over the matched pairs of A - B, in the metric's units; a failed run is an unbounded loss",
    "interval": f"{CONFIDENCE:.0%} percentile bootstrap of that median, {BOOTSTRAP_RESAMPLES} resamples of the pairs, "
    f"seed {BOOTSTRAP_SEED}",
    "mde": f"smallest mean difference a two-sided Wilcoxon signed-rank test at alpha = {ALPHA} detects with power "
    f"{POWER}: paired t-test formula, t with n - 1 degrees of freedom, efficiency 3/pi; the spread is the sample "
    "standard deviation of the finite paired differences; unbounded when 2 / 2^n > alpha",
    "alpha": ALPHA,
    "power": POWER,
    "confidence": CONFIDENCE,
    "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
    "bootstrap_seed": BOOTSTRAP_SEED,
}


def compared_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The (A, B) pairs of the Wilcoxon tests: MonteCLoRA against each other method when it is
    swept (the question a robustness sweep asks), else every pair of methods."""
    if REFERENCE_METHOD in methods:
        return [(REFERENCE_METHOD, method) for method in methods if method != REFERENCE_METHOD]
    return list(itertools.combinations(methods, 2))


def metric_scores(
    runs: Sequence[Run], outcomes: Mapping[str, Outcome], metric: Metric, method: str
) -> dict[tuple, Score]:
    """match key -> score of `method`'s non-pending runs; a run without the score counts as failed.
    A posterior-predictive metric of a method without a posterior is its point metric."""
    if metric.predictive and method not in POSTERIOR_METHODS:
        metric = metric.point
    return {
        run.match_key: outcomes[run.run_id].scores.get(metric)
        for run in runs
        if run.method == method and outcomes[run.run_id].status != "pending"
    }


def by_point(by_method: Mapping[str, Mapping[tuple, Score]]) -> list[dict[str, Any]]:
    """Per grid point (in grid order): each method's mean over its finished seeds, how many
    finished and how many failed; what the robustness statistics summarise, point by point."""
    points = list(dict.fromkeys(point for scores in by_method.values() for point, _ in scores))
    rows = []
    for point in points:
        cells = {}
        for method, scores in by_method.items():
            values = [score for (p, _), score in scores.items() if p == point]
            finished = [v for v in values if v is not None]
            if values:
                cells[method] = {
                    "mean": sum(finished) / len(finished) if finished else None,
                    "n": len(finished),
                    "n_failed": len(values) - len(finished),
                }
        rows.append({"point": dict(point), "methods": cells})
    return rows


def summarize_sweep(
    runs: Sequence[Run], outcomes: Mapping[str, Outcome], methods: Sequence[str]
) -> list[dict[str, Any]]:
    """Per metric: each method's summary and the paired tests of `compared_pairs`."""
    metrics = sorted(
        {metric for outcome in outcomes.values() for metric in outcome.scores},
        key=lambda m: (m.task, m.name),
    )
    sections = []
    for metric in metrics:
        by_method = {method: metric_scores(runs, outcomes, metric, method) for method in methods}
        summaries = {
            method: summarize(list(scores.values()), metric.higher_is_better).to_dict()
            | {"scores": list(scores.values())}
            for method, scores in by_method.items()
            if scores
        }
        comparisons = []
        for a, b in compared_pairs(methods):
            matched = [key for key in by_method[a] if key in by_method[b]]
            if matched:
                scores_a, scores_b = [by_method[a][k] for k in matched], [by_method[b][k] for k in matched]
                test = paired_test(scores_a, scores_b, metric.higher_is_better)
                effect = effect_size(scores_a, scores_b, metric.higher_is_better)
                comparisons.append({"a": a, "b": b, **test.to_dict(), **effect.to_dict()})
        sections.append(
            {
                "task": metric.task,
                "metric": metric.name,
                "label": metric.label,
                "higher_is_better": metric.higher_is_better,
                "plot": f"{PLOTS_DIR}/{plot_filename(metric.task, metric.name)}",
                "methods": summaries,
                "comparisons": comparisons,
                "by_point": by_point(by_method),
            }
        )
    return sections


# The calibration table's columns: (title, metric at the mean, metric posterior-predictive).
CALIBRATION_COLUMNS = (
    ("acc", "acc,none", "acc,predictive"),
    ("NLL", "nll", "nll,predictive"),
    ("ECE", "ece", "ece,predictive"),
    ("Brier", "brier", "brier,predictive"),
)


def pooled_bins(bin_lists: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Reliability bins pooled over runs: counts added, accuracy and confidence weighted by count.
    Runs binned on other edges than the first are left out."""
    edges = [(b["lower"], b["upper"]) for b in bin_lists[0]]
    same = [bins for bins in bin_lists if [(b["lower"], b["upper"]) for b in bins] == edges]
    pooled = []
    for (lower, upper), group in zip(edges, zip(*same)):
        count = sum(b["count"] for b in group)
        filled = [b for b in group if b["count"]]
        pooled.append(
            {
                "lower": lower,
                "upper": upper,
                "count": count,
                "accuracy": sum(b["count"] * b["accuracy"] for b in filled) / count if count else None,
                "confidence": sum(b["count"] * b["confidence"] for b in filled) / count if count else None,
            }
        )
    return pooled


def pooled_ece(bins: Sequence[Mapping[str, Any]]) -> float | None:
    total = sum(b["count"] for b in bins)
    if not total:
        return None
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def calibration_sections(
    runs: Sequence[Run], outcomes: Mapping[str, Outcome], methods: Sequence[str], metrics: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per multiple-choice task: each method's reliability bins pooled over its finished runs (all
    grid points and seeds; MonteCLoRA also posterior-predictive), the pooled ECE, and the medians of
    the calibration metrics from `metrics` (the summaries, failures counted as there)."""
    medians = {
        (m["task"], m["metric"], method): summary["median"] for m in metrics for method, summary in m["methods"].items()
    }
    tasks = sorted({task for outcome in outcomes.values() for task, _ in outcome.bins})
    sections = []
    for task in tasks:
        series = []
        for method in methods:
            for predictive in (False, True) if method in POSTERIOR_METHODS else (False,):
                lists = [
                    outcomes[run.run_id].bins[(task, predictive)]
                    for run in runs
                    if run.method == method and (task, predictive) in outcomes[run.run_id].bins
                ]
                if not lists:
                    continue
                bins = pooled_bins(lists)
                series.append(
                    {
                        "method": method,
                        "predictive": predictive,
                        "label": f"{method} (predictive)" if predictive else method,
                        "runs": len(lists),
                        "items": sum(b["count"] for b in bins),
                        "pooled_ece": pooled_ece(bins),
                        "medians": {
                            title: medians.get((task, pred if predictive else point, method))
                            for title, point, pred in CALIBRATION_COLUMNS
                        },
                        "bins": bins,
                    }
                )
        sections.append({"task": task, "plot": f"{PLOTS_DIR}/{plot_filename(task, 'reliability')}", "series": series})
    return sections


def build_sweep_report(
    header: Mapping[str, Any],
    runs: Sequence[Run],
    outcomes: Mapping[str, Outcome],
    methods: Sequence[str],
    run_dir: Mapping[str, Path],
) -> dict[str, Any]:
    counts = {method: dict.fromkeys(STATUSES, 0) for method in methods}
    for run in runs:
        counts[run.method][outcomes[run.run_id].status] += 1
    metrics = summarize_sweep(runs, outcomes, methods)
    return {
        **header,
        "counts": counts,
        "effect_assumptions": EFFECT_ASSUMPTIONS,
        "metrics": metrics,
        "calibration": calibration_sections(runs, outcomes, methods, metrics),
        "runs": [
            {
                "run_id": run.run_id,
                "method": run.method,
                "seed": run.seed,
                "point": dict(run.point),
                "status": outcomes[run.run_id].status,
                "detail": outcomes[run.run_id].detail,
                "output_dir": str(run_dir[run.run_id]),
                "scores": [
                    {"task": m.task, "metric": m.name, "value": value}
                    for m, value in sorted(
                        outcomes[run.run_id].scores.items(), key=lambda item: (item[0].task, item[0].name)
                    )
                ],
            }
            for run in runs
        ],
    }


def write_sweep_report(output: Path, report: dict[str, Any]) -> None:
    """sweep.json (non-finite numbers as null), sweep.md and one box plot per metric."""
    for section in report["metrics"]:
        box_plot(
            output / section["plot"],
            section["task"],
            section["label"],
            {method: summary["scores"] for method, summary in section["methods"].items()},
            section["higher_is_better"],
        )
    for section in report.get("calibration", []):
        reliability_plot(output / section["plot"], section["task"], section["series"])
    atomic_write_json(output / SWEEP_JSON, report)
    atomic_write_text(output / SWEEP_MD, markdown(report))


def markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "# Robustness sweep",
        "",
        f"`{report['command']}`",
        "",
        "| method | " + " | ".join(STATUSES) + " |",
        "|---" * (len(STATUSES) + 1) + "|",
    ]
    for method, counts in report["counts"].items():
        lines.append(f"| {method} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    if any(counts["pending"] for counts in report["counts"].values()):
        lines += ["", "Pending runs have no result yet and are left out of the statistics below."]
    lines += [
        "",
        "Failed and diverged runs rank below every finished run: they make `worst` and `spread` unbounded (∞)",
        "and `median` reads `failed` once half of a method's runs failed. Robustness is the median (paper eq. 3)",
        "where higher is better and 1/median (eq. 2) where lower is better.",
        "",
        f"Beside each Wilcoxon test: the median paired difference A − B in the metric's units with its "
        f"{CONFIDENCE:.0%} percentile-bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; "
        "a failure is an unbounded difference), and the minimum detectable effect (MDE): the mean difference that "
        f"test finds with power {POWER} at α = {ALPHA} (two-sided) for that number of pairs, taking the spread of "
        "the differences to be their sample standard deviation (finite pairs). ∞: no outcome of so few pairs "
        "can reach α. Posterior-predictive metrics: methods without a posterior predict with their one adapter.",
    ]
    for section in report["metrics"]:
        direction = "higher" if section["higher_is_better"] else "lower"
        robustness = "median" if section["higher_is_better"] else "1/median"
        lines += [
            "",
            f"## {section['task']}: {section['label']} ({direction} is better)",
            "",
            f"| method | runs | failed | best | median | robustness ({robustness}) | spread |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, s in section["methods"].items():
            cells = [
                method,
                s["n"],
                s["n_failed"],
                *(_fmt(s[k], "failed") for k in ("best", "median", "robustness")),
                _fmt(s["spread"]),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if section["comparisons"]:
            lines += [
                "",
                f"| Wilcoxon signed-rank | pairs | A better | B better | ties | W | p | median A − B "
                f"[{CONFIDENCE:.0%} CI] | MDE |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for c in section["comparisons"]:
                cells = [
                    f"A={c['a']} vs B={c['b']}",
                    c["n_pairs"],
                    c["a_better"],
                    c["b_better"],
                    c["ties"],
                    _fmt(c["statistic"]),
                    _fmt(c["p_value"]),
                    f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}]",
                    _fmt(c["mde"]),
                ]
                lines.append("| " + " | ".join(str(x) for x in cells) + " |")
        lines += _point_table(section)
        lines += ["", f"![{section['task']} {section['label']}]({section['plot']})"]
    lines += _calibration_tables(report)
    lines += _runs_table(report)
    return "\n".join(lines) + "\n"


def _point_table(section: Mapping[str, Any]) -> list[str]:
    """Methods x grid points: the mean over finished seeds (their number), failures counted."""
    rows = section.get("by_point") or []
    if not rows or not rows[0]["point"]:
        return []
    keys = list(rows[0]["point"])
    methods = list(dict.fromkeys(method for row in rows for method in row["methods"]))
    lines = [
        "",
        f"By grid point ({' / '.join(key.rsplit('.', 1)[-1] for key in keys)}): the mean over finished "
        "seeds (their number; failed runs counted apart).",
        "",
        "| method | " + " | ".join(" / ".join(row["point"].values()) for row in rows) + " |",
        "|---" * (len(rows) + 1) + "|",
    ]
    for method in methods:
        cells = []
        for row in rows:
            cell = row["methods"].get(method)
            if cell is None:
                cells.append("")
                continue
            text = f"{_fmt(cell['mean'])} ({cell['n']})" if cell["n"] else "—"
            cells.append(text + (f", {cell['n_failed']} failed" if cell["n_failed"] else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _calibration_tables(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for section in report.get("calibration", []):
        lines += [
            "",
            f"## Calibration: {section['task']}",
            "",
            "Per method over its finished runs (every grid point and seed): the medians of the calibration "
            "metrics (failed runs counted as in the sections above) and the reliability bins pooled over the "
            "runs' items, with the ECE of the pooled bins. Lower NLL, ECE and Brier are better.",
            "",
            "| method | runs | items | median "
            + " | median ".join(t for t, _, _ in CALIBRATION_COLUMNS)
            + " | pooled ECE |",
            "|---" * (4 + len(CALIBRATION_COLUMNS)) + "|",
        ]
        for series in section["series"]:
            cells = [
                series["label"],
                series["runs"],
                series["items"],
                *(_fmt(series["medians"][title], "failed") for title, _, _ in CALIBRATION_COLUMNS),
                _fmt(series["pooled_ece"]),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += ["", f"![{section['task']} reliability]({section['plot']})"]
    return lines


def _runs_table(report: Mapping[str, Any]) -> list[str]:
    columns = [(s["task"], s["metric"], f"{s['task']} {s['label']}") for s in report["metrics"]]
    lines = [
        "",
        "## Runs",
        "",
        "| run | status | " + " | ".join(title for _, _, title in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for run in report["runs"]:
        values = {(score["task"], score["metric"]): score["value"] for score in run["scores"]}
        cells = [f"`{run['run_id']}`", run["status"]] + [_fmt(values.get((task, name))) for task, name, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None, infinite: str = "∞") -> str:
    """A number for the tables; `infinite` names what an unbounded value means in its column."""
    if value is None or math.isnan(value):
        return "—"
    return infinite if math.isinf(value) else f"{value:.4g}"


def _signed(value: float | None) -> str:
    """A difference: an unbounded one keeps its sign (a failure of A or of B)."""
    if value is not None and math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    return _fmt(value)
