"""`monte-ds eval`: plan (checks and data), load a model (and adapter), run the suites, write the report.

The evaluation flags are derived from `EvalOptions`, so the command, the Python API and
the training config's `eval` section accept the same options. Exit codes: 0 every suite
completed, 2 user error (nothing written), 3 a suite failed while running (the report holds
the other suites' results and the failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any

import torch

from monte_ds import pretrained
from monte_ds.errors import KeyedError
from monte_ds.evaluation.loading import DTYPES, load_model, nf4_config
from monte_ds.evaluation.options import EvalOptions
from monte_ds.evaluation.runner import plan_evaluation, run_plan
from monte_ds.flags import ArgumentParser, flag


EXIT_SUITE_FAILED = 3
OPTION_FIELDS = {f.name: f for f in dataclasses.fields(EvalOptions)}
# Keys that errors from planning and loading name and that the command takes as flags.
FLAGGED_KEYS = {*OPTION_FIELDS, "training_log", "model", "adapter", "prepare", "gguf_file"}


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="monte-ds eval", description="Evaluate a causal LM (optionally with an adapter) and write a report."
    )
    parser.add_argument("--model", required=True, help="base model: local path or hub id")
    parser.add_argument(
        "--prepare",
        choices=sorted(pretrained.PACKAGED),
        help="convert this packaged pretrained base to --model first, unless it is there (as model.prepare does)",
    )
    parser.add_argument("--gguf-file", help="a GGUF file inside --model, dequantised to --dtype on load")
    parser.add_argument("--adapter", help="monte-ds adapter (save_adapter) or plain peft adapter directory")
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the base to nf4 (bitsandbytes, double quant)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (auto: the checkpoint's)"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ..."
    )
    parser.add_argument("--output", required=True, help="report directory (replaced whole)")
    parser.add_argument("--training-log", help="JSON file with the Trainer's log_history (plots the training curves)")
    hints = typing.get_type_hints(EvalOptions)
    for name, field in OPTION_FIELDS.items():
        kwargs: dict[str, Any] = {"help": field.metadata["help"], "default": argparse.SUPPRESS}
        hint = hints[name]
        if hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is list:
            kwargs["type"] = _comma_list
            kwargs["help"] += " (comma-separated)"
        else:
            kwargs["type"] = next(arg for arg in (*typing.get_args(hint), hint) if arg in (int, float, str))
        parser.add_argument(flag(name), required=name == "suites", **kwargs)
    return parser


def _as_flag(err: KeyedError) -> KeyedError:
    """An option error names the flag the user typed rather than the option key."""
    return err.with_key(flag(err.key)) if err.key in FLAGGED_KEYS else err


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    options = {name: args.pop(name) for name in OPTION_FIELDS if name in args}
    try:
        plan = plan_evaluation(options, args["training_log"])  # data and checks first: the model load is slow
        if args["prepare"] is not None:
            try:
                pretrained.prepare_model(args["prepare"], args["model"])
            except KeyedError as err:  # named as model.prepare / model.path in a training config
                raise err.with_key("prepare" if err.key == "model.prepare" else "model") from None
        loaded = load_model(
            args["model"],
            args["adapter"],
            dtype=args["dtype"],
            device=args["device"],
            quantization=nf4_config(args["dtype"]) if args["load_in_4bit"] else None,
            gguf_file=args["gguf_file"],
        )
        result = run_plan(plan, loaded.model, loaded.tokenizer, args["output"], loaded.metadata)
    except KeyedError as err:
        raise _as_flag(err) from None
    failed = {name: suite["error"] for name, suite in result["suites"].items() if suite["status"] == "failed"}
    print(f"report: {args['output']} ({len(result['tasks'])} tasks)")
    if failed:
        listing = "; ".join(f"{name}: {error}" for name, error in failed.items())
        print(
            f"monte-ds: error: {len(failed)} suite(s) failed, the others are in the report -- {listing}",
            file=sys.stderr,
        )
        return EXIT_SUITE_FAILED
    return 0
