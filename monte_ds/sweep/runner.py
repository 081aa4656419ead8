"""Run a sweep: each run is one `monte-ds train` subprocess, sequentially, restartable.

Everything lives under the sweep's output dir: `runs/<method>/<point>__seed=<s>/` (each run's
training output dir), `logs/` (each run's stdout and stderr), `settings.json` (the base config
and fixed overrides the runs were made with), `sweep.json`, `sweep.md` and `plots/`.

A *record* (`--record DIR`, optional) keeps the small files of every finished run outside the
output dir, e.g. in a committed folder that survives a fresh checkout: `DIR/settings.json` and
`DIR/runs/<run id>/` with the run's `config.json`, `report/report.json` and `metrics.json` (no
adapter, no checkpoint). A run recorded there is finished: the sweep skips it and reports it as
if its output dir were still there. Every run that finishes (or had finished in the output dir)
is copied into the record when the sweep reaches it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monte_ds.atomic import atomic_write_json, atomic_write_text
from monte_ds.errors import UserError
from monte_ds.evaluation.report import REPORT_JSON
from monte_ds.run_folder import CONFIG_JSON, EXIT_USER_ERROR, METRICS_JSON, REPORT_DIR
from monte_ds.sweep.grid import GridAxis, Run, expand, train_command
from monte_ds.sweep.outcomes import Outcome, read_outcome
from monte_ds.sweep.report import build_sweep_report, write_sweep_report
from monte_ds.train.checkpoints import latest_complete_checkpoint


logger = logging.getLogger(__name__)

DEFAULT_LAUNCHER = (sys.executable, "-m", "monte_ds.cli", "train")
SETTINGS_JSON = "settings.json"
# What a record keeps of a finished run: what `read_outcome` reads, metrics.json last (a run is
# recorded once it is there). report.json is absent for a run without an evaluation or diverged.
RECORD_FILES = (CONFIG_JSON, f"{REPORT_DIR}/{REPORT_JSON}", METRICS_JSON)
TIMING_JSON = "timing.json"  # in the record, for runs this sweep trained: wall seconds and the load average at the end


@dataclass(frozen=True)
class Sweep:
    config: Path
    output: Path
    axes: tuple[GridAxis, ...]
    fixed: tuple[tuple[str, str], ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    launcher: tuple[str, ...] = DEFAULT_LAUNCHER
    # (method, key, value): overrides for one method's runs only, e.g. an evaluation option only
    # MonteCLoRA has (posterior-predictive draws). The runs still pair on (grid point, seed).
    method_fixed: tuple[tuple[str, str, str], ...] = ()
    # A folder that keeps the small result files of finished runs (see the module docstring).
    record: Path | None = None
    # Train seed by seed, and within a seed grid point by grid point, every method of a point
    # before the next point: a sweep stopped early leaves complete matched pairs.
    pairs_first: bool = False

    @property
    def runs(self) -> list[Run]:
        return expand(self.axes, self.methods, self.seeds)

    def training_order(self, runs: Sequence[Run]) -> list[Run]:
        """The order runs are trained (and --plan-only prints them) in; the report keeps `runs`'s."""
        if not self.pairs_first:
            return list(runs)
        points = list(dict.fromkeys(run.point for run in runs))
        return sorted(
            runs, key=lambda run: (self.seeds.index(run.seed), points.index(run.point), self.methods.index(run.method))
        )

    def run_dir(self, run: Run) -> Path:
        return self.output / "runs" / run.run_id

    def record_dir(self, run: Run) -> Path | None:
        return None if self.record is None else self.record / "runs" / run.run_id

    def outcome(self, run: Run) -> tuple[Outcome, Path]:
        """The run's result and the folder it was read from: its output dir, or its record when
        only the record has a result (e.g. in a fresh checkout, without the outputs)."""
        run_dir = self.run_dir(run)
        outcome = read_outcome(run_dir)
        record_dir = self.record_dir(run)
        if not outcome.finished and record_dir is not None:
            recorded = read_outcome(record_dir)
            if recorded.finished:
                return recorded, record_dir
        return outcome, run_dir

    def log_path(self, run: Run) -> Path:
        return self.output / "logs" / f"{run.run_id.replace('/', '__')}.log"

    def command(self, run: Run) -> list[str]:
        """The run's training command; `--resume` when an interrupted attempt left a checkpoint
        (monte-ds train refuses to start over such a directory, and resuming reproduces the run)."""
        command = train_command(self.launcher, self.config, self.fixed_for(run.method), run, self.run_dir(run))
        if latest_complete_checkpoint(self.run_dir(run)) is not None:
            command.append("--resume")
        return command

    def fixed_for(self, method: str) -> tuple[tuple[str, str], ...]:
        """The overrides of `method`'s runs: --set, then its --set-for."""
        return self.fixed + tuple((key, value) for m, key, value in self.method_fixed if m == method)

    def settings(self) -> dict[str, Any]:
        """What every run shares: a restart into the same dir must not mix runs of two of these."""
        settings = {"config": json.loads(self.config.read_text()), "set": dict(self.fixed)}
        if self.method_fixed:  # absent when unused, as in the settings of sweeps made before --set-for
            settings["set_for"] = self.set_for()
        return settings

    def set_for(self) -> dict[str, dict[str, str]]:
        """method -> its own overrides (--set-for)."""
        by_method: dict[str, dict[str, str]] = {}
        for method, key, value in self.method_fixed:
            by_method.setdefault(method, {})[key] = value
        return by_method


