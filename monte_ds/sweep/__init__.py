"""Robustness sweeps: a hyperparameter grid trained per method, summarised as in the paper's §3.3."""

from monte_ds.sweep.grid import GridAxis, Run, expand
from monte_ds.sweep.outcomes import Metric, Outcome, read_outcome
from monte_ds.sweep.runner import Sweep, execute
from monte_ds.sweep.stats import PairedTest, Summary, paired_test, summarize


__all__ = [
    "GridAxis",
    "Metric",
    "Outcome",
    "PairedTest",
    "Run",
    "Summary",
    "Sweep",
    "execute",
    "expand",
    "paired_test",
    "read_outcome",
    "summarize",
]
