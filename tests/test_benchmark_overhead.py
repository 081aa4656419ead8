"""benchmarks/overhead.py through its real CLI at a tiny size: the JSON's structure and sanity.

Never a timed assertion: step times and memory on a shared CPU are only checked to be
positive and consistent with each other.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = [
    "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "4",
    "--num-kv-heads", "2", "--vocab-size", "128", "--rank", "4", "--batch-size", "2", "--seq-len", "16",
    "--steps", "2", "--warmup-steps", "1", "--device", "cpu",
]  # fmt: skip
ADAPTED_PER_DECODER_LAYER = 7  # LLaMA's q, k, v, o, gate, up, down projections


def run_benchmark(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "overhead.json"
    process = subprocess.run(
        [sys.executable, str(BENCHMARKS / "overhead.py"), *TINY, *extra, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(out.read_text()), process.stdout


def check_method(row: dict, measured_steps: int, rounds: int) -> None:
    assert row["measured_steps"] == measured_steps
    assert 0 < row["q1_step_s"] <= row["median_step_s"] <= row["q3_step_s"]
    assert row["iqr_step_s"] == pytest.approx(row["q3_step_s"] - row["q1_step_s"])
    assert len(row["round_median_step_s"]) == len(row["round_peak_memory_bytes"]) == rounds
    assert all(s > 0 for s in row["round_median_step_s"])
    assert row["median_step_cpu_s"] > 0
    # a process holding torch and a model has well over 10 MiB resident
    assert all(peak > 10 * 2**20 for peak in row["round_peak_memory_bytes"])
    assert row["peak_memory_bytes"] >= row["memory_after_build_bytes"] * 0.5
    assert row["adapted_layers"] == ADAPTED_PER_DECODER_LAYER
    assert row["trainable_parameters"] > 0
    for ratio in ("step_time_ratio", "step_cpu_time_ratio", "peak_memory_ratio", "median_paired_step_time_ratio"):
        assert math.isfinite(row[ratio]) and row[ratio] > 0
    assert len(row["paired_step_time_ratios"]) == rounds


@pytest.mark.slow
def test_three_methods_interleaved_in_fresh_processes(tmp_path):
    report, stdout = run_benchmark(tmp_path, "--rounds", "2")
    methods = ["lora", "monte-ds", "peft-monteclora"]  # peft 0.21.2 is installed
    assert set(report["methods"]) == set(methods)
    assert report["order"] == methods * 2  # a, b, c, a, b, c
    assert report["memory_metric"] in ("rss_high_water_mark_since_build", "ru_maxrss_whole_process")
    for method in methods:
        check_method(report["methods"][method], measured_steps=2 * 2, rounds=2)
        assert method in stdout
    lora, monte = report["methods"]["lora"], report["methods"]["monte-ds"]
    assert lora["step_time_ratio"] == 1.0 and lora["peak_memory_ratio"] == 1.0
    assert monte["step_time_ratio"] == pytest.approx(monte["median_step_s"] / lora["median_step_s"])
    assert monte["peak_memory_ratio"] == pytest.approx(monte["peak_memory_bytes"] / lora["peak_memory_bytes"])
    assert lora["sampled_layers"] == 0
    assert monte["sampled_layers"] == ADAPTED_PER_DECODER_LAYER
    # monte-ds adds ln v (r) and ln alpha (N = 4) per layer on top of LoRA's A and B
    assert monte["trainable_parameters"] == lora["trainable_parameters"] + ADAPTED_PER_DECODER_LAYER * (4 + 4)
    assert report["settings"]["rank"] == 4 and report["settings"]["sampler"] == "auto"
    # op counts from the profiler: monte-ds adds ops, some of them metadata-only, some in the optimizer
    assert monte["aten_ops_per_step"] > lora["aten_ops_per_step"] > lora["launching_aten_ops_per_step"] > 0
    assert 0 < monte["extra_launching_aten_ops_per_adapted_layer"] < monte["extra_aten_ops_per_adapted_layer"]
    assert monte["extra_aten_ops_per_adapted_layer"] == pytest.approx(
        (monte["aten_ops_per_step"] - lora["aten_ops_per_step"]) / ADAPTED_PER_DECODER_LAYER
    )
    assert monte["optimizer_aten_ops_per_step"] > lora["optimizer_aten_ops_per_step"] > 0  # ln v, ln alpha
    assert report["environment"]["peft"]
    assert len(report["environment"]["load_average_before"]) == 3


@pytest.mark.slow
def test_4bit_base_gradient_checkpointing_and_sync_sampler_reach_the_workers(tmp_path):
    report, _ = run_benchmark(
        tmp_path, "--load-in-4bit", "--gradient-checkpointing", "--sampler", "sync", "--methods", "lora,monte-ds",
        "--rounds", "1",
    )  # fmt: skip
    assert set(report["methods"]) == {"lora", "monte-ds"}
    assert report["settings"]["load_in_4bit"] and report["settings"]["gradient_checkpointing"]
    for row in report["methods"].values():
        check_method(row, measured_steps=2, rounds=1)
    # the noise is applied on the quantized base too
    assert report["methods"]["monte-ds"]["sampled_layers"] == ADAPTED_PER_DECODER_LAYER


def test_launch_bound_preset_sets_defaults_that_explicit_flags_override(overhead):
    args = overhead.parse_args(["--preset", "launch-bound", "--num-layers", "8", "--rank", "4"])
    assert (args.hidden_size, args.batch_size, args.seq_len, args.threads) == (64, 1, 16, 1)
    assert (args.num_layers, args.rank) == (8, 4)  # given explicitly: the preset does not override them
    assert overhead.parse_args([]).hidden_size == 512


@pytest.fixture
def overhead(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import overhead

    return overhead


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "lora,qlora"], "--methods: unknown method 'qlora'"),
        (["--methods", "lora,lora"], "--methods: give each method at most once"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--num-heads", "3"], "--hidden-size / --num-heads"),
    ],
)
def test_bad_flags_are_one_line_errors(overhead, capsys, flags, message):
    assert overhead.run_cli(overhead.main, [*TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