def check_settings(sweep: Sweep, *, output: bool = True) -> None:
    """Refuse to add runs to an output dir (`output`), or to read or add runs of a record, whose
    finished runs used another base config or --set."""
    for folder, flag in ((sweep.output if output else None, "--output"), (sweep.record, "--record")):
        path = None if folder is None else folder / SETTINGS_JSON
        if path is not None and path.exists() and json.loads(path.read_text()) != sweep.settings():
            raise UserError(
                f"{folder} holds runs made with another base config or --set / --set-for overrides "
                f"(see {path}); use a new {flag}",
                key=flag,
            )


def record_run(sweep: Sweep, run: Run) -> bool:
    """Copy a finished run's small files from its output dir into the record (metrics.json last);
    False when there is no record or nothing new to copy."""
    record_dir = sweep.record_dir(run)
    if record_dir is None or not read_outcome(sweep.run_dir(run)).finished:
        return False
    copied = False
    for name in RECORD_FILES:
        source, target = sweep.run_dir(run) / name, record_dir / name
        if source.is_file() and (not target.is_file() or target.read_bytes() != source.read_bytes()):
            atomic_write_text(target, source.read_text())
            copied = True
    return copied


def pending_commands(sweep: Sweep) -> list[str]:
    """One shell command per run that has no result yet (what --plan-only prints)."""
    check_settings(sweep, output=False)
    return [
        shlex.join(sweep.command(run)) for run in sweep.training_order(sweep.runs) if not sweep.outcome(run)[0].finished
    ]


def run_one(sweep: Sweep, run: Run) -> Outcome:
    """Train one run in a subprocess, its output in the run's log; a crash is a failed run."""
    log = sweep.log_path(run)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        returncode = subprocess.run(
            sweep.command(run), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
        ).returncode
    if returncode == EXIT_USER_ERROR:  # monte-ds train rejected the config: not a robustness result
        raise UserError(f"run {run.run_id}: monte-ds train rejected the config: {_last_line(log)} (log: {log})")
    outcome = read_outcome(sweep.run_dir(run))
    if outcome.status == "pending":
        # It was launched and left no result: a crash (OOM, a bug, a kill) counts as a failure.
        return Outcome("failed", detail=f"exit code {returncode}, {outcome.detail}; log: {log}")
    return outcome


def execute(sweep: Sweep, command_line: str, *, launch: bool = True) -> dict[str, Any]:
    """Train every unfinished run (unless `launch` is False), then write the report; return it."""
    runs = sweep.runs
    check_settings(sweep, output=launch)
    if launch:
        atomic_write_json(sweep.output / SETTINGS_JSON, sweep.settings())
        if sweep.record is not None:
            atomic_write_json(sweep.record / SETTINGS_JSON, sweep.settings())
            recorded = sum(record_run(sweep, run) for run in runs)  # finished before the record existed
            if recorded:
                logger.info("recorded %d finished runs in %s", recorded, sweep.record)
    found = {run.run_id: sweep.outcome(run) for run in runs}
    outcomes = {run_id: outcome for run_id, (outcome, _) in found.items()}
    folders = {run_id: folder for run_id, (_, folder) in found.items()}
    todo = [run for run in sweep.training_order(runs) if not outcomes[run.run_id].finished] if launch else []
    finished = sum(outcome.finished for outcome in outcomes.values())
    from_record = sum(folders[run.run_id] != sweep.run_dir(run) for run in runs)
    logger.info(
        "%d runs: %d finished (%d of them read from the record), %d to train",
        len(runs),
        finished,
        from_record,
        len(todo),
    )
    report = _write_report(sweep, command_line, runs, outcomes, folders)
    for index, run in enumerate(todo, 1):
        logger.info("[%d/%d] training %s", index, len(todo), run.run_id)
        started = time.monotonic()
        outcome = outcomes[run.run_id] = run_one(sweep, run)
        wall_s, load = time.monotonic() - started, os.getloadavg()
        folders[run.run_id] = sweep.run_dir(run)
        if record_run(sweep, run):
            atomic_write_json(sweep.record_dir(run) / TIMING_JSON, {"wall_s": round(wall_s, 1), "load_average": load})
        scores = ", ".join(f"{metric.task} {metric.label} {value:.4g}" for metric, value in outcome.scores.items())
        logger.info(
            "[%d/%d] %s: %s in %.0f s (load average %.2f %.2f %.2f); %s",
            index,
            len(todo),
            run.run_id,
            outcome.status,
            wall_s,
            *load,
            scores or outcome.detail,
        )
        report = _write_report(sweep, command_line, runs, outcomes, folders)  # progress is visible mid-sweep
    return report


def _write_report(
    sweep: Sweep, command_line: str, runs: Sequence[Run], outcomes: dict[str, Outcome], folders: dict[str, Path]
) -> dict[str, Any]:
    header = {
        "command": command_line,
        "config": str(sweep.config),
        "grid": {axis.key: list(axis.values) for axis in sweep.axes},
        "set": dict(sweep.fixed),
        "set_for": sweep.set_for(),
        "methods": list(sweep.methods),
        "seeds": list(sweep.seeds),
    }
    if sweep.record is not None:
        header["record"] = str(sweep.record)
    report = build_sweep_report(header, runs, outcomes, sweep.methods, folders)
    write_sweep_report(sweep.output, report)
    return report


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"
