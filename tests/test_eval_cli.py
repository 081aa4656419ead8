"""`monte-ds eval`: base model, plain peft or monte-ds adapter, 4-bit base; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from monte_ds import MonteCLoRAConfig, get_monteclora_model, save_adapter
from monte_ds.cli import main as monte_ds_main
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE_DIR
from monte_ds.tiny import build_tiny_llama


FIXTURES = BUNDLED_SAMPLE_DIR
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    texts = [path.read_text() for path in sorted(FIXTURES.rglob("*.jsonl"))]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-eval-cli"), texts, vocab_size=512, seed=1)


@pytest.fixture(scope="module")
def peft_adapter(tiny_path, tmp_path_factory) -> Path:
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    path = tmp_path_factory.mktemp("peft-adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def monteclora_adapter(tiny_path, tmp_path_factory) -> Path:
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = get_monteclora_model(base, MonteCLoRAConfig(r=4, target_modules=TARGETS, sampler="sync"))
    path = tmp_path_factory.mktemp("monteclora-adapter") / "adapter"
    save_adapter(model, path)
    return path


def run_eval(*args: str) -> int:
    return monte_ds_main(["eval", *args])


def eval_args(tiny_path: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(tiny_path),
        "--suites",
        "piqa,boolq",
        "--data-dir",
        str(FIXTURES),
        "--limit",
        "2",
        "--output",
        str(output),
        *extra,
    ]


def test_plain_base_and_both_adapter_kinds(tiny_path, peft_adapter, monteclora_adapter, tmp_path):
    reports = {}
    for kind, extra in (
        ("base", []),
        ("peft", ["--adapter", str(peft_adapter)]),
        ("monteclora", ["--adapter", str(monteclora_adapter)]),
    ):
        assert run_eval(*eval_args(tiny_path, tmp_path / kind, *extra)) == 0
        reports[kind] = json.loads((tmp_path / kind / "report.json").read_text())
        assert (tmp_path / kind / "report.md").is_file() and (tmp_path / kind / "reliability.png").is_file()
    assert [reports[k]["metadata"]["adapter_type"] for k in ("base", "peft", "monteclora")] == [
        None,
        "peft",
        "monteclora",
    ]
    assert reports["peft"]["metadata"]["adapter"] == str(peft_adapter)
    # A freshly initialised MonteCLoRA adapter has B = 0: at its mean it is the base model.
    assert reports["monteclora"]["calibration"]["piqa"]["nll"] == pytest.approx(
        reports["base"]["calibration"]["piqa"]["nll"]
    )
    # The peft adapter (random B) changes the scores.
    assert reports["peft"]["calibration"]["piqa"]["nll"] != pytest.approx(reports["base"]["calibration"]["piqa"]["nll"])


def test_4bit_base_with_a_monteclora_adapter(tiny_path, monteclora_adapter, tmp_path):
    out = tmp_path / "report"
    args = eval_args(
        tiny_path,
        out,
        "--adapter",
        str(monteclora_adapter),
        "--load-in-4bit",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--predictive-samples",
        "2",
    )
    assert run_eval(*args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["quantization"] == "nf4"
    assert set(report["predictive"]["tasks"]) == {"piqa", "boolq"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--limit", "0"], "monte-ds: error: --limit: 0 is less than the minimum of 1"),
        (["--suites", "gsm8k,nope"], "monte-ds: error: --suites: unknown suite or task 'nope'"),
        (["--adapter", "/nonexistent/adapter"], "monte-ds: error: --adapter: no such directory /nonexistent/adapter"),
        (["--suites", "humaneval"], "monte-ds: error: --allow-code-execution: humaneval runs model-generated code"),
        (["--training-log", "/nonexistent.json"], "monte-ds: error: --training-log: no such file /nonexistent.json"),
        (["--bogus"], "monte-ds: error: unrecognized arguments: --bogus"),
        (
            ["--suites", "humaneval", "--allow-code-execution", "--humaneval-temperature", "0"],
            "monte-ds: error: --humaneval-samples: greedy decoding (humaneval_temperature 0) gives one completion per "
            "problem, not 4: set humaneval_samples to 1",
        ),
        (
            ["--humaneval-temperature", "-0.5"],
            "monte-ds: error: --humaneval-temperature: -0.5 is less than the minimum of 0",
        ),
        (
            ["--humaneval-temperature", "hot"],
            "monte-ds: error: argument --humaneval-temperature: invalid float value: 'hot'",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tiny_path, tmp_path, capsys, extra, message):
    assert run_eval(*eval_args(tiny_path, tmp_path / "report"), *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "report").exists()


def test_missing_data_directory_files_are_listed(tiny_path, tmp_path, capsys):
    args = [
        "--model",
        str(tiny_path),
        "--suites",
        "piqa,arc_easy",
        "--data-dir",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "report"),
    ]
    assert run_eval(*args) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"monte-ds: error: --data-dir: missing data files (layout in docs/evaluation.md) -- "
        f"piqa: {tmp_path / 'data/piqa/validation.jsonl'}; arc_easy: {tmp_path / 'data/arc_easy/test.jsonl'}"
    )
