"""Training-step overhead of MonteCLoRA against plain LoRA: monte-ds and peft's built-in one.

Builds a LLaMA-architecture model from `LlamaConfig` (random weights, saved once), then
times training steps (forward, backward, AdamW step) for

    (a) lora             peft LoRA
    (b) monte-ds         monte_ds.get_monteclora_model
    (c) peft-monteclora  LoraConfig(monteclora_config=MontecloraConfig()), peft >= 0.20

with the same base weights, batch, rank and target modules. Every measurement runs in a fresh
process (benchmarks/overhead_worker.py) and the methods are interleaved, a, b, c, a, b, c,
..., so that machine drift hits all of them alike. Reports per method the median step time,
its spread, the peak memory, and both as ratios to (a). docs/performance.md has the method
and the measured figures.

    .venv/bin/python benchmarks/overhead.py --rounds 5 --json outputs/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
import transformers
from overhead_worker import DTYPES, LORA, METHODS, OPTIMIZERS, PEFT_MONTECLORA, RunSettings
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM

from monte_ds.atomic import atomic_write_json
from monte_ds.errors import UserError, run_cli


WORKER = Path(__file__).with_name("overhead_worker.py")
# Targets for (b)/(a), reported, never asserted: step time and peak memory at the default CPU
# size; step time in the launch-bound preset; extra aten ops per adapted layer everywhere.
TARGETS = {
    "step_time_ratio": 1.05,
    "peak_memory_ratio": 1.03,
    "launch_bound_step_time_ratio": 1.15,
    "extra_aten_ops_per_adapted_layer": 15,
}
# A setting where host-side dispatch, not arithmetic, sets the step time (as on a GPU): tiny
# hidden size, all 7 projections, one thread. Give --num-layers (e.g. 8 and 32) besides.
PRESETS = {
    "launch-bound": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_heads": 4,
        "vocab_size": 1024,
        "rank": 8,
        "batch_size": 1,
        "seq_len": 16,
        "threads": 1,
    },
}
MIB = 1024**2
# What the worker counts per step (torch.profiler); each also reported as extra per adapted layer.
OP_COUNTS = ("aten_ops_per_step", "launching_aten_ops_per_step", "optimizer_aten_ops_per_step", "cuda_kernels_per_step")


def peft_has_monteclora() -> bool:
    return Version(peft.__version__) >= Version("0.20") and hasattr(peft, "MontecloraConfig")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/overhead.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="defaults for a named setting (flags given explicitly still win): "
        + "; ".join(f"{name}: {values}" for name, values in PRESETS.items()),
    )
    size = parser.add_argument_group("model size (LlamaConfig)")
    size.add_argument("--hidden-size", type=int, default=512)
    size.add_argument("--intermediate-size", type=int, default=1376)
    size.add_argument("--num-layers", type=int, default=4)
    size.add_argument("--num-heads", type=int, default=8)
    size.add_argument("--num-kv-heads", type=int, default=None, help="default: --num-heads (no GQA)")
    size.add_argument("--vocab-size", type=int, default=32000)
    train = parser.add_argument_group("training step")
    train.add_argument("--rank", type=int, default=32)
    train.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * rank")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    train.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 base")
    train.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, every decoder layer")
    train.add_argument("--sampler", choices=("auto", "async", "sync"), default="auto", help="monte-ds noise sampler")
    train.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    train.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads per process (default: torch's)"
    )
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="fused",
        help="AdamW implementation: fused (adamw_torch_fused), foreach (adamw_torch's default on CUDA), "
        "forloop, or bitsandbytes' paged_adamw_32bit (the QLoRA config's; CUDA only)",
    )
    train.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model with this backend (inductor: what SFTConfig(torch_compile=True) does; "
        "aot_eager: capture without codegen); compilation happens in the warm-up steps",
    )
    run = parser.add_argument_group("measurement")
    run.add_argument(
        "--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (default: all available)"
    )
    run.add_argument("--steps", type=int, default=10, help="measured steps per process")
    run.add_argument("--warmup-steps", type=int, default=3, help="steps run first and not measured")
    run.add_argument("--rounds", type=int, default=3, help="fresh processes per method, interleaved")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def resolve_methods(spec: str | None) -> list[str]:
    available = [m for m in METHODS if m != PEFT_MONTECLORA or peft_has_monteclora()]
    if spec is None:
        return available
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            raise UserError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method not in available:
            raise UserError(f"--methods: {method} needs peft >= 0.20 (installed: {peft.__version__})")
    if not methods or len(set(methods)) != len(methods):
        raise UserError(f"--methods: give each method at most once, at least one, got {spec!r}")
    return methods


def validate(args: argparse.Namespace) -> None:
    positive = (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "vocab_size",
        "rank",
        "batch_size",
        "seq_len",
        "steps",
        "rounds",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: must be >= 1, got {args.threads}")
    if args.compile is not None and args.warmup_steps < 1:
        raise UserError("--compile: needs --warmup-steps >= 1 (the first step compiles)")
    if args.warmup_steps < 0:
        raise UserError(f"--warmup-steps: must be >= 0, got {args.warmup_steps}")
    if args.hidden_size % args.num_heads or args.num_heads % args.num_kv_heads:
        raise UserError("--hidden-size / --num-heads / --num-kv-heads: hidden must divide by heads, heads by kv heads")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {args.device} requested but CUDA is not available")
    if args.optimizer == "paged_adamw_32bit" and torch.device(args.device).type != "cuda":
        raise UserError("--optimizer paged_adamw_32bit: bitsandbytes' paged optimizers need a CUDA device")
    if args.compile is not None and args.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"--compile: unknown torch.compile backend {args.compile!r}")
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise UserError(f"--load-in-4bit: bitsandbytes is not importable ({err})") from err


def save_base_model(args: argparse.Namespace, directory: Path) -> None:
    """The one set of random weights every method loads (seeded, saved in the benchmark dtype)."""
    config = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialising a 7B model is minutes on a CPU, seconds on a GPU
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype])
    model.save_pretrained(directory)


def run_worker(settings_path: Path, method: str, result_path: Path) -> dict:
    process = subprocess.run(
        [sys.executable, str(WORKER), str(settings_path), method, str(result_path)],
        capture_output=True,
        text=True,
    )
    if process.returncode != 0:
        raise RuntimeError(f"{method} worker failed (exit {process.returncode}):\n{process.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: pooled step-time quartiles, median peak memory, ratios to LoRA.

    `paired_step_time_ratios` divides each round's median by LoRA's median of the same round:
    its spread shows how much of a ratio is drift between rounds.
    """
    summary = {}
    for method, results in runs.items():
        pooled = [s for r in results for s in r["step_seconds"]]
        q1, median, q3 = quartiles(pooled)
        summary[method] = {
            "median_step_s": median,
            "q1_step_s": q1,
            "q3_step_s": q3,
            "iqr_step_s": q3 - q1,
            "measured_steps": len(pooled),
            "round_median_step_s": [statistics.median(r["step_seconds"]) for r in results],
            "median_step_cpu_s": statistics.median(s for r in results for s in r["step_cpu_seconds"]),
            "round_median_step_cpu_s": [statistics.median(r["step_cpu_seconds"]) for r in results],
            "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in results),
            "round_peak_memory_bytes": [r["peak_memory_bytes"] for r in results],
            "memory_after_build_bytes": statistics.median(r["memory_after_build_bytes"] for r in results),
            "adapted_layers": results[0]["adapted_layers"],
            "sampled_layers": results[0]["sampled_layers"],
            "trainable_parameters": results[0]["trainable_parameters"],
            **{key: statistics.median(r[key] for r in results) for key in OP_COUNTS if key in results[0]},
        }
    if LORA in summary:
        base = summary[LORA]
        for method, row in summary.items():
            row["step_time_ratio"] = row["median_step_s"] / base["median_step_s"]
            row["step_cpu_time_ratio"] = row["median_step_cpu_s"] / base["median_step_cpu_s"]
            row["peak_memory_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
            row["paired_step_time_ratios"] = [
                m / b for m, b in zip(row["round_median_step_s"], base["round_median_step_s"], strict=True)
            ]
            row["median_paired_step_time_ratio"] = statistics.median(row["paired_step_time_ratios"])
            for key in OP_COUNTS:
                if key in row:
                    row[f"extra_{key.removesuffix('_per_step')}_per_adapted_layer"] = (row[key] - base[key]) / row[
                        "adapted_layers"
                    ]
    return summary


def format_table(summary: dict[str, dict], memory_metric: str) -> str:
    memory_label = "peak GPU MiB" if memory_metric.startswith("cuda") else "peak RSS MiB"
    header = (
        f"{'method':<16} {'median s/step':>13} {'IQR s':>15} {'CPU s/step':>10} {memory_label:>12} "
        f"{'time/LoRA':>9} {'CPU/LoRA':>8} {'mem/LoRA':>8} {'ops/step':>9} {'+ops/layer':>10} {'+launch/layer':>13}  sampled"
    )
    lines = [header, "-" * len(header)]
    for method, row in summary.items():
        ratios = [
            f"{row[key]:.3f}" if key in row else "-"
            for key in ("step_time_ratio", "step_cpu_time_ratio", "peak_memory_ratio")
        ]
        lines.append(
            f"{method:<16} {row['median_step_s']:>13.4f} {row['q1_step_s']:>7.4f}-{row['q3_step_s']:<7.4f} "
            f"{row['median_step_cpu_s']:>10.4f} {row['peak_memory_bytes'] / MIB:>12.1f} "
            f"{ratios[0]:>9} {ratios[1]:>8} {ratios[2]:>8} {row['aten_ops_per_step']:>9.0f} "
            f"{row.get('extra_aten_ops_per_adapted_layer', float('nan')):>10.1f} "
            f"{row.get('extra_launching_aten_ops_per_adapted_layer', float('nan')):>13.1f}  {row['sampled_layers']}/{row['adapted_layers']}"
        )
    return "\n".join(lines)


def git_commit() -> str | None:
    """The commit measured, where the benchmark runs from a git checkout."""
    try:
        process = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return process.stdout.strip()


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags, with a preset's values where the flag was not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is not None:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.num_kv_heads = args.num_kv_heads or args.num_heads
    args.lora_alpha = args.lora_alpha or 2.0 * args.rank
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    methods = resolve_methods(args.methods)
    validate(args)
    # killed (SIGTERM), it still stops its worker and removes the temp dir with the saved base
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load_before = os.getloadavg()
    started = time.time()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    order = []
    with tempfile.TemporaryDirectory(prefix="monte-ds-overhead-") as tmp:
        work = Path(tmp)
        save_base_model(args, work / "base")
        settings = RunSettings(
            checkpoint=str(work / "base"),
            device=args.device,
            dtype=args.dtype,
            load_in_4bit=args.load_in_4bit,
            gradient_checkpointing=args.gradient_checkpointing,
            sampler=args.sampler,
            rank=args.rank,
            lora_alpha=args.lora_alpha,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            warmup_steps=args.warmup_steps,
            steps=args.steps,
            seed=args.seed,
            threads=args.threads,
            optimizer=args.optimizer,
            compile=args.compile,
        )
        settings.save(work / "settings.json")
        for round_index in range(args.rounds):
            for method in methods:
                result = run_worker(work / "settings.json", method, work / f"{round_index}-{method}.json")
                runs[method].append(result)
                order.append(method)
                print(
                    f"round {round_index + 1}/{args.rounds} {method}: "
                    f"median {statistics.median(result['step_seconds']):.4f} s/step, "
                    f"peak {result['peak_memory_bytes'] / MIB:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    memory_metric = runs[methods[0]][0]["memory_metric"]
    summary = summarise(runs)
    print(format_table(summary, memory_metric))
    if args.json is not None:
        settings_record = {k: v for k, v in vars(args).items() if k != "json"} | {"methods": methods}
        atomic_write_json(
            args.json,
            {
                "settings": settings_record,
                "methods": summary,
                "order": order,
                "memory_metric": memory_metric,
                "targets_for_monte_ds": TARGETS,
                "environment": {
                    "device_name": device_name(args.device),
                    "git_commit": git_commit(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": runs[methods[0]][0]["torch_threads"],
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "wall_seconds": time.time() - started,
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
