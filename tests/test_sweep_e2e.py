"""Small sweeps through the real `monte-ds train` (tiny config, gsm8k evaluation on local data).

Two learning rates x two methods: 1e-3 trains and is evaluated; 1e30 makes the loss non-finite
within a few steps, so the sweep must record a real divergence and count it. A second invocation
must train nothing. Then MonteCLoRA against a baseline that is not LoRA (IA³).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monte_ds.cli import main as monte_ds


REPO = Path(__file__).resolve().parents[1]
PROBLEMS = [
    (
        "Mia has 3 apples. She buys 2 more apples. How many apples does Mia have now?",
        "Mia has 3 + 2 = 5 apples now.\n#### 5",
    ),
    (
        "Leo has 9 coins. He gives 4 coins to Ava. How many coins does Leo have left?",
        "Leo has 9 - 4 = 5 coins left.\n#### 5",
    ),
    (
        "Sam has 2 boxes. Each box holds 6 eggs. How many eggs does Sam have in total?",
        "Sam has 2 * 6 = 12 eggs in total.\n#### 12",
    ),
]


def tiny_sweep_args(tmp_path: Path, config: Path, learning_rates: str, methods: str) -> list[str]:
    """A sweep of configs/tiny.json-like runs: 4 steps, gsm8k on three local problems."""
    data_dir = tmp_path / "eval-data"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS)
    )
    evaluation = {"suites": ["gsm8k"], "data_dir": str(data_dir), "num_fewshot": 0, "max_gen_toks": 8, "batch_size": 4}
    return [
        "sweep",
        "--config",
        str(config),
        "--grid",
        f"training.learning_rate={learning_rates}",
        "--methods",
        methods,
        "--output",
        str(tmp_path / "sweep"),
        "--set",
        f"model.path={tmp_path / 'tiny-llama'}",
        "--set",
        "data.max_samples=64",
        "--set",
        "training.max_steps=4",
        "--set",
        "training.per_device_train_batch_size=4",
        "--set",
        "training.warmup_steps=0",
        "--set",
        "training.logging_steps=1",
        "--set",
        "training.report_to=[]",
        "--set",
        f"eval={json.dumps(evaluation)}",
    ]


@pytest.mark.slow
def test_a_tiny_sweep_through_the_training_cli(tmp_path):
    args = tiny_sweep_args(tmp_path, REPO / "configs" / "tiny.json", "1e-3,1e30", "lora,monteclora")
    output = tmp_path / "sweep"
    assert monte_ds(args) == 0

    report = json.loads((output / "sweep.json").read_text())
    assert report["counts"] == {
        m: {"completed": 1, "diverged": 1, "failed": 0, "pending": 0} for m in ("lora", "monteclora")
    }
    sections = {(s["task"], s["metric"]): s for s in report["metrics"]}
    assert set(sections) == {("gsm8k", "exact_match,strict-match"), ("gsm8k", "exact_match,flexible-extract")}
    for run in report["runs"]:
        run_dir = Path(run["output_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert (
            run["status"] == metrics["status"] == ("completed" if "learning_rate=1e-3" in run["run_id"] else "diverged")
        )
        assert json.loads((run_dir / "config.json").read_text())["adapter"]["method"] == run["method"]
        if run["status"] == "completed":
            results = json.loads((run_dir / "report" / "report.json").read_text())["lm_eval"]["results"]["gsm8k"]
            assert {s["metric"]: s["value"] for s in run["scores"]} == {
                key: results[key] for key in ("exact_match,strict-match", "exact_match,flexible-extract")
            }
    for section in sections.values():
        for method in ("lora", "monteclora"):
            summary = section["methods"][method]
            assert (summary["n"], summary["n_failed"]) == (2, 1) and summary["spread"] is None
        (comparison,) = section["comparisons"]
        assert comparison["n_pairs"] == 2 and comparison["ties"] >= 1  # both methods diverged at 1e30
        assert (output / section["plot"]).stat().st_size > 0

    logs = sorted((output / "logs").iterdir())
    stamps = [log.stat().st_mtime_ns for log in logs]
    assert monte_ds(args) == 0  # restart: every run is finished, nothing is trained again
    assert [log.stat().st_mtime_ns for log in sorted((output / "logs").iterdir())] == stamps


@pytest.mark.slow
def test_a_sweep_against_a_baseline_that_is_not_lora(tmp_path):
    config = json.loads((REPO / "configs" / "tiny.json").read_text())
    config["adapter"] = {"modules_to_save": ["lm_head"]}  # what IA³ and MonteCLoRA share; ranks are LoRA's
    base = tmp_path / "base.json"
    base.write_text(json.dumps(config))
    assert monte_ds(tiny_sweep_args(tmp_path, base, "1e-3", "ia3,monteclora")) == 0

    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert report["counts"] == {
        m: {"completed": 1, "diverged": 0, "failed": 0, "pending": 0} for m in ("ia3", "monteclora")
    }
    for section in report["metrics"]:
        (comparison,) = section["comparisons"]
        assert (comparison["a"], comparison["b"], comparison["n_pairs"]) == ("monteclora", "ia3", 1)
    (ia3,) = [run for run in report["runs"] if run["method"] == "ia3"]
    run_dir = Path(ia3["output_dir"])
    assert json.loads((run_dir / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert json.loads((run_dir / "report" / "report.json").read_text())["metadata"]["adapter_method"] == "ia3"
    assert {s["metric"] for s in ia3["scores"]} == {"exact_match,strict-match", "exact_match,flexible-extract"}
