"""The SmolLM2-135M-Instruct robustness study (studies/smollm2-robustness/, issue 20) is the study
the issue asks for: its run.sh plans at least 24 MonteCLoRA-LoRA pairs and 8 against DoRA and
against AdaLoRA over >= 4 learning rates spanning two orders of magnitude x 2 batch sizes, runs
everything at nice 19, scores MonteCLoRA's posterior-predictive only where it has one, and its
base config is a valid training config for every method. Nothing is trained (--plan-only)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from monte_ds.train.config import read_config, validate_config


REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "smollm2-robustness"


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> tuple[Path, list[dict[str, str]], list[str]]:
    """(WORK, the planned runs' --set overrides, the niceness each Python process ran at)."""
    tmp = tmp_path_factory.mktemp("study")
    log = tmp / "nice.log"
    python = tmp / "python"  # the study's Python, recording the priority it was started at
    python.write_text(f'#!/bin/sh\nnice >> "{log}"\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "WORK": str(tmp / "work")}
    result = subprocess.run([str(STUDY / "run.sh"), "--plan-only"], env=env, capture_output=True, text=True, check=True)
    runs = {}
    for line in result.stdout.splitlines():
        if " train " not in line:
            continue  # make_data's summary
        words = shlex.split(line)
        overrides = dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--set")
        assert words[words.index("--config") + 1] == str(STUDY / "base.json")
        runs[overrides["training.output_dir"]] = overrides  # seed 0 is planned again by the later sweeps
    return tmp / "work", list(runs.values()), log.read_text().split()


@pytest.mark.slow
def test_the_plan_has_the_pairs_and_the_grid_the_issue_asks_for(plan):
    work, runs, niceness = plan
    keys = defaultdict(set)
    for run in runs:
        key = (run["training.learning_rate"], run["training.per_device_train_batch_size"], run["training.seed"])
        keys[run["adapter.method"]].add(key)
    assert len(keys["monteclora"] & keys["lora"]) >= 24
    assert len(keys["monteclora"] & keys["dora"]) >= 8 and len(keys["monteclora"] & keys["adalora"]) >= 8
    learning_rates = sorted({float(lr) for lr, _, _ in keys["monteclora"]})
    assert len(learning_rates) >= 4 and learning_rates[-1] / learning_rates[0] >= 100
    assert len({bs for _, bs, _ in keys["monteclora"]}) == 2 and {s for _, _, s in keys["lora"]} == {"0", "1", "2"}
    for run in runs:  # posterior-predictive draws for MonteCLoRA only: the other methods have no posterior
        assert (run.get("eval.predictive_samples") == "10") == (run["adapter.method"] == "monteclora")
        assert run["data.path"] == f"{work}/data/finetune.jsonl" and run["eval.data_dir"] == f"{work}/data/eval"
    assert niceness and set(niceness) == {"19"}
    assert json.loads((work / "sweep" / "sweep.json").read_text())["counts"]["monteclora"]["pending"] == 24


@pytest.mark.slow
def test_the_base_config_is_valid_for_every_method_of_the_study(plan):
    work, runs, _ = plan
    for run in {run["adapter.method"]: run for run in runs}.values():
        overrides = [f"{key}={value}" for key, value in run.items()]
        config = validate_config(read_config(STUDY / "base.json", overrides))
        assert config.method == run["adapter.method"]
        assert config.eval["suites"] == ["synth_gsm8k", "synth_mc"]
