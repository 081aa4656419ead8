"""`monte-ds sweep`: the paper's robustness protocol (§3.3) over a hyperparameter grid.

    monte-ds sweep --config BASE.json --grid training.learning_rate=3e-4,3e-5 \\
        --grid training.per_device_train_batch_size=8,16,32 --methods lora,monteclora \\
        [--seeds 0,1] [--set key.path=value ...] [--set-for METHOD:key.path=value ...] \\
        --output DIR [--record DIR] [--plan-only | --report-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from monte_ds.errors import UserError
from monte_ds.flags import ArgumentParser
from monte_ds.sweep.grid import (
    check_keys,
    parse_assignment,
    parse_grid_axis,
    parse_method_assignment,
    parse_methods,
    parse_seeds,
)
from monte_ds.sweep.report import SWEEP_MD
from monte_ds.sweep.runner import DEFAULT_LAUNCHER, Sweep, execute, pending_commands


logger = logging.getLogger("monte_ds.sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="monte-ds sweep",
        description="Train every grid point x method x seed with `monte-ds train` and measure robustness: "
        "best, median, 1/median, spread per method and metric, a Wilcoxon signed-rank test between "
        "methods over matched runs, and box plots. Restartable: finished runs are skipped.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the base training config (JSON)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a swept config key and its values (repeatable; values parsed like --set)",
    )
    parser.add_argument(
        "--methods",
        default="lora,monteclora",
        help="adapter.method values, any of monte-ds train's (default: lora,monteclora); "
        "the Wilcoxon tests compare monteclora with each other method",
    )
    parser.add_argument("--seeds", default="0", help="training.seed values (default: 0)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="fixed",
        help="an override applied to every run (repeatable)",
    )
    parser.add_argument(
        "--set-for",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        dest="method_fixed",
        help="an override applied to one method's runs only (repeatable), e.g. "
        "monteclora:eval.predictive_samples=10; give it the same way on every invocation "
        "over one --output, whichever --methods it trains",
    )
    parser.add_argument("--output", required=True, type=Path, help="the sweep's folder (runs, logs, report)")
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder (e.g. committed) that keeps each finished run's config.json, metrics.json and "
        "report/report.json: runs recorded there are skipped and reported even when --output has lost them",
    )
    parser.add_argument(
        "--pairs-first",
        action="store_true",
        help="train seed by seed and grid point by grid point, every method of a point before the "
        "next, so that a sweep stopped early leaves matched pairs (default: method by method)",
    )
    parser.add_argument(
        "--launcher",
        default=shlex.join(DEFAULT_LAUNCHER),
        help="the command that trains one run, given --config and --set (default: %(default)s); "
        "e.g. 'torchrun --nproc-per-node 8 -m monte_ds.cli train'",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--plan-only",
        action="store_true",
        help="print one launch command per unfinished run (for a scheduler) and run nothing",
    )
    mode.add_argument(
        "--report-only", action="store_true", help="train nothing: write the report from the runs finished so far"
    )
    return parser


def parse_sweep(args: argparse.Namespace) -> Sweep:
    if not args.config.is_file():
        raise UserError(f"no such file {args.config}", key="--config")
    try:
        json.loads(args.config.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{args.config} is not valid JSON ({err})", key="--config") from None
    axes = tuple(parse_grid_axis(text) for text in args.grid)
    fixed = tuple(parse_assignment(text, "--set") for text in args.fixed)
    method_fixed = tuple(parse_method_assignment(text) for text in args.method_fixed)
    check_keys(axes, fixed, method_fixed)
    if args.record is not None and args.record.exists() and not args.record.is_dir():
        raise UserError(f"{args.record} is not a folder", key="--record")
    launcher = tuple(shlex.split(args.launcher))
    if not launcher:
        raise UserError("empty command", key="--launcher")
    return Sweep(
        config=args.config.resolve(),
        output=args.output.resolve(),
        axes=axes,
        fixed=fixed,
        methods=tuple(parse_methods(args.methods)),
        seeds=tuple(parse_seeds(args.seeds)),
        launcher=launcher,
        method_fixed=method_fixed,
        record=None if args.record is None else args.record.resolve(),
        pairs_first=args.pairs_first,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    sweep = parse_sweep(args)
    if args.plan_only:
        for command in pending_commands(sweep):
            print(command)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command_line = shlex.join(["monte-ds", "sweep", *argv])
    execute(sweep, command_line, launch=not args.report_only)
    logger.info("report: %s", sweep.output / SWEEP_MD)
    return 0
