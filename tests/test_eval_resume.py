"""A generation task runs a chunk of documents at a time, each kept in the report once scored:
a killed run reports the finished documents as partial, and a rerun into the same report
continues from them, ending where an uninterrupted run ends.

Tiny random LLaMA, greedy generation, on generated GSM8k-format problems (real lm-eval, no stubs
of the scoring; the kill is a real SIGKILL of a `monte-ds eval` process)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from monte_ds.cli import main as monte_ds_main
from monte_ds.evaluation import evaluate, plan_evaluation
from monte_ds.evaluation.generated import GSM8K_TASK, write_tasks
from monte_ds.evaluation.limits import GenerationLimit, apply_limits
from monte_ds.tiny import build_tiny_llama
from tests.conftest import sigkill_when


DOCS, BATCH = 6, 2  # three chunks of two documents


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth")
    write_tasks(path, seed=0, n_train=10, n_test=DOCS)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir) -> Path:
    texts = [path.read_text() for path in sorted(data_dir.rglob("*.jsonl"))]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), texts, vocab_size=512, seed=0)


def eval_args(model: Path, data_dir: Path, out: Path) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--suites",
        GSM8K_TASK,
        "--data-dir",
        str(data_dir),
        "--batch-size",
        str(BATCH),
        "--max-gen-toks",
        "6",
        "--output",
        str(out),
    ]


def count_generations(monkeypatch) -> list[int]:
    """The number of requests of each lm-eval generation call (real generation underneath)."""
    calls: list[int] = []
    generate = HFLM.generate_until

    def counting(self, requests, disable_tqdm=False):
        calls.append(len(requests))
        return generate(self, requests, disable_tqdm)

    monkeypatch.setattr(HFLM, "generate_until", counting)
    return calls


def read(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def chunk_files(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / "progress").rglob("*.json"))}


# A `monte-ds eval` whose second chunk never finishes: it is killed while generating it.
KILLED_RUN = textwrap.dedent("""
    import sys, time
    from lm_eval.models.huggingface import HFLM
    from monte_ds.cli import main
    generate, calls = HFLM.generate_until, []
    def second_chunk_hangs(self, requests, disable_tqdm=False):
        calls.append(len(requests))
        if len(calls) == 2:
            time.sleep(3600)
        return generate(self, requests, disable_tqdm)
    HFLM.generate_until = second_chunk_hangs
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_generative_suite_keeps_its_finished_documents_and_a_rerun_completes_it(
    tiny_model, data_dir, tmp_path, monkeypatch, capsys
):
    # Uninterrupted: three chunks, each a generation call of one batch.
    whole = tmp_path / "whole"
    calls = count_generations(monkeypatch)
    assert monte_ds_main(eval_args(tiny_model, data_dir, whole)) == 0
    assert calls == [BATCH] * 3
    expected = read(whole)
    assert expected["suites"][GSM8K_TASK] == {
        "tasks": [GSM8K_TASK],
        "status": "completed",
        "error": None,
        "progress": {GSM8K_TASK: {"done": 6, "total": 6}},
    }
    assert expected["lm_eval"]["n-samples"][GSM8K_TASK] == {"original": DOCS, "effective": DOCS}
    assert expected["partial"] == {}

    # Killed (SIGKILL) while generating the second chunk: the first is in the report, as partial.
    out = tmp_path / "killed"
    sigkill_when(
        [sys.executable, "-c", KILLED_RUN, *eval_args(tiny_model, data_dir, out)],
        lambda: (out / "report.json").is_file(),
        timeout_s=300,
    )
    partial = read(out)
    suite = partial["suites"][GSM8K_TASK]
    assert suite["status"] == "partial" and suite["progress"] == {GSM8K_TASK: {"done": 2, "total": 6}}
    assert GSM8K_TASK not in partial["lm_eval"]["results"] and partial["tasks"] == []
    kept = partial["partial"][GSM8K_TASK]
    assert (kept["done"], kept["total"]) == (2, 6)
    assert {"exact_match,strict-match", "exact_match_stderr,strict-match", "exact_match,flexible-extract"} <= set(
        kept["results"]
    )
    assert list(chunk_files(out)) == [f"progress/{GSM8K_TASK}/000000-000001.json"] == partial["files"][:1]
    assert (
        chunk_files(out)[f"progress/{GSM8K_TASK}/000000-000001.json"]
        == (chunk_files(whole)[f"progress/{GSM8K_TASK}/000000-000001.json"])
    )
    markdown = (out / "report.md").read_text()
    assert f"| {GSM8K_TASK} (0-shot, partial: 2 of 6) | exact_match (strict-match) |" in markdown
    assert f"- {GSM8K_TASK} ({GSM8K_TASK}): partial, 2 of 6 documents done" in markdown

    # The rerun generates only the four documents left, and ends where the uninterrupted run ended.
    calls.clear()
    assert monte_ds_main(eval_args(tiny_model, data_dir, out)) == 0
    assert calls == [BATCH] * 2
    resumed = read(out)
    for key in ("suites", "tasks", "generation", "partial", "files", "calibration"):
        assert resumed[key] == expected[key], key
    for key in ("results", "n-samples", "n-shot", "configs", "higher_is_better"):
        assert resumed["lm_eval"][key] == expected["lm_eval"][key], key
    assert chunk_files(out) == chunk_files(whole)
    assert (out / "report.md").read_text() == (whole / "report.md").read_text()

    # Once complete, a rerun generates nothing; another model's rerun starts over.
    calls.clear()
    assert monte_ds_main(eval_args(tiny_model, data_dir, out)) == 0
    assert calls == [] and read(out)["lm_eval"]["results"] == expected["lm_eval"]["results"]
    texts = [path.read_text() for path in sorted(data_dir.rglob("*.jsonl"))]
    other = build_tiny_llama(tmp_path / "other-model", texts, vocab_size=512, seed=1)
    assert monte_ds_main(eval_args(other, data_dir, out)) == 0
    assert calls == [BATCH] * 3
    capsys.readouterr()


