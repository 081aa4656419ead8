"""The MonteCLoRA adapter on peft LoRA layers: issue 2's invariants, each tested."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from monte_ds import (
    MonteCLoRAConfig,
    export_lora_adapter,
    get_monteclora_model,
    load_adapter,
    monteclora_layers,
    monteclora_losses,
    sampler_state,
    save_adapter,
)
from monte_ds.errors import InputError
from monte_ds.monteclora.engine import LOG_PARAMS, adapter_key
from monte_ds.monteclora.io import LEGACY_SAMPLER_JSON, SAMPLER_JSON
from monte_ds.monteclora.layer import MonteCLoRALinearA
from monte_ds.monteclora.math import (
    STREAM_DIRICHLET,
    STREAM_TRAIN,
    dirichlet_sample,
    draw_bartlett,
    seeded_generator,
    stream_seed,
)
from tests.conftest import QUANTIZATIONS, VOCAB, tiny_config


CPU = torch.device("cpu")


def build(load_base, quantization=None, **overrides):
    """A MonteCLoRA model with random (non-zero) B, so outputs and A's gradient depend on A."""
    config = MonteCLoRAConfig(**{"r": 4, "lora_alpha": 8, "sample_scaler": 0.5, **overrides})
    model = get_monteclora_model(load_base(quantization), config)
    generator = torch.Generator().manual_seed(5)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def first_layer(model) -> MonteCLoRALinearA:
    return next(iter(monteclora_layers(model)))


def train_logits(model, input_ids):
    model.train()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# 1, 2: every supported base; stochastic in train, deterministic and plain LoRA in eval --------------
@pytest.mark.parametrize("quantization", [None, "nf4", "fp4", "int8"])
def test_noise_is_applied_and_eval_equals_vanilla_peft_export(
    load_base, tiny_checkpoint, input_ids, tmp_path, quantization
):
    model = build(load_base, quantization)
    assert len(list(monteclora_layers(model))) == 2 * 7
    first, second = train_logits(model, input_ids), train_logits(model, input_ids)
    assert (first - second).abs().max() > 1e-3  # the noise really reaches the output, quantized base too
    model.eval()
    with torch.no_grad():
        mean_logits = model(input_ids=input_ids).logits
        assert torch.equal(mean_logits, model(input_ids=input_ids).logits)
    export_lora_adapter(model, tmp_path / "lora")
    torch.save(input_ids, tmp_path / "ids.pt")
    quant = (
        ""
        if quantization is None
        else (
            "from transformers import BitsAndBytesConfig\n"
            f"kw = dict(quantization_config=BitsAndBytesConfig(**{QUANTIZATIONS[quantization]!r}), device_map='cpu')\n"
        )
    )
    script = (
        "import sys\nsys.modules['monte_ds'] = None  # monte_ds must not be needed\n"
        "import torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\nkw = {}\n"
        f"{quant}"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_checkpoint)!r}, **kw)\n"
        f"model = PeftModel.from_pretrained(base, {str(tmp_path / 'lora')!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), mean_logits, atol=1e-5)


def test_unsupported_layer_type_names_the_module(load_base):
    with pytest.raises(ValueError, match="embed_tokens is Embedding"):
        get_monteclora_model(load_base(), MonteCLoRAConfig(target_modules=["embed_tokens", "q_proj"]))


def test_targets_matching_nothing_are_an_error(load_base):
    """monte-ds's own check names the entry (peft's "not found in the base model" would also be a ValueError)."""
    with pytest.raises(ValueError, match=r"^target_modules: 'no_such_proj' matched no module"):
        get_monteclora_model(load_base(), MonteCLoRAConfig(target_modules=["no_such_proj"]))


