"""The evaluation after training: planned once before training (each evaluation dataset
loaded once), and a failure there never fails the run nor loses its adapters."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from lm_eval.models.huggingface import HFLM

from monte_ds.errors import run_cli
from monte_ds.evaluation import loading
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE, BUNDLED_SAMPLE_DIR
from monte_ds.train.run import main as train_main


FAILURE = "RuntimeError: CUDA error: an illegal memory access was encountered"


def write_config(directory: Path) -> Path:
    """Two training steps on the bundled data, a tiny base built by the run, two suites after it."""
    config = {
        "model": {"path": str(directory / "tiny-llama"), "build_tiny": True, "dtype": "float32"},
        "adapter": {"r": 4, "lora_alpha": 8},
        "data": {"path": "bundled:tiny_instruct.jsonl", "max_samples": 16},
        "training": {
            "output_dir": str(directory / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "max_length": 64,
            "bf16": False,
            "optim": "adamw_torch",
            "save_steps": 2,
            "report_to": [],
        },
        "eval": {"suites": ["arc_easy", "gsm8k"], "data_dir": BUNDLED_SAMPLE, "limit": 2, "max_gen_toks": 4},
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def raise_failure(*args, **kwargs):
    raise RuntimeError(FAILURE.removeprefix("RuntimeError: "))


@pytest.mark.parametrize("where", ["a suite", "the model load"])
def test_a_failing_evaluation_keeps_the_run_completed_with_its_adapters(tmp_path, monkeypatch, where):
    loads = []
    load_dataset = datasets.load_dataset

    def counting_load_dataset(path, *args, **kwargs):
        files = kwargs.get("data_files") or {}
        loads.extend(f for f in (files.values() if isinstance(files, dict) else []) if str(BUNDLED_SAMPLE_DIR) in f)
        return load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", counting_load_dataset)
    if where == "a suite":
        monkeypatch.setattr(HFLM, "generate_until", raise_failure)
    else:
        monkeypatch.setattr(loading, "load_model", raise_failure)

    assert run_cli(train_main, ["--config", str(write_config(tmp_path))]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
    assert (out / "adapter" / "monteclora_config.json").is_file()
    assert (out / "lora_adapter" / "adapter_config.json").is_file()

    report = json.loads((out / "report" / "report.json").read_text())
    statuses = {name: suite["status"] for name, suite in report["suites"].items()}
    if where == "a suite":
        assert statuses == {"arc_easy": "completed", "gsm8k": "failed"}
        assert report["suites"]["gsm8k"]["error"] == FAILURE
        assert report["tasks"] == ["arc_easy"] and report["metadata"]["adapter_type"] == "monteclora"
        assert (out / "report" / "training_curves.png").is_file()  # the trainer's log history, in memory
    else:
        assert statuses == {"arc_easy": "failed", "gsm8k": "failed"}
        assert {suite["error"] for suite in report["suites"].values()} == {FAILURE}
        assert report["tasks"] == []
    assert report["metadata"]["config_hash"] and report["metadata"]["adapter_method"] == "monteclora"

    # Planned once, before training: every evaluation file was read exactly once.
    expected = {
        str(BUNDLED_SAMPLE_DIR / "arc_easy/test.jsonl"),
        str(BUNDLED_SAMPLE_DIR / "gsm8k/test.jsonl"),
        str(BUNDLED_SAMPLE_DIR / "gsm8k/train.jsonl"),
    }
    assert sorted(loads) == sorted(expected)
