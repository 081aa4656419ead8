"""Robustness statistics over a hyperparameter grid (paper §3.3) and the paired rank test.

A failed or diverged run has no score but is not dropped: it ranks below every finished run
(score -inf when higher is better, +inf when lower is better). So `best` is the best finished
run, `worst` and `spread` become unbounded as soon as one run failed, the median falls on a
failure once half the runs failed, and a method whose runs all failed has no spread (nan). Non-finite results are kept as floats here and written
as JSON null by the report (with `n_failed` beside them).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy.stats import wilcoxon

Score = float | None  # None: the run failed or diverged


@dataclass(frozen=True)
class Summary:
    n: int
    n_failed: int
    best: float
    worst: float
    median: float
    robustness: float  # extrinsic: median (eq. 3); intrinsic: 1 / median (eq. 2)
    spread: float  # |best - worst|

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """Wilcoxon signed-rank test of method A against method B over matched runs."""

    n_pairs: int
    a_better: int
    b_better: int
    ties: int
    statistic: float | None  # None where the test is undefined (no untied pair)
    p_value: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _goodness(score: Score, higher_is_better: bool) -> float:
    """The score oriented so that larger is better; a failed run is -inf."""
    if score is None:
        return -math.inf
    return score if higher_is_better else -score


def summarize(scores: Sequence[Score], higher_is_better: bool) -> Summary:
    """best, worst, median, robustness and spread of one method's scores on one metric."""
    if not scores:
        raise ValueError("summarize needs at least one score")
    goodness = sorted(_goodness(score, higher_is_better) for score in scores)
    sign = 1.0 if higher_is_better else -1.0
    best, worst, median = (sign * goodness[-1], sign * goodness[0], sign * statistics.median(goodness))
    if higher_is_better:
        robustness = median
    else:
        # Intrinsic robustness (eq. 2) is for positive loss-like metrics: a failed median gives 0.
        robustness = 1.0 / median if median > 0 else math.nan
    return Summary(
        n=len(scores),
        n_failed=sum(score is None for score in scores),
        best=best,
        worst=worst,
        median=median,
        robustness=robustness,
        spread=goodness[-1] - goodness[0] if goodness[-1] > -math.inf else math.nan,
    )


def paired_test(a: Sequence[Score], b: Sequence[Score], higher_is_better: bool) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test on matched scores (same grid point and seed).

    A pair where one side failed is a difference larger than any finite one, in favour of the
    other side; a pair where both failed is a tie. Ties are dropped (scipy's "wilcox" rule).
    """
    if len(a) != len(b):
        raise ValueError("paired_test needs equally long, matched score lists")
    differences = []
    for score_a, score_b in zip(a, b):
        good_a, good_b = _goodness(score_a, higher_is_better), _goodness(score_b, higher_is_better)
        differences.append(0.0 if good_a == good_b else good_a - good_b)
    a_better = sum(d > 0 for d in differences)
    b_better = sum(d < 0 for d in differences)
    statistic = p_value = None
    if a_better + b_better:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on ties in small samples
            result = wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return PairedTest(
        n_pairs=len(differences),
        a_better=a_better,
        b_better=b_better,
        ties=len(differences) - a_better - b_better,
        statistic=statistic,
        p_value=p_value,
    )
