"""The sweep's plan: grid axes x methods x seeds expanded into runs, each with its training command.

A run is identified by (method, grid point, seed); runs of different methods at the same
(grid point, seed) are the matched pairs of the Wilcoxon test. Values stay the strings the user
typed: they are handed to `monte-ds train --set key=value`, which parses them exactly as it
parses any other override, so the sweep never re-interprets a value.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from monte_ds.errors import UserError
from monte_ds.train.methods import METHODS


METHOD_KEY = "adapter.method"
SEED_KEY = "training.seed"
OUTPUT_KEY = "training.output_dir"
RESERVED_KEYS = (METHOD_KEY, SEED_KEY, OUTPUT_KEY)

_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")


@dataclass(frozen=True)
class GridAxis:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    method: str
    seed: int
    point: tuple[tuple[str, str], ...]  # (dotted key, value as typed), in grid order
    run_id: str  # relative path of the run's output dir under `<sweep>/runs/`

    @property
    def match_key(self) -> tuple:
        """Runs with equal match keys differ only in the method: a matched pair."""
        return (self.point, self.seed)


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """Split `key.path=value` (the format of --set and --grid)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value or any(not part for part in key.split(".")):
        raise UserError(f"expected key.path=value, got {text!r}", key=flag)
    return key, value


def parse_method_assignment(text: str) -> tuple[str, str, str]:
    """`monteclora:eval.predictive_samples=10` (the format of --set-for) -> (method, key, value)."""
    method, sep, assignment = text.partition(":")
    if not sep or method not in METHODS:
        raise UserError(
            f"expected METHOD:key.path=value with METHOD one of {', '.join(METHODS)}, got {text!r}", key="--set-for"
        )
    return (method, *parse_assignment(assignment, "--set-for"))


def parse_grid_axis(text: str) -> GridAxis:
    """`training.learning_rate=3e-4,3e-5` -> one axis; values are comma-separated."""
    key, raw = parse_assignment(text, "--grid")
    values = tuple(value.strip() for value in raw.split(","))
    if any(not value for value in values):
        raise UserError(f"empty value in {text!r}", key="--grid")
    if len(set(values)) != len(values):
        raise UserError(f"repeated value in {text!r}", key="--grid")
    return GridAxis(key, values)


def parse_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        raise UserError(f"expected a comma-separated list, got {text!r}", key=flag)
    if len(set(items)) != len(items):
        raise UserError(f"repeated entry in {text!r}", key=flag)
    return items


def parse_methods(text: str) -> list[str]:
    methods = parse_list(text, "--methods")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})", key="--methods")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in parse_list(text, "--seeds")]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}", key="--seeds") from None
    if any(seed < 0 for seed in seeds):
        raise UserError(f"seeds must be >= 0, got {text!r}", key="--seeds")
    return seeds


def check_keys(
    axes: Sequence[GridAxis], fixed: Sequence[tuple[str, str]], method_fixed: Sequence[tuple[str, str, str]] = ()
) -> None:
    """The sweep owns the method, seed and output keys; a key is either swept, fixed for every
    method, or fixed for some methods, once per method."""
    seen: dict[str, str] = {}
    shared = [("--grid", axis.key) for axis in axes] + [("--set", key) for key, _ in fixed]
    for flag, key in shared + [("--set-for", key) for _, key, _ in method_fixed]:
        if key in RESERVED_KEYS:
            raise UserError(f"{key} is set by the sweep itself (use --methods / --seeds / --output)", key=flag)
    for flag, key in shared:
        if key in seen:
            raise UserError(f"{key} is given more than once (also in {seen[key]})", key=flag)
        seen[key] = flag
    per_method: set[tuple[str, str]] = set()
    for method, key, _ in method_fixed:
        if key in seen:
            raise UserError(f"{key} is given more than once (also in {seen[key]})", key="--set-for")
        if (method, key) in per_method:
            raise UserError(f"{key} is given more than once for {method}", key="--set-for")
        per_method.add((method, key))


def expand(axes: Sequence[GridAxis], methods: Sequence[str], seeds: Sequence[int]) -> list[Run]:
    """Every (method, grid point, seed), methods outermost so a partial sweep compares whole methods."""
    labels = _axis_labels([axis.key for axis in axes])
    runs = []
    for method in methods:
        for values in itertools.product(*(axis.values for axis in axes)):
            point = tuple((axis.key, value) for axis, value in zip(axes, values))
            for seed in seeds:
                name = "__".join(
                    [f"{label}={_path_safe(value)}" for label, value in zip(labels, values)] + [f"seed={seed}"]
                )
                runs.append(Run(method, seed, point, f"{_path_safe(method)}/{name}"))
    ids = [run.run_id for run in runs]
    if len(set(ids)) != len(ids):
        raise UserError("two values map to the same run directory name; spell them differently", key="--grid")
    return runs


def train_command(
    launcher: Sequence[str],
    config: Path,
    fixed: Sequence[tuple[str, str]],
    run: Run,
    output_dir: Path,
) -> list[str]:
    """The `monte-ds train` command line of one run (what --plan-only prints and the sweep executes)."""
    overrides = [
        *fixed,
        *run.point,
        (METHOD_KEY, run.method),
        (SEED_KEY, str(run.seed)),
        (OUTPUT_KEY, str(output_dir)),
    ]
    command = [*launcher, "--config", str(config)]
    for key, value in overrides:
        command += ["--set", f"{key}={value}"]
    return command


def _axis_labels(keys: Sequence[str]) -> list[str]:
    """Short directory labels: the last key component, or the whole key where that is ambiguous."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return [tail if last.count(tail) == 1 else key for key, tail in zip(keys, last)]


def _path_safe(value: str) -> str:
    return _UNSAFE_PATH_CHARS.sub("_", value)
