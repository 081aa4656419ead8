"""One command that validates monte-ds's GPU paths and measures them (about 10 minutes on one H100).

    python benchmarks/gpu_suite.py --out outputs/gpu-suite          # on a CUDA machine
    python benchmarks/gpu_suite.py --out outputs/gpu-suite --smoke  # the same steps, tiny, on CPU

Steps, each recorded as it finishes (a failing step is recorded and the next one runs):

1. `cuda-tests`: the CUDA tests (side-stream sampler equals sync draws, nf4 base on CUDA gets the
   noise, bf16 autocast keeps the regulariser in fp32);
2. `overhead-1b-bf16` / `overhead-1b-nf4`: benchmarks/overhead.py on a ~1B LLaMA-architecture model
   (random weights) in bf16 and on an nf4 base: step time, peak memory, aten ops and CUDA kernels
   per step, LoRA vs monte-ds; `overhead-1b-bf16-sync` the same with the in-step draw instead of
   the side stream (`sampler: auto`'s choice on CUDA should be the faster of the two);
3. `launch-bound`: the launch-bound preset (hidden 64, 32 layers) on the device;
4. `llama7b-qlora`: LLaMA-7B architecture, nf4, gradient checkpointing, batch 1x512: peak memory and
   step time, LoRA vs monte-ds, and whether MonteCLoRA fits a 24 GB card.

Writes DIR/suite.json (every step's settings, status, wall time and results) and DIR/suite.md.
`--smoke` runs the same code at tiny sizes on CPU; the test suite runs it, so this command cannot
rot while no GPU is around.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from monte_ds.atomic import atomic_write_json, atomic_write_text
from monte_ds.errors import UserError, run_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_sampler.py::test_cuda_side_stream_draws_equal_sync_draws"]
CARD_BYTES = 24 * 1000**3  # a "24 GB" consumer card
GIB = 1024**3


@dataclass(frozen=True)
class OverheadStep:
    """One benchmarks/overhead.py run: its flags on a GPU and at smoke size."""

    name: str
    flags: list[str]
    smoke_flags: list[str]
    timeout_s: int


_1B = ["--hidden-size", "2048", "--intermediate-size", "5504", "--num-layers", "16", "--num-heads", "16",
       "--vocab-size", "32000", "--rank", "16", "--batch-size", "4", "--seq-len", "512", "--dtype", "bf16",
       "--rounds", "2", "--steps", "10", "--warmup-steps", "3"]
_7B = ["--hidden-size", "4096", "--intermediate-size", "11008", "--num-layers", "32", "--num-heads", "32",
       "--vocab-size", "32000", "--rank", "16", "--batch-size", "1", "--seq-len", "512", "--dtype", "bf16",
       "--load-in-4bit", "--gradient-checkpointing", "--methods", "lora,monte-ds",
       "--rounds", "1", "--steps", "3", "--warmup-steps", "2"]
_TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "4",
         "--vocab-size", "128", "--rank", "4", "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32",
         "--rounds", "1", "--steps", "2", "--warmup-steps", "1", "--methods", "lora,monte-ds"]
OVERHEAD_STEPS = [
    OverheadStep("overhead-1b-bf16", _1B, _TINY, 150),
    OverheadStep("overhead-1b-nf4", [*_1B, "--load-in-4bit"], [*_TINY, "--load-in-4bit"], 150),
    # the in-step draw on the same GPU: `sampler: auto` should pick the faster of this and the side stream
    OverheadStep("overhead-1b-bf16-sync", [*_1B, "--sampler", "sync", "--methods", "lora,monte-ds"],
                 [*_TINY, "--sampler", "sync"], 120),
    OverheadStep("launch-bound", ["--preset", "launch-bound", "--num-layers", "32", "--rounds", "2"],
                 ["--preset", "launch-bound", "--num-layers", "2", "--rounds", "1", "--steps", "2",
                  "--warmup-steps", "1", "--methods", "lora,monte-ds"], 90),
    OverheadStep("llama7b-qlora", _7B, [*_TINY, "--load-in-4bit", "--gradient-checkpointing"], 420),
]  # fmt: skip


def run_cuda_tests(out: Path, timeout_s: int) -> dict:
    """pytest on the CUDA tests; on a machine without CUDA they skip (and the step says so)."""
    report = out / "cuda-tests.xml"
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *CUDA_TESTS],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    summary = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else ""
    return {"exit_code": process.returncode, "summary": summary, "output_tail": process.stdout[-3000:]}


def run_overhead(step: OverheadStep, out: Path, smoke: bool, device: str) -> dict:
    result_path = out / f"{step.name}.json"
    flags = step.smoke_flags if smoke else step.flags
    process = subprocess.run(
        [sys.executable, str(HERE / "overhead.py"), *flags, "--device", device, "--json", str(result_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s * (4 if smoke else 1),
    )  # fmt: skip
    if process.returncode != 0:
        raise RuntimeError(f"overhead.py exit {process.returncode}: {process.stderr.strip()[-2000:]}")
    return json.loads(result_path.read_text())


def fits_card(result: dict) -> dict:
    """Whether each method's training-phase peak stays under a 24 GB card (CUDA figures only)."""
    return {
        method: row["peak_memory_bytes"] < CARD_BYTES
        for method, row in result["methods"].items()
        if result["memory_metric"].startswith("cuda")
    }


