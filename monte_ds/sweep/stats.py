"""Robustness statistics over a hyperparameter grid (paper §3.3) and the paired rank test.

A failed or diverged run has no score but is not dropped: it ranks below every finished run
(score -inf when higher is better, +inf when lower is better). So `best` is the best finished
run, `worst` and `spread` become unbounded as soon as one run failed, the median falls on a
failure once half the runs failed, and a method whose runs all failed has no spread (nan). Non-finite results are kept as floats here and written
as JSON null by the report (with `n_failed` beside them).

Beside the test's p-value, `effect_size` estimates how large the difference is (the median
paired difference with a seeded percentile-bootstrap interval) and what the design could have
found (`minimum_detectable_effect`): a p-value above alpha means "no evidence", and only the
interval and the detectable effect say how large a difference that still leaves possible.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import t as student_t
from scipy.stats import wilcoxon


Score = float | None  # None: the run failed or diverged

ALPHA = 0.05  # two-sided significance level of the minimum detectable effect
POWER = 0.8  # probability of a significant test when the true effect is the MDE
CONFIDENCE = 0.95  # of the bootstrap interval
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Asymptotic relative efficiency of the signed-rank test to the paired t-test for normal
# differences: the signed-rank test on n pairs has the power of the t-test on 3n/pi pairs.
WILCOXON_EFFICIENCY = 3 / math.pi


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


@dataclass(frozen=True)
class Effect:
    """How large the difference A - B is, in the metric's units, and what n pairs could detect."""

    difference: float  # median over the pairs of A - B (negative: A lower)
    ci_low: float  # percentile-bootstrap interval of that median, CONFIDENCE level
    ci_high: float
    sd_difference: float  # sample standard deviation of the finite paired differences
    mde: float  # smallest |mean difference| found with probability POWER at ALPHA (two-sided)

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


def paired_differences(a: Sequence[Score], b: Sequence[Score], higher_is_better: bool) -> np.ndarray:
    """Goodness of A minus goodness of B per matched pair (positive: A better).

    A pair where one side failed is a difference larger than any finite one (+-inf), in favour of
    the other side; a pair where both failed is a tie (0).
    """
    if len(a) != len(b):
        raise ValueError("paired comparisons need equally long, matched score lists")
    differences = []
    for score_a, score_b in zip(a, b):
        good_a, good_b = _goodness(score_a, higher_is_better), _goodness(score_b, higher_is_better)
        differences.append(0.0 if good_a == good_b else good_a - good_b)
    return np.array(differences, dtype=float)


def paired_test(a: Sequence[Score], b: Sequence[Score], higher_is_better: bool) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test on matched scores (same grid point and seed), over
    `paired_differences`. Ties are dropped (scipy's "wilcox" rule)."""
    differences = paired_differences(a, b, higher_is_better)
    a_better = int((differences > 0).sum())
    b_better = int((differences < 0).sum())
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


def effect_size(
    a: Sequence[Score],
    b: Sequence[Score],
    higher_is_better: bool,
    *,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Effect:
    """The median paired difference A - B with its percentile-bootstrap interval (pairs resampled
    with replacement, `resamples` times, from `seed`: the same scores give the same interval),
    and the minimum detectable effect for this many pairs at the spread of the differences.

    A failure enters as an unbounded difference (as in the test): a median stays finite while
    failures are a minority, and the interval becomes unbounded on the side they fall.
    """
    sign = 1.0 if higher_is_better else -1.0  # goodness -> the metric's own units
    differences = sign * paired_differences(a, b, higher_is_better)
    if not len(differences):
        raise ValueError("effect_size needs at least one pair")
    rng = np.random.default_rng(seed)
    resampled = differences[rng.integers(0, len(differences), size=(resamples, len(differences)))]
    medians = _sorted_row_medians(np.sort(resampled, axis=1))
    tail = (1.0 - confidence) / 2
    ci_low, ci_high = np.quantile(medians, [tail, 1.0 - tail], method="inverted_cdf")
    finite = differences[np.isfinite(differences)]
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return Effect(
        difference=float(_sorted_row_medians(np.sort(differences)[None, :])[0]),
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        sd_difference=sd,
        mde=minimum_detectable_effect(len(differences), sd),
    )


def minimum_detectable_effect(n_pairs: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest mean paired difference a two-sided Wilcoxon signed-rank test at `alpha` finds
    with probability `power`, for differences of standard deviation `sd` (in its units; sd = 1
    gives it in standard deviations).

    The paired t-test's power formula with the signed-rank test's efficiency relative to it (3/pi):
    (t_{1-alpha/2} + t_{power}) * sd / sqrt(n * 3/pi), t with n - 1 degrees of freedom (the
    normal quantiles instead overstate the power of 24 pairs as 0.76 for a nominal 0.8).
    Unbounded (inf) when no outcome of n pairs can reach `alpha` at all: the smallest two-sided
    p-value of n untied pairs is 2 / 2^n.
    """
    if n_pairs < 2 or 2.0 ** (1 - n_pairs) > alpha:
        return math.inf
    quantiles = student_t.ppf(1 - alpha / 2, n_pairs - 1) + student_t.ppf(power, n_pairs - 1)
    return float(quantiles * sd / math.sqrt(n_pairs * WILCOXON_EFFICIENCY))


def _sorted_row_medians(rows: np.ndarray) -> np.ndarray:
    """Medians of rows already sorted. An even row split evenly between -inf and +inf (every
    pair lost by one side, as many each way) has no midpoint; by symmetry its median is 0."""
    width = rows.shape[1]
    low, high = rows[:, (width - 1) // 2], rows[:, width // 2]
    with np.errstate(invalid="ignore"):
        middle = (low + high) / 2
    return np.where(np.isnan(middle) & np.isinf(low) & np.isinf(high), 0.0, middle)