# 3: unbiased, and the noise covariance of docs/math.md -------------------------------------------------------
def test_mean_of_train_outputs_converges_to_eval_output(load_base):
    model = build(load_base)
    lora_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    engine = first_layer(model).engine
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = lora_layer(x)
        model.train()
        samples = []
        for _ in range(2000):
            engine.begin_training_forward()
            samples.append(lora_layer(x))
    samples = torch.stack(samples)
    standard_error = samples.std(0) / math.sqrt(len(samples))
    assert standard_error.max() > 0
    assert torch.all((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-6)


def test_noise_covariance_matches_design(load_base):
    """Columns of dA/eps have covariance E||pi||^2 * nu * V (docs/math.md, invariants)."""
    model = build(load_base, wishart_df=6)
    layer = first_layer(model)
    alpha = torch.tensor([0.5, 1.0, 2.0, 4.0])
    v = torch.tensor([0.5, 1.0, 2.0, 3.0])
    with torch.no_grad():
        layer.concentration_log.copy_(alpha.log().view_as(layer.concentration_log))
        layer.wishart_log_scale.copy_(v.log().view_as(layer.wishart_log_scale))
    model.train()
    per_draw = []
    with torch.no_grad():
        for _ in range(3000):
            layer.engine.begin_training_forward()
            noise = (layer.sampled_weight() - layer.weight) / layer.engine.config.sample_scaler
            per_draw.append(noise @ noise.T / noise.shape[1])
    per_draw = torch.stack(per_draw)
    a0 = alpha.sum()
    expected_pi_sq = (alpha * (alpha + 1)).sum() / (a0 * (a0 + 1))
    expected = expected_pi_sq * 6 * torch.diag(v)
    standard_error = per_draw.std(0) / math.sqrt(len(per_draw))
    assert torch.all((per_draw.mean(0) - expected).abs() <= 5 * standard_error)


# 5: gradients reach A, B, v and alpha --------------------------------------------------------------------
def test_gradients_reach_every_monteclora_parameter(load_base, input_ids):
    model = build(load_base)
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    (out.loss + monteclora_losses(model)["total"]).backward()
    for layer in monteclora_layers(model):
        for grad in (layer.weight.grad, *layer.log_params_grad()):
            assert grad is not None and grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert param.grad.abs().sum() > 0


def test_losses_are_fp32_under_autocast_and_total_is_the_weighted_sum(load_base, input_ids):
    model = build(load_base, kl_weight=0.01)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids)
        losses = monteclora_losses(model)
    assert all(value.dtype == torch.float32 and value.ndim == 0 for value in losses.values())
    kl = losses["kl_gaussian"] + losses["kl_wishart"] + losses["kl_dirichlet"]
    assert torch.allclose(losses["total"], 0.01 * kl + losses["cooperative"])
    assert losses["kl_gaussian"] > 0 and 0.25 <= losses["cooperative"] <= 1  # sum pi^2 in [1/N, 1]


def test_losses_before_any_training_forward_is_an_error(load_base):
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        monteclora_losses(build(load_base))