def markdown(suite: dict) -> str:
    lines = [
        f"# monte-ds GPU suite ({suite['device']}{', smoke' if suite['smoke'] else ''})", "",
        "| step | status | seconds | monte-ds / LoRA step time | peak memory | extra aten ops / layer | "
        "extra launching ops / layer | extra CUDA kernels / layer |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, step in suite["steps"].items():
        row = step.get("result", {}).get("methods", {}).get("monte-ds", {})

        def fmt(key: str, pattern: str = "{:.2f}") -> str:
            return pattern.format(row[key]) if key in row else "—"

        memory = f"{row['peak_memory_bytes'] / GIB:.2f} GiB ({row['peak_memory_ratio']:.3f}×)" if "peak_memory_ratio" in row else "—"
        status = step["status"] if step["status"] != "ok" or "summary" not in step else step["summary"]
        lines.append(
            f"| {name} | {status} | {step['seconds']:.0f} | {fmt('step_time_ratio', '{:.3f}×')} | {memory} | "
            f"{fmt('extra_aten_ops_per_adapted_layer', '{:.1f}')} | {fmt('extra_launching_aten_ops_per_adapted_layer', '{:.1f}')} | "
            f"{fmt('extra_cuda_kernels_per_adapted_layer', '{:.1f}')} |"
        )
    qlora = suite["steps"].get("llama7b-qlora", {}).get("fits_24gb_card")
    if qlora:
        lines += ["", "LLaMA-7B QLoRA fits a 24 GB card: " + ", ".join(f"{m}: {'yes' if ok else 'no'}" for m, ok in qlora.items())]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for suite.json, suite.md and each step's JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the suite itself")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA device: run on a GPU machine, or use --smoke to check the suite on CPU")
    device = "cpu" if args.smoke else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    suite = {
        "device": "cpu" if args.smoke else torch.cuda.get_device_name(0),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "steps": {},
    }
    steps = [("cuda-tests", lambda: run_cuda_tests(args.out, 300))]
    steps += [(step.name, lambda step=step: run_overhead(step, args.out, args.smoke, device)) for step in OVERHEAD_STEPS]
    for name, run in steps:
        started = time.time()
        record: dict = {}
        try:
            outcome = run()
            if name == "cuda-tests":
                record.update(outcome, status="ok" if outcome["exit_code"] == 0 else "failed")
            else:
                record.update(status="ok", result=outcome)
                if name == "llama7b-qlora":
                    record["fits_24gb_card"] = fits_card(outcome)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            record.update(status="failed", error=str(err).splitlines()[-1] if str(err) else type(err).__name__)
        record["seconds"] = time.time() - started
        suite["steps"][name] = record
        print(f"{name}: {record['status']} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
        atomic_write_json(args.out / "suite.json", suite)  # each step's result is kept as soon as it exists
        atomic_write_text(args.out / "suite.md", markdown(suite))
    print(markdown(suite))
    return 0 if all(step["status"] == "ok" for step in suite["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
