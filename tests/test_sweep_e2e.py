"""One small sweep through the real `monte-ds train` (tiny config, gsm8k evaluation on local data).

Two learning rates x two methods: 1e-3 trains and is evaluated; 1e30 makes the loss non-finite
within a few steps, so the sweep must record a real divergence and count it. A second invocation
must train nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monte_ds.cli import main as monte_ds

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = [
    ("Mia has 3 apples. She buys 2 more apples. How many apples does Mia have now?", "Mia has 3 + 2 = 5 apples now.\n#### 5"),
    ("Leo has 9 coins. He gives 4 coins to Ava. How many coins does Leo have left?", "Leo has 9 - 4 = 5 coins left.\n#### 5"),
    ("Sam has 2 boxes. Each box holds 6 eggs. How many eggs does Sam have in total?", "Sam has 2 * 6 = 12 eggs in total.\n#### 12"),
]


@pytest.mark.slow
def test_a_tiny_sweep_through_the_training_cli(tmp_path):
    data_dir = tmp_path / "eval-data"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS))
    evaluation = {"suites": ["gsm8k"], "data_dir": str(data_dir), "num_fewshot": 0, "max_gen_toks": 8, "batch_size": 4}
    output = tmp_path / "sweep"
    args = [
        "sweep", "--config", str(REPO / "configs" / "tiny.json"),
        "--grid", "training.learning_rate=1e-3,1e30", "--methods", "lora,monteclora", "--output", str(output),
        "--set", f"model.path={tmp_path / 'tiny-llama'}",
        "--set", "data.max_samples=64",
        "--set", "training.max_steps=4",
        "--set", "training.per_device_train_batch_size=4",
        "--set", "training.warmup_steps=0",
        "--set", "training.logging_steps=1",
        "--set", "training.report_to=[]",
        "--set", f"eval={json.dumps(evaluation)}",
    ]
    assert monte_ds(args) == 0

    report = json.loads((output / "sweep.json").read_text())
    assert report["counts"] == {m: {"completed": 1, "diverged": 1, "failed": 0, "pending": 0} for m in ("lora", "monteclora")}
    sections = {(s["task"], s["metric"]): s for s in report["metrics"]}
    assert set(sections) == {("gsm8k", "exact_match,strict-match"), ("gsm8k", "exact_match,flexible-extract")}
    for run in report["runs"]:
        run_dir = Path(run["output_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert run["status"] == metrics["status"] == ("completed" if "learning_rate=1e-3" in run["run_id"] else "diverged")
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
