"""benchmarks/gpu_suite.py --smoke: every step of the GPU suite runs at tiny size on CPU and
records what it measured, so the suite cannot rot while no GPU is around. No timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_smoke_suite_runs_every_step_and_records_the_op_counts(tmp_path):
    process = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    overheads = {"overhead-1b-bf16", "overhead-1b-nf4", "overhead-1b-bf16-sync", "launch-bound", "llama7b-qlora"}
    assert set(suite["steps"]) == {"cuda-tests", *overheads}
    assert "skipped" in suite["steps"]["cuda-tests"]["summary"]  # no CUDA here: every CUDA test skips
    for name in overheads:
        methods = suite["steps"][name]["result"]["methods"]
        assert set(methods) == {"lora", "monte-ds"}
        monte = methods["monte-ds"]
        assert monte["sampled_layers"] == monte["adapted_layers"] > 0  # nf4 bases get the noise too
        assert monte["aten_ops_per_step"] > methods["lora"]["aten_ops_per_step"] > 0
        assert 0 < monte["extra_launching_aten_ops_per_adapted_layer"] <= monte["extra_aten_ops_per_adapted_layer"]
    markdown = (tmp_path / "suite.md").read_text()
    assert all(name in markdown for name in suite["steps"])