def test_chunks_aggregate_to_what_one_lm_eval_pass_reports(tiny_model, data_dir, tmp_path):
    """Documents one at a time (batch 1: the same generations either way), aggregated by
    lm-eval's own machinery, give lm-eval's single-pass results."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    options = {"suites": [GSM8K_TASK], "data_dir": str(data_dir), "batch_size": 1, "max_gen_toks": 6, "limit": 4}
    report = evaluate(model, tokenizer, tmp_path / "report", **options)
    assert len(chunk_files(tmp_path / "report")) == 4

    plan = plan_evaluation(options)
    task = plan.tasks[GSM8K_TASK]
    apply_limits(plan.tasks, {GSM8K_TASK: GenerationLimit(512, 6, 6, 0)})
    single = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
        tasks=[task],
        task_manager=plan.manager,
        limit=4,
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    assert report["lm_eval"]["results"][GSM8K_TASK] == pytest.approx(single["results"][GSM8K_TASK])
    assert report["lm_eval"]["n-samples"][GSM8K_TASK] == single["n-samples"][GSM8K_TASK]
    generated = {
        s["doc_id"]: s["filtered_resps"]
        for f in chunk_files(tmp_path / "report").values()
        for s in f["samples"]
        if s["filter"] == "strict-match"
    }
    assert generated == {
        s["doc_id"]: s["filtered_resps"] for s in single["samples"][GSM8K_TASK] if s["filter"] == "strict-match"
    }


def test_a_stored_chunk_of_other_settings_is_not_reused(tiny_model, data_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    options = {"suites": [GSM8K_TASK], "data_dir": str(data_dir), "batch_size": 2, "max_gen_toks": 6, "limit": 4}
    out = tmp_path / "report"
    evaluate(model, tokenizer, out, **options)
    calls = count_generations(monkeypatch)
    evaluate(model, tokenizer, out, **{**options, "max_gen_toks": 5})  # another generation length
    evaluate(model, tokenizer, out, **{**options, "max_gen_toks": 5, "limit": 6})  # two more documents
    assert calls == [2, 2, 2]
    with torch.no_grad():  # the same path, other weights: a retrained adapter
        model.lm_head.weight.mul_(1.5)
    evaluate(model, tokenizer, out, **{**options, "max_gen_toks": 5, "limit": 6})
    assert calls == [2, 2, 2] + [2, 2, 2]


def test_a_kill_between_the_reports_two_renames_loses_no_chunk(tiny_model, data_dir, tmp_path, monkeypatch):
    """atomic_directory moves the old report aside, then renames the new one into place: a kill
    between the two leaves only `.<name>.old`, which a rerun continues from."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    options = {"suites": [GSM8K_TASK], "data_dir": str(data_dir), "batch_size": 2, "max_gen_toks": 6, "limit": 4}
    out = tmp_path / "report"
    expected = evaluate(model, tokenizer, out, **options)
    out.rename(tmp_path / ".report.old")
    calls = count_generations(monkeypatch)
    resumed = evaluate(model, tokenizer, out, **options)
    assert calls == [] and resumed["lm_eval"]["results"] == expected["lm_eval"]["results"]
    assert len(chunk_files(out)) == 2
