"""One command that validates monte-ds's GPU paths and measures them within a wall-time budget.

    python benchmarks/gpu_suite.py --out outputs/gpu-suite                  # on a CUDA machine, 420 s
    python benchmarks/gpu_suite.py --out outputs/gpu-suite --budget-s 900   # a longer slot
    python benchmarks/gpu_suite.py --out outputs/gpu-suite --smoke          # the same steps, tiny, on CPU

On an air-gapped node without trl/bitsandbytes/deepspeed, `make gpu-kit` here and `.gpu-kit/run.sh
DIR` there run this with the missing wheels (docs/performance.md, "On an air-gapped GPU node").

Steps, in the order of what they tell us; each has its own cap (it is stopped there) and is not
started when what is left of the budget is below its cap (recorded as skipped for the budget):

1. `cuda-tests`: the CUDA tests (side-stream draws equal the in-step draws, an nf4 base on CUDA
   gets the noise, bf16 autocast keeps the regulariser in fp32);
2. `overhead-1b-bf16-async` / `overhead-1b-bf16-sync`: benchmarks/overhead.py on a ~1B
   LLaMA-architecture model (random weights) in bf16, LoRA vs monte-ds: step time, peak memory,
   aten ops and CUDA kernels per step, once per sampler mode, so that `sampler: auto`'s choice on
   CUDA (async) is a measured one;
3. `overhead-1b-nf4`: the same on an nf4 base (sampler auto);
4. `llama7b-qlora`: LLaMA-7B architecture, nf4, gradient checkpointing, batch 1x512: peak memory
   and step time, LoRA vs monte-ds, and whether each fits a 24 GB card;
5. `launch-bound`: the launch-bound preset (hidden 64, 32 layers) on the device.

DIR/suite.json (the budget, every step's cap, status, wall time and results) and DIR/suite.md are
rewritten the moment each step ends, so a killed run still leaves every step that finished. A step
that fails is recorded with its error and the next one runs. `--smoke` runs the same code, budget
included, at tiny sizes on CPU; the test suite runs it, so this command cannot rot while no GPU is
around.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from monte_ds.atomic import atomic_write_json, atomic_write_text
from monte_ds.errors import UserError, run_cli


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_sampler.py::test_cuda_side_stream_draws_equal_sync_draws"]
# Every file the suite runs in a subprocess (besides itself): scripts/gpu_kit.py follows their imports.
SUITE_FILES = ["benchmarks/gpu_suite.py", "benchmarks/overhead.py", "tests/conftest.py",
               *sorted({test.split("::")[0] for test in CUDA_TESTS})]  # fmt: skip
CARD_BYTES = 24 * 1000**3  # a "24 GB" consumer card
GIB = 1024**3
DEFAULT_BUDGET_S = 420  # a 15-minute slot less the node's start and the copy
TERM_GRACE_S = 5  # a step over its cap gets SIGTERM this long (a quarter of a short cap) before it, SIGKILL at it
VERSIONS_OF = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers")


class StepFailed(RuntimeError):
    """A step's command failed; `details` (e.g. its output) go into the step's record."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class StepTimeout(StepFailed):
    """A step ran into its cap and was stopped."""


@dataclass(frozen=True)
class Step:
    """One step of the suite: the most seconds it may take on a GPU and at smoke size on CPU,
    and what it runs (given the output folder, smoke or not, and its cap; returns its record)."""

    name: str
    cap_s: int
    smoke_cap_s: int
    run: Callable[[Path, bool, int], dict]


