"""MonteCLoRA on everything peft's LoRA does (issue 10): every LoraConfig option it offers, every
task type, several named adapters, and no silent target mistakes. One test (or one group) per
row of the issue's table, each failing before the change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from monte_ds import (
    MonteCLoRAConfig,
    export_lora_adapter,
    get_monteclora_model,
    load_adapter,
    monteclora_layers,
    monteclora_losses,
    save_adapter,
)
from monte_ds.errors import UserError, run_cli
from monte_ds.monteclora.layer import EXTRA_PARAMS
from monte_ds.monteclora.model import lora_config, monteclora_engines
from monte_ds.train.config import load_config
from monte_ds.train.model import check_adapter_targets, check_model_path
from monte_ds.train.run import main
from tests.conftest import tiny_config


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
        (
            "tiny",
            {"target_modules": ".*attn\\.qproj"},
            "adapter.target_modules: the pattern '.*attn\\\\.qproj' matched no module",
        ),
        (
            "tiny",
            {"rank_pattern": {"q_prj": 16}},
            "adapter.rank_pattern: 'q_prj' matched no module (no adapted module)",
        ),
        (
            "gpt2",
            {},
            "adapter.target_modules: 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj' matched no module (the default",
        ),
    ],
)
def test_train_reports_target_problems_in_one_line_before_writing(tmp_path, gpt2_path, capsys, model, adapter, message):
    model_path = gpt2_path if model == "gpt2" else tmp_path / "tiny-llama"
    config = write_train_config(tmp_path, model_path, adapter, build_tiny=model == "tiny")
    assert run_cli(main, ["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny-llama").exists()


@pytest.mark.parametrize("method", ["full", "prompt_tuning"])
def test_methods_without_targets_skip_the_target_check(tmp_path, gpt2_path, method):
    """LLaMA's default targets match nothing on GPT-2, but these methods adapt no modules."""
    config = load_config(write_train_config(tmp_path, gpt2_path, {"method": method}, build_tiny=False))
    check_adapter_targets(config, check_model_path(config))
    with pytest.raises(UserError, match="matched no module"):
        check_adapter_targets(
            load_config(write_train_config(tmp_path, gpt2_path, {}, build_tiny=False)), check_model_path(config)
        )


def test_train_accepts_every_offered_lora_field(tmp_path):
    adapter = {
        "task_type": "CAUSAL_LM",
        "exclude_modules": ["k_proj"],
        "layers_to_transform": [0],
        "layers_pattern": "layers",
        "rank_pattern": {"q_proj": 8},
        "alpha_pattern": {"q_proj": 32},
        "fan_in_fan_out": False,
        "bias": "lora_only",
        "lora_bias": True,
        "init_lora_weights": "gaussian",
        "use_dora": True,
        "loftq_config": {},
        "eva_config": None,
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
    with pytest.raises(ValueError, match=r"^wishart_df: must be null or >= the largest rank \(16\), got 8$"):
        MonteCLoRAConfig(r=4, rank_pattern={"q_proj": 16}, wishart_df=8)


def test_train_fine_tunes_causal_lms_and_records_the_task_type(tmp_path):
    config = load_config(write_train_config(tmp_path, tmp_path / "m", {}, build_tiny=True))
    assert config.adapter.task_type == "CAUSAL_LM" and config.to_dict()["adapter"]["task_type"] == "CAUSAL_LM"
    with pytest.raises(UserError, match="adapter.task_type: monte-ds train fine-tunes causal LMs"):
        load_config(write_train_config(tmp_path, tmp_path / "m", {"task_type": "SEQ_CLS"}, build_tiny=True))


def test_eva_must_keep_the_ranks():
    MonteCLoRAConfig(init_lora_weights="eva", eva_config={"rho": 1})
    with pytest.raises(ValueError, match="^eva_config: must be {'rho': 1} with init_lora_weights 'eva'"):
        MonteCLoRAConfig(init_lora_weights="eva")


# -- the library: every task type, peft's options, several adapters -----------------------------------


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**overrides))


