"""Generation limits fitted to a short-context model: every suite runs and is reported, and a
task that cannot run on the model is one line, exit 2, before anything is computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_eval.models.huggingface import HFLM

from monte_ds.cli import main as monte_ds_main
from monte_ds.evaluation import humaneval
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE, BUNDLED_SAMPLE_DIR
from monte_ds.tiny import build_tiny_llama


EVERY_SUITE = ["--suites", "gsm8k,humaneval,commonsense", "--allow-code-execution", "--humaneval-samples", "1"]


def tiny_model(directory: Path, context: int) -> Path:
    texts = [path.read_text() for path in sorted(BUNDLED_SAMPLE_DIR.rglob("*.jsonl"))]
    return build_tiny_llama(directory, texts, vocab_size=512, seed=0, max_position_embeddings=context)


def test_every_suite_on_a_384_token_model_reports_the_limits_it_used(tmp_path, capfd):
    model = tiny_model(tmp_path / "model", context=384)
    out = tmp_path / "report"
    args = [
        "eval",
        "--model",
        str(model),
        *EVERY_SUITE,
        "--data-dir",
        BUNDLED_SAMPLE,
        "--limit",
        "1",
        "--output",
        str(out),
    ]
    assert monte_ds_main(args) == 0
    assert "Traceback" not in capfd.readouterr().err

    report = json.loads((out / "report.json").read_text())
    assert [suite["status"] for suite in report["suites"].values()] == ["completed"] * 3
    assert {"gsm8k", "humaneval", "arc_easy", "hellaswag"} <= set(report["lm_eval"]["results"])
    assert report["metadata"]["context_length"] == 384
    for task, requested in (("gsm8k", 256), ("humaneval", 1024)):
        limit = report["generation"][task]
        # Neither task default fits beside the prompts: generation gets what the longest
        # document's own prompt leaves of the context, and lm-eval ran with exactly that.
        assert limit["requested_max_gen_toks"] == requested and limit["derived"] is True
        assert limit["max_gen_toks"] == 384 - limit["longest_prompt_tokens"]
        assert limit["max_prompt_tokens"] == limit["longest_prompt_tokens"]
        assert 0 < limit["max_gen_toks"] < requested
        assert report["lm_eval"]["configs"][task]["generation_kwargs"]["max_gen_toks"] == limit["max_gen_toks"]
    # HumanEval's prompts fit whole; GSM8k's 5-shot prompts do not, and lm-eval cut their first shots.
    assert report["generation"]["humaneval"]["truncated_prompts"] == 0
    assert report["generation"]["gsm8k"]["truncated_prompts"] == 1
    assert "## Generation limits" in (out / "report.md").read_text()


def test_a_task_that_cannot_run_on_the_model_is_one_line_before_anything_is_computed(tmp_path, capsys, monkeypatch):
    model = tiny_model(tmp_path / "model", context=256)
    computed = []
    monkeypatch.setattr(HFLM, "loglikelihood", lambda self, *a, **k: computed.append("loglikelihood"))
    monkeypatch.setattr(HFLM, "generate_until", lambda self, *a, **k: computed.append("generate_until"))
    monkeypatch.setattr(humaneval, "check_correctness", lambda *a: computed.append("executed"))
    out = tmp_path / "report"
    args = [
        "eval",
        "--model",
        str(model),
        "--suites",
        "commonsense,humaneval",
        "--allow-code-execution",
        "--data-dir",
        BUNDLED_SAMPLE,
        "--limit",
        "2",
        "--output",
        str(out),
    ]
    assert monte_ds_main(args) == 2
    err = capsys.readouterr().err  # after the model load's progress bar
    assert "Traceback" not in err and err.count("monte-ds: error:") == 1
    line = err.splitlines()[-1]
    assert line.startswith("monte-ds: error: --suites: humaneval: cannot run on this model: a prompt of ")
    assert line.endswith("tokens leaves nothing to generate in its 256-token context")
    assert computed == [] and not out.exists()


@pytest.mark.parametrize("cap", [4, 5000])
def test_the_max_gen_toks_option_caps_every_generation_task(tmp_path, cap):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from monte_ds.evaluation import plan_evaluation, run_plan

    model_path = tiny_model(tmp_path / "model", context=384)
    plan = plan_evaluation(
        {"suites": ["gsm8k"], "data_dir": BUNDLED_SAMPLE, "limit": 1, "num_fewshot": 0, "max_gen_toks": cap}
    )
    report = run_plan(
        plan,
        AutoModelForCausalLM.from_pretrained(model_path),
        AutoTokenizer.from_pretrained(model_path),
        tmp_path / "report",
    )
    limit = report["generation"]["gsm8k"]
    assert limit["requested_max_gen_toks"] == cap
    # A cap that fits is used as given; one that does not is fitted like a task default.
    assert limit["max_gen_toks"] == min(cap, 384 - limit["longest_prompt_tokens"])
    assert limit["derived"] is (cap == 5000)