def run_capped(command: Sequence[str], cap_s: float) -> subprocess.CompletedProcess:
    """`command` in its own process group, stopped with all its children at `cap_s` (overhead.py
    starts a worker per measurement; a plain timeout would leave the worker on the GPU)."""
    with subprocess.Popen(
        list(command), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=cap_s - min(TERM_GRACE_S, cap_s / 4))
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGTERM)  # overhead.py then removes its saved base model
            try:
                stdout, stderr = process.communicate(timeout=min(TERM_GRACE_S, cap_s / 4))
            except subprocess.TimeoutExpired:
                signal_group(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
            tails = {"output_tail": stdout[-3000:], "stderr_tail": stderr[-3000:]}
            raise StepTimeout(f"stopped at its cap of {cap_s:.0f} s", tails) from None
        finally:  # whatever ended it (done, cap, our own interrupt): nothing of the step stays on the GPU
            signal_group(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the group has ended already
        pass


def run_cuda_tests(out: Path, smoke: bool, cap_s: int) -> dict:
    """pytest on the CUDA tests; on a machine without CUDA they skip (and the step says so)."""
    report = out / "cuda-tests.xml"
    process = run_capped(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *CUDA_TESTS], cap_s
    )
    summary = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else ""
    record = {"exit_code": process.returncode, "summary": summary, "output_tail": process.stdout[-3000:]}
    if process.returncode != 0:
        raise StepFailed(f"pytest exit {process.returncode}: {summary or process.stderr.strip()[-500:]}", record)
    return record


def overhead_step(name: str, flags: list[str], smoke_flags: list[str], fits_card: bool = False) -> Callable:
    """A benchmarks/overhead.py run with `flags` on the GPU (`smoke_flags` on CPU)."""

    def run(out: Path, smoke: bool, cap_s: int) -> dict:
        result_path = out / f"{name}.json"
        command = [sys.executable, str(HERE / "overhead.py"), *(smoke_flags if smoke else flags),
                   "--device", "cpu" if smoke else "cuda", "--json", str(result_path)]  # fmt: skip
        process = run_capped(command, cap_s)
        if process.returncode != 0:
            last = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else ""
            raise StepFailed(f"overhead.py exit {process.returncode}: {last}", {"stderr_tail": process.stderr[-3000:]})
        result = json.loads(result_path.read_text())
        return {"result": result, **({"fits_24gb_card": card_fit(result)} if fits_card else {})}

    return run


def card_fit(result: dict) -> dict:
    """Whether each method's training-phase peak stays under a 24 GB card (CUDA figures only)."""
    return {
        method: row["peak_memory_bytes"] < CARD_BYTES
        for method, row in result["methods"].items()
        if result["memory_metric"].startswith("cuda")
    }


# Caps. Measured at smoke size (CPU, 2 loaded cores): cuda-tests 15 s, each overhead step 40-55 s,
# nearly all of it the ~15-20 s that each fresh worker process spends importing and loading before
# its first step. On the GPU node that fixed cost is ~10-15 s a process (CUDA start included); a ~1B
# bf16 step at batch 4 x 512 (1.4e13 FLOPs) is ~0.1 s on an H100/H200, a 7B nf4 checkpointed step at
# 1 x 512 under 1 s, but building and saving the 7B base (13.5 GB in bf16) and quantising it in each
# worker take ~40 s. Hence one round and few steps per size, and caps ~1.5x the expected cost
# (expected in all ~340 s, so every step starts within the default budget). Smoke caps leave 2x
# or more of the smoke cost measured here (up to 48 s for cuda-tests on a loaded machine).
_1B = [
    "--hidden-size",
    "2048",
    "--intermediate-size",
    "5504",
    "--num-layers",
    "16",
    "--num-heads",
    "16",
    "--vocab-size",
    "32000",
    "--rank",
    "16",
    "--batch-size",
    "4",
    "--seq-len",
    "512",
    "--dtype",
    "bf16",
    "--methods",
    "lora,monte-ds",
    "--rounds",
    "1",
    "--steps",
    "8",
    "--warmup-steps",
    "3",
]
_7B = [
    "--hidden-size",
    "4096",
    "--intermediate-size",
    "11008",
    "--num-layers",
    "32",
    "--num-heads",
    "32",
    "--vocab-size",
    "32000",
    "--rank",
    "16",
    "--batch-size",
    "1",
    "--seq-len",
    "512",
    "--dtype",
    "bf16",
    "--load-in-4bit",
    "--gradient-checkpointing",
    "--methods",
    "lora,monte-ds",
    "--rounds",
    "1",
    "--steps",
    "3",
    "--warmup-steps",
    "2",
]
_TINY = [
    "--hidden-size",
    "32",
    "--intermediate-size",
    "64",
    "--num-layers",
    "1",
    "--num-heads",
    "4",
    "--vocab-size",
    "128",
    "--rank",
    "4",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--dtype",
    "fp32",
    "--rounds",
    "1",
    "--steps",
    "2",
    "--warmup-steps",
    "1",
    "--methods",
    "lora,monte-ds",
]
STEPS = [
    Step("cuda-tests", 75, 120, run_cuda_tests),
    Step("overhead-1b-bf16-async", 80, 120,
         overhead_step("overhead-1b-bf16-async", [*_1B, "--sampler", "async"], [*_TINY, "--sampler", "async"])),
    Step("overhead-1b-bf16-sync", 80, 120,
         overhead_step("overhead-1b-bf16-sync", [*_1B, "--sampler", "sync"], [*_TINY, "--sampler", "sync"])),
    Step("overhead-1b-nf4", 80, 120,
         overhead_step("overhead-1b-nf4", [*_1B, "--load-in-4bit"], [*_TINY, "--load-in-4bit"])),
    Step("llama7b-qlora", 150, 120,
         overhead_step("llama7b-qlora", _7B, [*_TINY, "--load-in-4bit", "--gradient-checkpointing"], fits_card=True)),
    Step("launch-bound", 75, 120,
         overhead_step("launch-bound", ["--preset", "launch-bound", "--num-layers", "32", "--methods", "lora,monte-ds",
                                        "--rounds", "2", "--steps", "10", "--warmup-steps", "3"],
                       ["--preset", "launch-bound", "--num-layers", "2", "--rounds", "1", "--steps", "2",
                        "--warmup-steps", "1", "--methods", "lora,monte-ds"])),
]  # fmt: skip


def error_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def run_suite(steps: Sequence[Step], out: Path, budget_s: float, smoke: bool, suite: dict) -> dict:
    """Run `steps` in order within `budget_s`, recording each in out/suite.json and suite.md as it ends.

    A step whose cap exceeds what is left of the budget is not started (skipped for the budget);
    a step that raises is recorded as failed with its error, and the next one runs."""
    deadline = time.monotonic() + budget_s
    suite.update(budget_s=budget_s, order=[step.name for step in steps], steps={})  # suite.json sorts keys
    for step in steps:
        cap_s = step.smoke_cap_s if smoke else step.cap_s
        left_s = deadline - time.monotonic()
        record: dict = {"cap_s": cap_s, "budget_left_s": round(left_s, 1)}
        started = time.monotonic()
        if left_s < cap_s:
            record.update(status="skipped", reason=f"budget: {max(left_s, 0):.1f} s left < its cap of {cap_s} s")
        else:
            try:
                record.update(step.run(out, smoke, cap_s), status="ok")
            except StepFailed as err:
                record.update(err.details, status="failed", error=error_line(err))
            except Exception as err:  # any error of one step is that step's result; the next one runs
                record.update(status="failed", error=error_line(err))
        record["seconds"] = time.monotonic() - started
        suite["steps"][step.name] = record
        print(f"{step.name}: {record['status']} ({record['seconds']:.0f} s of {cap_s} s cap, "
              f"{left_s - record['seconds']:.0f} s of budget left)", file=sys.stderr, flush=True)  # fmt: skip
        atomic_write_json(out / "suite.json", suite)  # each step's result is kept as soon as it exists
        atomic_write_text(out / "suite.md", markdown(suite))
    return suite


def status_text(step: dict) -> str:
    if step["status"] == "skipped":
        return f"skipped ({step['reason']})"
    if step["status"] == "failed":
        return f"failed: {step['error']}".replace("|", "\\|")
    return step.get("summary", "ok")


def markdown(suite: dict) -> str:
    lines = [
        f"# monte-ds GPU suite ({suite['device']}{', smoke' if suite['smoke'] else ''})", "",
        f"Budget {suite['budget_s']:.0f} s; torch {suite['versions'].get('torch')}, "
        f"transformers {suite['versions'].get('transformers')}, peft {suite['versions'].get('peft')}, "
        f"bitsandbytes {suite['versions'].get('bitsandbytes')}.", "",
        "| step | status | seconds (cap) | monte-ds / LoRA step time | peak memory | extra aten ops / layer | "
        "extra launching ops / layer | extra CUDA kernels / layer |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, step in suite["steps"].items():
        row = step.get("result", {}).get("methods", {}).get("monte-ds", {})

        def fmt(key: str, pattern: str = "{:.2f}") -> str:
            return pattern.format(row[key]) if key in row else "—"

        memory = (
            f"{row['peak_memory_bytes'] / GIB:.2f} GiB ({row['peak_memory_ratio']:.3f}×)"
            if "peak_memory_ratio" in row
            else "—"
        )
        lines.append(
            f"| {name} | {status_text(step)} | {step['seconds']:.0f} ({step['cap_s']}) | {fmt('step_time_ratio', '{:.3f}×')} | "
            f"{memory} | {fmt('extra_aten_ops_per_adapted_layer', '{:.1f}')} | "
            f"{fmt('extra_launching_aten_ops_per_adapted_layer', '{:.1f}')} | {fmt('extra_cuda_kernels_per_adapted_layer', '{:.1f}')} |"
        )
    qlora = suite["steps"].get("llama7b-qlora", {}).get("fits_24gb_card")
    if qlora:
        lines += [
            "",
            "LLaMA-7B QLoRA fits a 24 GB card: "
            + ", ".join(f"{m}: {'yes' if ok else 'no'}" for m, ok in qlora.items()),
        ]
    return "\n".join(lines) + "\n"


def installed_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in VERSIONS_OF} | {"cuda": torch.version.cuda}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for suite.json, suite.md and each step's JSON")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-time budget in seconds: no step starts when less than its cap is left")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the suite itself")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        raise UserError(f"must be > 0 seconds, got {args.budget_s:g}", key="--budget-s")
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA device: run on a GPU machine, or use --smoke to check the suite on CPU")
    # killed (SIGTERM, e.g. at the end of a slot): stop the running step's processes on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.out.mkdir(parents=True, exist_ok=True)
    suite = {
        "device": "cpu" if args.smoke else torch.cuda.get_device_name(0),
        "smoke": args.smoke,
        "versions": installed_versions(),
    }
    run_suite(STEPS, args.out, args.budget_s, args.smoke, suite)
    print(markdown(suite))
    return 0 if all(step["status"] == "ok" for step in suite["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