def eval_output(model: nn.Module, **inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_steps(model: nn.Module, steps: int, **inputs) -> None:
    """SGD on task loss + regulariser, so that A, B, the heads and DoRA's magnitude move."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    for _ in range(steps):
        model.train()
        (model(**inputs).loss + monteclora_losses(model)["total"]).backward()
        optimizer.step()
        optimizer.zero_grad()


def adapted_names(model: nn.Module, adapter_name: str = "default") -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


ENCODER = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
}


@pytest.mark.parametrize(
    "build, task_type, peft_class",
    [
        (lambda: tiny_llama(), "CAUSAL_LM", "PeftModelForCausalLM"),
        (
            lambda: RobertaForSequenceClassification(RobertaConfig(**ENCODER, num_labels=3)),
            "SEQ_CLS",
            "PeftModelForSequenceClassification",
        ),
        (
            lambda: BertForTokenClassification(BertConfig(**ENCODER, num_labels=3)),
            "TOKEN_CLS",
            "PeftModelForTokenClassification",
        ),
        (lambda: BertModel(BertConfig(**ENCODER)), "FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
        (
            lambda: T5ForConditionalGeneration(
                T5Config(
                    vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0
                )
            ),
            "SEQ_2_SEQ_LM",
            "PeftModelForSeq2SeqLM",
        ),
    ],
)
def test_the_task_type_is_inferred_from_the_model(build, task_type, peft_class):
    torch.manual_seed(0)
    base = build()
    targets = {"CAUSAL_LM": ["q_proj", "v_proj"], "SEQ_2_SEQ_LM": ["q", "v"]}.get(task_type, ["query", "value"])
    # init_lora_weights=False: B is not zero, so the noise on A shows in the output
    model = get_monteclora_model(
        base, MonteCLoRAConfig(r=2, target_modules=targets, sample_scaler=1.0, init_lora_weights=False)
    )
    assert model.peft_config["default"].task_type == task_type and type(model).__name__ == peft_class
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if task_type == "SEQ_2_SEQ_LM" else {})}
    model.train()
    trained = model(**inputs)
    trained = trained.logits if hasattr(trained, "logits") else trained.last_hidden_state
    assert torch.isfinite(monteclora_losses(model)["total"])
    model.eval()
    with torch.no_grad():
        mean = model(**inputs)
    mean = mean.logits if hasattr(mean, "logits") else mean.last_hidden_state
    assert not torch.allclose(trained, mean)  # the sampled A changed the training forward


def test_a_plain_module_gets_a_plain_peft_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model = get_monteclora_model(net, MonteCLoRAConfig(r=2, target_modules=["0", "2"]))
    assert type(model) is PeftModel and model.peft_config["default"].task_type is None
    model.train()
    model(torch.randn(3, 8)).sum().backward()
    assert torch.isfinite(monteclora_losses(model)["total"]) and len(list(monteclora_layers(model))) == 2


@pytest.mark.parametrize("encoder", ["roberta", "bert"])
def test_sequence_classification_trains_the_classifier_and_reloads_exactly(tmp_path, encoder):
    """The paper's GLUE set-up: query/value adapted, the new classifier head trained and saved."""
    torch.manual_seed(0)
    builder = {
        "roberta": (RobertaForSequenceClassification, RobertaConfig),
        "bert": (BertForSequenceClassification, BertConfig),
    }
    model_class, config_class = builder[encoder]
    base = model_class(config_class(**ENCODER, num_labels=3))
    config = MonteCLoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_monteclora_model(copy.deepcopy(base), config)
    ids = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))
    train_steps(model, 2, input_ids=ids, labels=torch.tensor([0, 1, 2, 1]))
    trained_head = model.base_model.model.classifier.modules_to_save["default"]
    assert not torch.equal(
        trained_head.state_dict()["out_proj.weight" if encoder == "roberta" else "weight"],
        base.classifier.state_dict()["out_proj.weight" if encoder == "roberta" else "weight"],
    )
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.equal(eval_output(reloaded, input_ids=ids), eval_output(model, input_ids=ids))


