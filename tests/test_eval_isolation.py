"""Per-suite isolation: each suite's results are in the report as soon as it finishes, and a
suite that fails at run time is recorded as failed while the others' results stay."""

from __future__ import annotations

import json

from lm_eval.models.huggingface import HFLM

from monte_ds.cli import main as monte_ds_main
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE, BUNDLED_SAMPLE_DIR
from monte_ds.tiny import build_tiny_llama


OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_failing_suite_is_recorded_and_the_other_suites_are_kept(tmp_path, capsys, monkeypatch):
    texts = [path.read_text() for path in sorted(BUNDLED_SAMPLE_DIR.rglob("*.jsonl"))]
    model = build_tiny_llama(tmp_path / "model", texts, vocab_size=512, seed=0)
    out = tmp_path / "report"
    seen_while_generating = []

    def failing_generation(self, requests, disable_tqdm=False):
        seen_while_generating.append(json.loads((out / "report.json").read_text()))
        raise RuntimeError(OUT_OF_MEMORY)

    monkeypatch.setattr(HFLM, "generate_until", failing_generation)
    args = [
        "eval",
        "--model",
        str(model),
        "--suites",
        "boolq,gsm8k,piqa",
        "--data-dir",
        BUNDLED_SAMPLE,
        "--limit",
        "2",
        "--output",
        str(out),
    ]
    assert monte_ds_main(args) == 3
    err = capsys.readouterr().err  # after the model build's and load's progress bars
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"monte-ds: error: 1 suite(s) failed, the others are in the report -- gsm8k: RuntimeError: {OUT_OF_MEMORY}"
    )

    # boolq's results were on disk before gsm8k started generating.
    (snapshot,) = seen_while_generating
    assert {name: suite["status"] for name, suite in snapshot["suites"].items()} == {
        "boolq": "completed",
        "gsm8k": "pending",
        "piqa": "pending",
    }
    assert snapshot["tasks"] == ["boolq"]

    report = json.loads((out / "report.json").read_text())
    assert {name: suite["status"] for name, suite in report["suites"].items()} == {
        "boolq": "completed",
        "gsm8k": "failed",
        "piqa": "completed",
    }
    failed = report["suites"]["gsm8k"]
    assert failed["error"] == f"RuntimeError: {OUT_OF_MEMORY}"
    assert "Traceback (most recent call last)" in failed["traceback"] and OUT_OF_MEMORY in failed["traceback"]
    assert report["tasks"] == ["boolq", "piqa"]
    assert set(report["lm_eval"]["results"]) == set(report["calibration"]) == {"boolq", "piqa"}
    assert report["lm_eval"]["n-samples"]["piqa"]["effective"] == 2
    markdown = (out / "report.md").read_text()
    assert "| piqa (0-shot, n=2) | acc |" in markdown
    assert f"- gsm8k (gsm8k): failed — RuntimeError: {OUT_OF_MEMORY}" in markdown
    assert (out / "reliability.png").is_file()
