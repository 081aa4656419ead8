"""MonteCLoRA on everything peft's LoRA does (issue 10): every LoraConfig option it offers, every
task type, several named adapters, and no silent target mistakes. One test (or one group) per
row of the issue's table, each failing before the change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import GPT2Config

from monte_ds import MonteCLoRAConfig
from monte_ds.errors import UserError, run_cli
from monte_ds.train.config import load_config
from monte_ds.train.run import main

DATA = "bundled:tiny_instruct.jsonl"


# -- the JSON config and `monte-ds train`: target problems and misspelt keys --------------------------


def write_train_config(directory: Path, model_path: Path, adapter: dict, build_tiny: bool = False) -> Path:
    config = {
        "model": {"path": str(model_path), "dtype": "float32", "build_tiny": build_tiny},
        "adapter": adapter,
        "data": {"path": DATA, "max_samples": 8},
        "training": {"output_dir": str(directory / "out"), "max_steps": 1, "report_to": []},
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def gpt2_path(tmp_path) -> Path:
    """A GPT-2 model folder (its config is all that target checking reads)."""
    path = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "model, adapter, message",
    [
        (
            "tiny",
            {"target_modules": ["q_proj", "v_prj"], "exclude_modules": ["k_prj"]},
            "monte-ds: error: adapter.target_modules: 'v_prj' matched no module; "
            "adapter.exclude_modules: 'k_prj' matched no module",
        ),
        ("tiny", {"target_modules": ".*attn\\.qproj"}, "adapter.target_modules: the pattern '.*attn\\\\.qproj' matched no module"),
        ("tiny", {"rank_pattern": {"q_prj": 16}}, "adapter.rank_pattern: 'q_prj' matched no module (no adapted module)"),
        ("gpt2", {}, "adapter.target_modules: 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj' matched no module (the default"),
    ],
)
def test_train_reports_target_problems_in_one_line_before_writing(tmp_path, gpt2_path, capsys, model, adapter, message):
    model_path = gpt2_path if model == "gpt2" else tmp_path / "tiny-llama"
    config = write_train_config(tmp_path, model_path, adapter, build_tiny=model == "tiny")
    assert run_cli(main, ["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny-llama").exists()


def test_train_accepts_every_offered_lora_field(tmp_path):
    adapter = {
        "task_type": "CAUSAL_LM", "exclude_modules": ["k_proj"], "layers_to_transform": [0], "layers_pattern": "layers",
        "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 32}, "fan_in_fan_out": False, "bias": "lora_only",
        "lora_bias": True, "init_lora_weights": "gaussian", "use_dora": True, "loftq_config": {}, "eva_config": None,
    }
    config = load_config(write_train_config(tmp_path, tmp_path / "m", adapter, build_tiny=True))
    assert {key: getattr(config.adapter, key) for key in adapter} == adapter


@pytest.mark.parametrize(
    "key, message",
    [
        ("use_dorra", "adapter.use_dorra: unknown key (did you mean 'use_dora'?)"),
        ("init_lora_weight", "adapter.init_lora_weight: unknown key (did you mean 'init_lora_weights'?)"),
        ("use_qalora", "adapter.use_qalora: peft's LoraConfig option 'use_qalora' is not offered with MonteCLoRA"),
        ("dora", "adapter.dora: unknown key"),
    ],
)
def test_misspelt_adapter_keys_suggest_only_close_names(tmp_path, key, message):
    with pytest.raises(UserError) as caught:
        load_config(write_train_config(tmp_path, tmp_path / "m", {key: True}, build_tiny=True))
    assert str(caught.value).startswith(message)
    assert "use_rslora" not in str(caught.value) and "kl_weight" not in str(caught.value)


def test_zero3_persistence_threshold_covers_the_largest_rank(tmp_path):
    path = write_train_config(tmp_path, tmp_path / "m", {"r": 4, "rank_pattern": {"q_proj": 48}}, build_tiny=True)
    raw = json.loads(path.read_text())
    raw["distributed"] = {"deepspeed": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10}}}
    path.write_text(json.dumps(raw))
    assert load_config(path).deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] == 48


def test_wishart_df_is_checked_against_the_largest_rank():
    MonteCLoRAConfig(r=4, rank_pattern={"q_proj": 16}, wishart_df=16)
    with pytest.raises(ValueError, match=r"wishart_df must be null or >= the largest rank \(16\), got 8"):
        MonteCLoRAConfig(r=4, rank_pattern={"q_proj": 16}, wishart_df=8)


def test_train_fine_tunes_causal_lms_and_records_the_task_type(tmp_path):
    config = load_config(write_train_config(tmp_path, tmp_path / "m", {}, build_tiny=True))
    assert config.adapter.task_type == "CAUSAL_LM" and config.to_dict()["adapter"]["task_type"] == "CAUSAL_LM"
    with pytest.raises(UserError, match="adapter.task_type: monte-ds train fine-tunes causal LMs"):
        load_config(write_train_config(tmp_path, tmp_path / "m", {"task_type": "SEQ_CLS"}, build_tiny=True))


def test_eva_must_keep_the_ranks():
    MonteCLoRAConfig(init_lora_weights="eva", eva_config={"rho": 1})
    with pytest.raises(ValueError, match="eva_config must be {'rho': 1} with init_lora_weights 'eva'"):
        MonteCLoRAConfig(init_lora_weights="eva")