def test_rank_and_alpha_patterns_give_each_layer_its_own_rank_and_wishart_dof():
    config = MonteCLoRAConfig(r=2, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 32}, sample_scaler=1.0)
    model = get_monteclora_model(tiny_llama(), config)
    plain = get_peft_model(tiny_llama(), lora_config(config))
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            twin = plain.get_submodule(name)
            assert module.r == twin.r and module.scaling == twin.scaling
            layer = module.lora_A["default"]
            assert layer.out_features == twin.r["default"] and layer.dof == twin.r["default"]
    assert {layer.out_features for layer in monteclora_layers(model)} == {2, 8}
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    losses = monteclora_losses(model)
    assert all(torch.isfinite(value) for value in losses.values())  # chi2(nu - i) with nu >= each rank


@pytest.mark.parametrize(
    "options",
    [
        {"exclude_modules": ["k_proj"]},
        {"layers_to_transform": [1], "layers_pattern": "layers"},
        {"layers_to_transform": 0},
        {"bias": "lora_only"},
        {"bias": "all", "lora_bias": True},
        {"target_modules": "q_proj"},  # one plain name: that module, in every layer
        {"target_modules": r"model\.layers\.0\.self_attn\.(q|v)_proj"},  # a regex stays a regex
    ],
)
def test_module_selection_and_trainable_biases_are_peft_s(options):
    config = MonteCLoRAConfig(r=2, **options)
    model = get_monteclora_model(tiny_llama(), config)
    plain = get_peft_model(tiny_llama(), lora_config(config))
    assert adapted_names(model) == adapted_names(plain) != set()
    assert len(list(monteclora_layers(model))) == len(adapted_names(plain))
    extra = {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in EXTRA_PARAMS}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad} - extra
    assert trainable == {name for name, p in plain.named_parameters() if p.requires_grad}


def test_a_single_plain_name_means_that_module():
    model = get_monteclora_model(tiny_llama(), MonteCLoRAConfig(r=2, target_modules="q_proj"))
    assert adapted_names(model) == {
        "base_model.model.model.layers.0.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.q_proj",
    }


def test_a_target_that_matches_nothing_is_named():
    with pytest.raises(ValueError, match=r"^target_modules: 'v_prj' matched no module$"):
        get_monteclora_model(tiny_llama(), MonteCLoRAConfig(r=2, target_modules=["q_proj", "v_prj"]))
    with pytest.raises(ValueError, match=r"target_modules: 'q_proj', .* matched no module \(the default"):
        get_monteclora_model(
            GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), MonteCLoRAConfig()
        )


INITS = [
    (False, {}),
    ("gaussian", {}),
    ("pissa", {}),
    ("pissa_niter_2", {}),
    ("olora", {}),
    ("orthogonal", {}),
    ("eva", {"eva_config": {"rho": 1}}),
    pytest.param(
        "loftq",
        {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="peft computes LoftQ on CUDA/XPU only"),
    ),
]


@pytest.mark.parametrize("init, extra", INITS)
def test_every_non_default_init_is_peft_s_exactly(init, extra):
    config = MonteCLoRAConfig(r=4, init_lora_weights=init, **extra)
    torch.manual_seed(5)
    plain = get_peft_model(tiny_llama(), lora_config(config))
    torch.manual_seed(5)
    model = get_monteclora_model(tiny_llama(), config)
    if init == "eva":  # EVA's data pass, peft's own function, on both
        batches = [
            {"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))} for i in range(4)
        ]
        for each in (plain, model):
            initialize_lora_eva_weights(
                each,
                [dict(b, attention_mask=torch.ones_like(b["input_ids"])) for b in batches],
                show_progress_bar=False,
            )
    reference = plain.state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[key], reference[key]) for key in reference)  # A, B and (pissa, olora, loftq) the base
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(eval_output(model, input_ids=ids), eval_output(plain, input_ids=ids))
    assert len(list(monteclora_layers(model))) == 14


