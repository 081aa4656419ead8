"""The training config and data side of `monte-ds train`: no model is loaded here.

A config error must exit 2 with one line naming the key, before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from monte_ds.cli import main as cli_main
from monte_ds.errors import UserError
from monte_ds.train import checkpoints
from monte_ds.train.config import apply_override, load_config, read_config, training_arguments, validate_config
from monte_ds.train.data import (
    ALPACA_PROMPT_NO_INPUT,
    bundled_path,
    dataset_texts,
    detect_format,
    load_training_data,
    prepare_dataset,
)


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.json"


@pytest.fixture
def tiny_raw(tmp_path) -> dict:
    raw = json.loads(TINY.read_text())
    raw["training"]["output_dir"] = str(tmp_path / "out")
    raw["model"]["path"] = str(tmp_path / "tiny-llama")
    return raw


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


# -- errors: exit 2, one line naming the key, nothing written ------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lerning_rate=1e-4", "training.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        ("training.learning_rate=fast", 'training.learning_rate: expected number, got "fast"'),
        ("training.max_steps=1.5", "training.max_steps: expected integer, got 1.5"),
        ("training.optim=adamw_torh", "(did you mean 'adamw_torch'?)"),
        ("training.deepspeed={}", "training.deepspeed: not set here; set it in distributed.deepspeed"),
        (
            "training.resume_from_checkpoint=true",
            "training.resume_from_checkpoint: not set here; use the --resume flag",
        ),
        (
            "training.eval_strategy=steps",
            "training.eval_strategy: needs an evaluation set: hold out rows with data.eval_size",
        ),
        ("data.eval_size=4", 'data.eval_size: holds out rows for training.eval_strategy, which is "no"'),
        ("data.eval_size=0", "data.eval_size: 0 is less than the minimum of 1"),
        ("training.label_smoothing_factor=0.1", "training.label_smoothing_factor: not supported with MonteCLoRA"),
        ("adapter.r=0", "adapter.r: must be >= 1, got 0"),
        ("adapter.wishart_df=2", "adapter.wishart_df: must be null or >= the largest rank (8), got 2"),
        ("adapter.sampler=fast", 'adapter.sampler: must be one of "auto", "async", "sync", got "fast"'),
        ("adapter.method=qlora", 'adapter.method: must be one of "monteclora", "full", "lora"'),
        ("model.dtype=fp8", "model.dtype: must be one of"),
        ("model.build_tiny=false", "model.path: no such file or directory: "),
        ('model={"path": "no-such-org/no-such-model"}', "model.path: cannot load a model config from 'no-such-org/no"),
        ("quantization.mode=int8", None),  # valid: the control case of the next line
        ("quantization.double_quant=true", "quantization.double_quant: only applies to 4-bit modes"),
        ("data.path=./missing.jsonl", "data.path: no such file or directory: ./missing.jsonl"),
        ("data.path=bundled:missing.jsonl", "data.path: no bundled file 'missing.jsonl'"),
        ("data.format=template", "data.prompt_template: set it exactly when data.format is 'template'"),
        ("distributed.deepspeed=./missing.json", "distributed.deepspeed: no such file: ./missing.json"),
        (
            'distributed.deepspeed={"optimizer": {"type": "AdamW"}}',
            "distributed.deepspeed.optimizer: leave the optimizer",
        ),
        ("eval.limit=0", "eval.limit: 0 is less than the minimum of 1"),
        ("eval.suite=gsm8k", "eval.suite: unknown key (did you mean 'suites'?)"),
        ("colour=blue", "colour: unknown key"),
        ("training=3", "training: expected object, got 3"),
        ("model.path.name=x", "--set model.path.name=x: model.path is not an object"),
        ("training", "--set training: expected dotted.key=value"),
    ],
)
def test_config_errors_exit_2_naming_the_key_and_write_nothing(tmp_path, tiny_raw, capsys, override, message):
    if message is None:
        validate_config(read_config(write_config(tmp_path, tiny_raw), [override]))
        return
    config = write_config(tmp_path, tiny_raw)
    code = cli_main(["train", "--config", str(config), "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("monte-ds: error: ")
    assert message in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny-llama").exists()


def test_missing_config_file_and_invalid_json_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--config: no such file"):
        read_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="--config: .* is not valid JSON"):
        read_config(tmp_path / "bad.json")


def test_training_values_trainingarguments_rejects_are_user_errors(tmp_path, tiny_raw):
    config = load_config(write_config(tmp_path, tiny_raw), ["training.load_best_model_at_end=true"])
    with pytest.raises(
        UserError, match="^training: .*load_best_model_at_end requires the save and eval strategy to match"
    ):
        training_arguments(config)


# -- overrides ------------------------------------------------------------------------------------------
def test_overrides_parse_json_values_fall_back_to_strings_and_create_objects():
    config: dict = {"training": {"learning_rate": 1.0}}
    for override in [
        "training.learning_rate=1e-4",
        "training.report_to=[]",
        "training.bf16=false",
        "model.path=huggyllama/llama-7b",
        "distributed.fsdp.version=2",
    ]:
        apply_override(config, override)
    assert config["training"] == {"learning_rate": 1e-4, "report_to": [], "bf16": False}
    assert config["model"] == {"path": "huggyllama/llama-7b"}
    assert config["distributed"] == {"fsdp": {"version": 2}}
    with pytest.raises(UserError, match=r"--set a\.\.b=1: expected dotted\.key=value"):
        apply_override(config, "a..b=1")


# -- resolution -----------------------------------------------------------------------------------------
def test_resolved_config_round_trips_and_its_hash_ignores_where_outputs_go(tmp_path, tiny_raw):
    config = validate_config(tiny_raw)
    again = validate_config(json.loads(json.dumps(config.to_dict())))
    assert again == config
    moved = validate_config(read_config(write_config(tmp_path, tiny_raw), ["training.output_dir=elsewhere"]))
    assert moved.config_hash() == config.config_hash()
    changed = validate_config(read_config(write_config(tmp_path, tiny_raw), ["training.learning_rate=0.1"]))
    assert changed.config_hash() != config.config_hash()


def test_the_noise_seed_follows_the_training_seed_unless_set(tmp_path, tiny_raw):
    path = write_config(tmp_path, tiny_raw)
    assert load_config(path, ["training.seed=7"]).adapter.seed == 7
    assert load_config(path, ["training.seed=7", "adapter.seed=3"]).adapter.seed == 3


def test_lora_baseline_ignores_monteclora_fields_with_a_warning(tmp_path, tiny_raw, caplog):
    config = load_config(write_config(tmp_path, tiny_raw), ["adapter.method=lora"])
    assert config.method == "lora"
    assert "method 'lora' ignores the MonteCLoRA settings" in caplog.text


def test_zero3_keeps_v_and_alpha_whole_and_saves_complete_adapters(tmp_path, tiny_raw):
    tiny_raw["adapter"]["r"] = 64
    tiny_raw["distributed"] = {
        "deepspeed": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10}}
    }
    zero = load_config(write_config(tmp_path, tiny_raw)).deepspeed["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 64  # raised to r, the size of v
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_shipped_configs_validate(monkeypatch):
    monkeypatch.chdir(REPO)  # their DeepSpeed paths are relative to the repository root
    shipped = sorted((REPO / "configs").glob("*.json"))
    assert {p.name for p in shipped} >= {
        "tiny.json",
        "llama7b.json",
        "llama7b-qlora.json",
        "llama7b-fsdp.json",
        "llama3.2-3b-gsm8k.json",
    }
    for path in shipped:
        # The large configs train on data the user downloads (docs/training.md); the schema,
        # the DeepSpeed files and the paper's hyperparameters are what is checked here.
        raw = read_config(path)
        if not raw["data"]["path"].startswith("bundled:"):
            raw["data"]["path"] = "bundled:tiny_instruct.jsonl"
        config = validate_config(raw)
        assert config.eval.get("suites") is None or isinstance(config.eval["suites"], list)
    llama = validate_config(read_config(REPO / "configs/llama7b.json", ["data.path=bundled:tiny_instruct.jsonl"]))
    assert (llama.adapter.r, llama.adapter.lora_alpha, llama.adapter.sample_scaler, llama.adapter.kl_weight) == (
        32,
        64,
        5e-3,
        1e-5,
    )
    assert llama.adapter.n_components == 4 and llama.zero_stage == 3
    assert llama.training["max_length"] == 256 and llama.training["lr_scheduler_type"] == "linear"
    gsm8k = validate_config(read_config(REPO / "configs/llama3.2-3b-gsm8k.json"))
    assert gsm8k.adapter.sample_scaler == 2.5e-5


# -- output directory rules ------------------------------------------------------------------------------
def test_an_unfinished_run_is_not_restarted_over_and_resume_needs_a_checkpoint(tmp_path, tiny_raw, capsys):
    config = write_config(tmp_path, tiny_raw)
    assert cli_main(["train", "--config", str(config), "--resume"]) == 2
    assert "--resume: no complete checkpoint in" in capsys.readouterr().err
    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    checkpoints.mark_complete(checkpoint, 4)
    assert cli_main(["train", "--config", str(config)]) == 2
    assert "holds an unfinished run (latest checkpoint-4); pass --resume" in capsys.readouterr().err


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    for step, complete in [(2, True), (4, True), (6, False)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            checkpoints.mark_complete(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-10").mkdir()  # sorted by step, not by name
    checkpoints.mark_complete(tmp_path / "checkpoint-10", 10)
    assert checkpoints.latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert [p.name for p in checkpoints.remove_incomplete(tmp_path)] == ["checkpoint-6"]
    assert not (tmp_path / "checkpoint-6").exists()


# -- data -----------------------------------------------------------------------------------------------
def records(**columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict({name: list(values) for name, values in columns.items()})


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["messages"], "messages"),
        (["conversations"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["text", "meta"], "text"),
    ],
)
def test_formats_are_detected_from_the_columns(columns, expected):
    assert detect_format(columns) == expected


def test_unknown_layout_is_a_user_error():
    with pytest.raises(UserError, match=r"data: cannot tell the format from the columns \['question'\]"):
        detect_format(["question"])


def test_alpaca_records_become_prompt_completion_pairs():
    data = records(instruction=["Add.", " Name a colour. "], input=["1 + 2", ""], output=["3", "blue"])
    prepared = prepare_dataset(data)
    assert prepared.column_names == ["prompt", "completion"]
    assert prepared[0]["prompt"].endswith("### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n### Response:\n")
    assert prepared[1]["prompt"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert prepared["completion"] == ["3", "blue"]


def test_template_format_builds_prompts_from_any_columns():
    data = records(question=["What is 2+2?"], answer=["#### 4"])
    prepared = prepare_dataset(
        data, "template", prompt_template="Question: {question}\nAnswer: ", completion_column="answer"
    )
    assert prepared[0] == {"prompt": "Question: What is 2+2?\nAnswer: ", "completion": "#### 4"}
    with pytest.raises(UserError, match=r"data.prompt_template: no column\(s\) \['query'\]"):
        prepare_dataset(data, "template", prompt_template="{query}", completion_column="answer")


def test_forced_format_needs_its_columns_and_max_samples_selects_the_first():
    data = records(text=["a", "b", "c"])
    assert prepare_dataset(data, max_samples=2)["text"] == ["a", "b"]
    with pytest.raises(
        UserError, match=r"data.format: 'prompt_completion' needs the column\(s\) \['prompt', 'completion'\]"
    ):
        prepare_dataset(data, "prompt_completion")


def test_local_files_load_by_extension_and_errors_name_the_key(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert load_training_data(str(tmp_path / "train.jsonl"))["text"] == ["hello", "world"]
    records(text=["saved"]).save_to_disk(str(tmp_path / "saved"))
    assert load_training_data(str(tmp_path / "saved"))["text"] == ["saved"]
    (tmp_path / "train.xml").write_text("<a/>")
    with pytest.raises(UserError, match="data.path: unsupported file type '.xml'"):
        load_training_data(str(tmp_path / "train.xml"))


def test_messages_contents_feed_the_tiny_tokenizer():
    data = records(messages=[[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    assert dataset_texts(data) == ["hi", "hello"]


def test_bundled_data_is_what_the_generator_writes():
    path = bundled_path("bundled:tiny_instruct.jsonl")
    script = REPO / "scripts" / "make_tiny_data.py"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    prepared = prepare_dataset(load_training_data("bundled:tiny_instruct.jsonl"))
    assert len(prepared) == sum(1 for _ in path.open()) and prepared.column_names == ["prompt", "completion"]


def test_reentrant_checkpointing_under_plain_ddp_is_refused_on_every_rank():
    """DDP's reducer refuses a gradient hook that fires once per replayed block; ZeRO, FSDP2, a
    single process and non-reentrant checkpointing all take it."""
    from types import SimpleNamespace

    from monte_ds.train.run import check_reentrant_checkpointing

    def args(**overrides):
        values = {
            "world_size": 2,
            "deepspeed": None,
            "fsdp": "",
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": True},
        }
        return SimpleNamespace(**{**values, **overrides})

    with pytest.raises(UserError) as error:
        check_reentrant_checkpointing(args())
    assert str(error.value).startswith("training.activation_checkpointing_kwargs: reentrant activation checkpointing")
    for fine in [
        {"world_size": 1},
        {"deepspeed": {"zero_optimization": {"stage": 3}}},
        {"fsdp": "full_shard"},
        {"activation_checkpointing_kwargs": {"use_reentrant": False}},
        {"activation_checkpointing_kwargs": None},
        {"activation_checkpointing": False},
    ]:
        check_reentrant_checkpointing(args(**fine))