# 6: gradient checkpointing sees the same noise and keeps the regulariser's gradients ----------------------
def grads_after_one_step(load_base, input_ids, checkpointing: str | None) -> dict[str, torch.Tensor]:
    model = build(load_base)
    if checkpointing is not None:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.base_model.model.enable_input_require_grads()
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    (out.loss + monteclora_losses(model)["total"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(load_base, input_ids, mode):
    reference = grads_after_one_step(load_base, input_ids, None)
    checkpointed = grads_after_one_step(load_base, input_ids, mode)
    assert reference.keys() == checkpointed.keys()
    assert any(n.endswith(LOG_PARAMS) for n in reference)
    for name in reference:
        assert torch.allclose(reference[name], checkpointed[name], rtol=1e-5, atol=1e-7), name


# 7: noise is a function of (seed, rank, forward index, layer) ---------------------------------------------
def train_losses(model, input_ids, steps=2) -> list[float]:
    model.train()
    result = []
    for _ in range(steps):
        out = model(input_ids=input_ids, labels=input_ids)
        result.append((out.loss + monteclora_losses(model)["total"]).item())
    return result


def test_noise_is_reproducible_and_independent_of_the_global_rng(load_base, input_ids):
    torch.manual_seed(0)
    first = train_losses(build(load_base, seed=3), input_ids)
    torch.manual_seed(99)
    second = train_losses(build(load_base, seed=3), input_ids)
    assert first == second
    assert first[0] != first[1]  # micro-batches (successive forwards) get fresh noise
    assert train_losses(build(load_base, seed=4), input_ids) != first


def test_each_rank_draws_its_own_noise(load_base, input_ids, monkeypatch):
    rank0 = train_logits(build(load_base), input_ids)
    monkeypatch.setenv("RANK", "1")
    rank1 = train_logits(build(load_base), input_ids)
    assert (rank0 - rank1).abs().max() > 1e-3


def test_sync_and_async_samplers_draw_identical_noise(load_base, input_ids):
    assert train_losses(build(load_base, sampler="sync"), input_ids, 3) == train_losses(
        build(load_base, sampler="async"), input_ids, 3
    )


# 8: no host synchronisation on the hot path; deepcopy; meta-device initialisation -----------------------
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def test_no_host_synchronisation_in_forward_or_losses(load_base, input_ids, monkeypatch):
    model = build(load_base)
    model.train()
    model(input_ids=input_ids)  # warm-up: pending prefetches exist
    layers = list(monteclora_layers(model))
    x = torch.randn(2, 64)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation on the MonteCLoRA hot path")

    with monkeypatch.context() as patch:
        for method in SYNCING_METHODS:
            patch.setattr(torch.Tensor, method, forbidden)
        for layer in layers:
            layer(x if layer.in_features == 64 else torch.randn(2, layer.in_features))
        monteclora_losses(model)["total"].backward()


def test_deepcopy_after_a_training_forward_continues_identically(load_base, input_ids):
    model = build(load_base)
    train_logits(model, input_ids)
    clone = copy.deepcopy(model)
    assert torch.equal(train_logits(model, input_ids), train_logits(clone, input_ids))


def test_meta_device_initialisation(load_base, tmp_path, input_ids):
    with torch.device("meta"):
        meta_base = LlamaForCausalLM(tiny_config())
    meta_model = get_monteclora_model(meta_base, MonteCLoRAConfig(r=4))
    assert all(p.device.type == "meta" for p in meta_model.parameters())

    model = build(load_base)
    train_logits(model, input_ids)
    save_adapter(model, tmp_path / "adapter")
    lazy = load_adapter(load_base(), tmp_path / "adapter", low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in lazy.parameters())
    assert torch.equal(train_logits(lazy, input_ids), train_logits(model, input_ids))


# 9: sparse mixture and post-hoc modes (paper §6.4) ---------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_sparse_mixture_uses_a_one_hot_mixture(load_base, sparse):
    """dA = eps * ||pi|| * diag(sqrt v) * noise, with the noise and pi rebuilt from the seeding
    scheme: group 0 (q_proj's shape) drawn from (seed, adapter, rank, STREAM_TRAIN, forward,
    group 0), pi of all layers from (seed, adapter, rank, STREAM_DIRICHLET, forward, partition 0)."""
    model = build(load_base, sparse_mixture=sparse)
    layers = list(monteclora_layers(model))
    layer = layers[0]
    same_shape = [
        other for other in layers if (other.out_features, other.in_features) == (layer.out_features, layer.in_features)
    ]
    model.train()
    layer.engine.begin_training_forward()
    index = layer.engine.current_index
    with torch.no_grad():
        delta = layer.sampled_weight() - layer.weight
        noise = draw_bartlett(
            len(same_shape),
            4,
            layer.in_features,
            4.0,
            seeded_generator(CPU, stream_seed(0, adapter_key("default"), 0, STREAM_TRAIN, index, 0)),
            CPU,
        ).noise[0]
        alpha = torch.cat([other.concentration_log for other in layers]).exp()
        pi = dirichlet_sample(
            alpha, seeded_generator(CPU, stream_seed(0, adapter_key("default"), 0, STREAM_DIRICHLET, index, 0))
        )[0]
    norm = 1.0 if sparse else pi.norm()
    expected = 0.5 * norm * layer.wishart_scale.sqrt().unsqueeze(1) * noise
    assert torch.allclose(delta, expected, atol=1e-6)
    assert sparse or pi.norm() < 1  # a soft mixture of N > 1 components has ||pi|| < 1


def test_posthoc_mode_trains_only_the_sampler_parameters(load_base, input_ids):
    model = build(load_base, posthoc=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(LOG_PARAMS) for n in trainable)
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    (out.loss + monteclora_losses(model)["total"]).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_uniform_dirichlet_init_is_seeded_and_in_unit_interval(load_base):
    a = [layer.concentration for layer in monteclora_layers(build(load_base, dirichlet_init="uniform"))]
    b = [layer.concentration for layer in monteclora_layers(build(load_base, dirichlet_init="uniform"))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(((x > 0) & (x < 1)).all() for x in a)
    assert not torch.equal(a[0], a[1])


# 10: save/load round-trips exactly, 4-bit base included ---------------------------------------------------
@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_save_load_round_trip_is_exact(load_base, input_ids, tmp_path, quantization):
    model = build(load_base, quantization, dirichlet_init="uniform")
    for layer in monteclora_layers(model):
        with torch.no_grad():
            layer.wishart_log_scale.normal_(generator=torch.Generator().manual_seed(layer.layer_index))
    train_logits(model, input_ids)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / SAMPLER_JSON).read_text())
    assert saved == sampler_state(model) == {"seed": 0, "forward_index": 1}
    loaded = load_adapter(load_base(quantization), tmp_path / "adapter")
    for ours, theirs in zip(monteclora_layers(model), monteclora_layers(loaded)):
        for name in ("weight", "wishart_log_scale", "concentration_log"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name))
    # the next training forward draws the same noise: training resumes exactly
    assert torch.equal(train_logits(loaded, input_ids), train_logits(model, input_ids))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_loading_a_folder_that_is_not_an_adapter_names_what_is_missing(load_base, tmp_path):
    with pytest.raises(
        InputError, match="missing adapter_model.safetensors, monteclora_config.json, monteclora_sampler.json"
    ) as caught:
        load_adapter(load_base(), tmp_path)
    assert caught.value.key == str(tmp_path)