def test_default_init_is_seeded_and_a_no_op():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    first, second = (get_monteclora_model(tiny_llama(), MonteCLoRAConfig(r=4, seed=3)) for _ in range(2))
    torch.manual_seed(99)  # the global RNG does not matter
    third = get_monteclora_model(tiny_llama(), MonteCLoRAConfig(r=4, seed=3))
    for a, b, c in zip(monteclora_layers(first), monteclora_layers(second), monteclora_layers(third), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)
    assert torch.equal(eval_output(first, input_ids=ids), eval_output(tiny_llama(), input_ids=ids))


def test_dora_trains_with_noise_on_a_and_exports_to_plain_peft_dora(tmp_path):
    config = MonteCLoRAConfig(r=4, use_dora=True, sample_scaler=0.5)
    model = get_monteclora_model(tiny_llama(), config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    magnitude = model.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    before = magnitude.detach().clone()
    train_steps(model, 3, input_ids=ids, labels=ids)
    assert not torch.equal(magnitude, before)  # DoRA's magnitude trains
    model.train()
    with torch.no_grad():
        noisy = model(input_ids=ids).logits
    mean = eval_output(model, input_ids=ids)
    assert not torch.allclose(noisy, mean)  # the noise is on A in training
    export_lora_adapter(model, tmp_path / "lora")
    vanilla = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    assert vanilla.peft_config["default"].use_dora
    torch.testing.assert_close(eval_output(vanilla, input_ids=ids), mean, rtol=0, atol=1e-6)


def forward_counts(model: nn.Module) -> dict[str, int]:
    return {name: engine.state_dict()["forward_index"] for name, engine in monteclora_engines(model).items()}


def test_named_adapters_switch_disable_keep_their_own_noise_and_reload_exactly(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    # init_lora_weights=False: B is not zero, so each adapter changes the output at once
    model = get_monteclora_model(
        copy.deepcopy(base), MonteCLoRAConfig(r=4, seed=1, sample_scaler=0.5, init_lora_weights=False), "a"
    )
    second = MonteCLoRAConfig(r=2, seed=2, target_modules=["q_proj"], sample_scaler=0.5, init_lora_weights=False)
    model = get_monteclora_model(model, second, "b")
    assert set(monteclora_engines(model)) == {"a", "b"}

    model.set_adapter("a")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    losses_a = monteclora_losses(model)["total"].item()
    model.set_adapter("b")
    model.train()
    model(input_ids=ids, labels=ids)
    model(input_ids=ids, labels=ids)
    assert forward_counts(model) == {"a": 1, "b": 2}  # each adapter counts its own forwards
    assert monteclora_losses(model)["total"].item() != losses_a  # b's regulariser, not a's

    outputs = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        outputs[name] = eval_output(model, input_ids=ids)
    assert not torch.equal(outputs["a"], outputs["b"])
    with model.disable_adapter():
        model.train()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, eval_output(base, input_ids=ids))
    assert forward_counts(model) == {"a": 1, "b": 2}  # disabled: nothing drawn

    for name in ("a", "b"):
        save_adapter(model, tmp_path / name, adapter_name=name)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    reloaded = load_adapter(reloaded, tmp_path / "b", adapter_name="b")
    assert forward_counts(reloaded) == {"a": 1, "b": 2}
    for name in ("a", "b"):
        reloaded.set_adapter(name)
        assert torch.equal(eval_output(reloaded, input_ids=ids), outputs[name])
    # the reloaded model continues each adapter's noise exactly
    for each in (model, reloaded):
        each.set_adapter("a")
        each.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
