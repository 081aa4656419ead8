"""benchmarks/gpu_suite.py: the budget (steps in order, none started when less than its cap is
left, a failed step recorded and the next one run, every result on disk the moment its step
ends), the cap (a step and its children stopped there), and --smoke: every step at tiny size on
CPU, so the suite cannot rot while no GPU is around. No timing asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest


SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
ORDER = [
    "cuda-tests",
    "overhead-1b-bf16-async",
    "overhead-1b-bf16-sync",
    "overhead-1b-nf4",
    "llama7b-qlora",
    "launch-bound",
]


@pytest.fixture(scope="module")
def gpu_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_suite", module)
    spec.loader.exec_module(module)
    return module


def header() -> dict:
    return {"device": "cpu", "smoke": True, "versions": {}}


def test_a_step_is_not_started_when_less_than_its_cap_is_left_and_a_failure_does_not_stop_the_suite(
    gpu_suite, tmp_path
):
    on_disk_at_start: dict[str, list[str]] = {}

    def step(name: str, cap_s: int, seconds: float = 0.0, error: Exception | None = None):
        def run(out: Path, smoke: bool, cap: int) -> dict:
            suite_json = out / "suite.json"
            on_disk_at_start[name] = list(json.loads(suite_json.read_text())["steps"]) if suite_json.exists() else []
            time.sleep(seconds)
            if error is not None:
                raise error
            return {"summary": f"{name} done", "cap_seen": cap}

        return gpu_suite.Step(name, cap_s=1000, smoke_cap_s=cap_s, run=run)

    steps = [
        step("first", 1, seconds=0.5),  # starts with 1.4 s left, leaves < 1 s
        step("too-big", 1),  # its cap (1 s) is more than what is left
        step("fails", 0, error=ValueError("boom")),
        step("last", 0),
    ]
    suite = gpu_suite.run_suite(steps, tmp_path, budget_s=1.4, smoke=True, suite=header())

    records = suite["steps"]
    assert list(records) == ["first", "too-big", "fails", "last"]
    assert [r["status"] for r in records.values()] == ["ok", "skipped", "failed", "ok"]
    assert records["first"]["cap_seen"] == 1 and records["first"]["cap_s"] == 1  # the smoke cap, smoke being on
    assert re.fullmatch(r"budget: 0\.\d s left < its cap of 1 s", records["too-big"]["reason"])
    assert records["fails"]["error"] == "ValueError: boom"
    assert list(on_disk_at_start) == ["first", "fails", "last"]  # the skipped step never ran
    assert on_disk_at_start["fails"] == ["first", "too-big"]  # each result was written when its step ended
    assert records["first"]["budget_left_s"] > records["fails"]["budget_left_s"]
    assert json.loads((tmp_path / "suite.json").read_text()) == json.loads(json.dumps(suite))
    markdown = (tmp_path / "suite.md").read_text()
    assert f"skipped ({records['too-big']['reason']})" in markdown and "failed: ValueError: boom" in markdown


def test_a_step_over_its_cap_is_stopped_with_its_children(gpu_suite, tmp_path):
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"pathlib.Path({str(child_pid)!r}).write_text(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    started = time.monotonic()
    with pytest.raises(gpu_suite.StepTimeout, match="stopped at its cap of 3 s"):
        gpu_suite.run_capped([sys.executable, "-c", script], cap_s=3)
    assert time.monotonic() - started < 3 + 5  # TERM before the cap, KILL at it, plus process teardown
    pid = int(child_pid.read_text())
    for _ in range(50):  # the orphaned child is reaped by init shortly after it dies
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {pid} outlived the cap")


def test_a_tiny_budget_skips_every_step_in_order_and_records_why(tmp_path):
    process = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--budget-s", "1"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert process.returncode == 1, process.stderr[-3000:]  # not every step ran: not a pass
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["budget_s"] == 1 and suite["order"] == ORDER and set(suite["steps"]) == set(ORDER)
    assert all(step["status"] == "skipped" and step["reason"].startswith("budget:") for step in suite["steps"].values())
    assert not list(tmp_path.glob("*-*.json"))  # no step produced anything
    assert all(name in (tmp_path / "suite.md").read_text() for name in ORDER)


def test_a_budget_that_is_not_positive_is_one_line_and_exit_2(tmp_path):
    process = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--budget-s", "0"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert process.returncode == 2
    assert process.stderr.strip() == "monte-ds: error: --budget-s: must be > 0 seconds, got 0"


@pytest.mark.slow
def test_smoke_suite_runs_every_step_and_records_the_op_counts(gpu_suite, tmp_path):
    budget = sum(step.smoke_cap_s for step in gpu_suite.STEPS)  # every step may start, whatever the machine's load
    process = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--budget-s", str(budget)],
                             capture_output=True, text=True, timeout=budget + 120)  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["order"] == ORDER and set(suite["steps"]) == set(ORDER)
    assert "skipped" in suite["steps"]["cuda-tests"]["summary"]  # no CUDA here: every CUDA test skips
    for name in ORDER[1:]:
        step = suite["steps"][name]
        assert step["seconds"] <= step["cap_s"] <= step["budget_left_s"]
        methods = step["result"]["methods"]
        assert set(methods) == {"lora", "monte-ds"}
        monte = methods["monte-ds"]
        assert monte["sampled_layers"] == monte["adapted_layers"] > 0  # nf4 bases get the noise too
        assert monte["aten_ops_per_step"] > methods["lora"]["aten_ops_per_step"] > 0
        assert 0 < monte["extra_launching_aten_ops_per_adapted_layer"] <= monte["extra_aten_ops_per_adapted_layer"]
    assert [suite["steps"][n]["result"]["settings"]["sampler"] for n in ORDER[1:3]] == ["async", "sync"]
    assert suite["steps"]["llama7b-qlora"]["fits_24gb_card"] == {}  # CPU figures: no card verdict
    markdown = (tmp_path / "suite.md").read_text()
    assert all(name in markdown for name in suite["steps"])