def test_adapters_saved_with_the_earlier_sampler_file_name_still_load(load_base, input_ids, tmp_path):
    model = build(load_base)
    train_logits(model, input_ids)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / SAMPLER_JSON).rename(tmp_path / "adapter" / LEGACY_SAMPLER_JSON)
    loaded = load_adapter(load_base(), tmp_path / "adapter")
    assert sampler_state(loaded) == sampler_state(model) == {"seed": 0, "forward_index": 1}


def test_the_fixture_inputs_fit_the_saved_tiny_model(load_base, input_ids):
    """`input_ids` are drawn below VOCAB: the checkpoint the tests load must embed exactly that many tokens."""
    assert load_base().get_input_embeddings().num_embeddings == VOCAB
    assert 0 <= int(input_ids.min()) and int(input_ids.max()) < VOCAB


def test_zero_sample_scaler_is_plain_lora_with_regularisers(load_base, input_ids):
    model = build(load_base, sample_scaler=0.0)
    assert torch.equal(train_logits(model, input_ids), train_logits(model, input_ids))
    assert torch.isfinite(monteclora_losses(model)["total"])


def test_an_adapter_saved_with_per_layer_parameters_loads_into_the_stacked_format(tmp_path):
    """tests/fixtures/legacy_adapter was saved by monte-ds before ln v and ln alpha were stacked
    (one (r, 1) and one (1, N) tensor per layer; mixed ranks): it loads, its next training forward
    draws the noise the old code drew, and it saves again in the stacked format."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    fixture = Path(__file__).parent / "fixtures" / "legacy_adapter"
    legacy = load_file(fixture / "adapter" / "adapter_model.safetensors")
    expected = torch.load(fixture / "expected.pt")
    torch.manual_seed(0)
    model = load_adapter(LlamaForCausalLM(tiny_config(num_hidden_layers=2)), fixture / "adapter")
    names = {id(module): name for name, module in model.named_modules()}
    for layer in monteclora_layers(model):
        prefix = names[id(layer)].replace(".default", "")
        assert torch.equal(layer.wishart_log_scale, legacy[f"{prefix}.wishart_log_scale"])
        assert torch.equal(layer.concentration_log, legacy[f"{prefix}.concentration_log"])
    model.train()
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=expected["input_ids"]).logits, expected["train_logits"], rtol=0, atol=1e-6
        )
        model.eval()
        assert torch.equal(model(input_ids=expected["input_ids"]).logits, expected["eval_logits"])
    save_adapter(model, tmp_path / "again")
    keys = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert [key for key in keys if key.endswith(LOG_PARAMS)] == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.monteclora_log_params"
    ]
    assert not any(key.endswith(("wishart_log_scale", "concentration_log")) for key in keys)
