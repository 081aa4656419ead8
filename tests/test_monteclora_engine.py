"""The batched step node: its closed-form gradients equal autograd's through the per-layer math,
for equal and mixed ranks, under reentrant checkpointing, and per adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monte_ds import MonteCLoRAConfig, get_monteclora_model, monteclora_layers, monteclora_losses
from monte_ds.monteclora import engine as engine_module
from monte_ds.monteclora.engine import LOG_PARAMS, adapter_key
from monte_ds.monteclora.math import (
    STREAM_DIRICHLET,
    cooperative_loss,
    dirichlet_attach,
    dirichlet_sample,
    kl_dirichlet,
    kl_gaussian,
    kl_wishart,
    seeded_generator,
    stream_seed,
)
from tests.conftest import tiny_config


CPU = torch.device("cpu")
WEIGHTS = {"kl_gaussian": 0.7, "kl_wishart": -1.3, "kl_dirichlet": 2.1, "cooperative": 0.4}


def mlp(ranks: dict[str, int] | None = None, sparse: bool = False):
    """Three linears of two input widths; rank_pattern gives them different ranks."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("a", nn.Linear(6, 6))
    base.add_module("b", nn.Linear(6, 9))
    base.add_module("c", nn.Linear(9, 5))
    config = MonteCLoRAConfig(
        r=4,
        target_modules=["a", "b", "c"],
        sample_scaler=0.3,
        rank_pattern=ranks or {},
        sparse_mixture=sparse,
        init_lora_weights=False,
        dirichlet_init="uniform",
        seed=3,
    )
    model = get_monteclora_model(base, config)
    with torch.no_grad():
        for i, layer in enumerate(monteclora_layers(model)):
            layer.wishart_log_scale.copy_(torch.linspace(-0.5, 0.4 + i, layer.out_features).view(-1, 1))
    return model


def engine_loss(model, delta_weights):
    """A loss on the engine's weight deltas of one forward plus its regulariser terms."""
    engine = next(monteclora_layers(model)).engine
    model.train()
    model(torch.randn(2, 6, generator=torch.Generator().manual_seed(1)))
    deltas = engine._train.deltas
    terms = monteclora_losses(model)
    loss = sum((d * w).sum() for d, w in zip(deltas, delta_weights, strict=True))
    return loss + sum(WEIGHTS[name] * terms[name] for name in WEIGHTS), engine


def reference_loss(model, engine, delta_weights):
    """The same loss from the per-layer formulas with autograd (layers in the engine's stacked order)."""
    layers = engine._partitions[0].layers
    alpha = torch.cat([layer.concentration_log for layer in layers]).exp()
    generator = seeded_generator(
        CPU, stream_seed(3, adapter_key("default"), 0, STREAM_DIRICHLET, engine.current_index, 0)
    )
    pi = dirichlet_attach(alpha, dirichlet_sample(alpha, generator))
    draws = engine.sampler._compute((0, engine.current_index))
    per_group = [(d.noise[i], d.row_sq[i], d.log_det[i]) for d in draws for i in range(d.row_sq.shape[0])]
    sparse = engine.config.sparse_mixture
    loss = 0
    totals = dict.fromkeys(WEIGHTS, 0)
    for slot, layer in enumerate(layers):
        log_v = layer.wishart_log_scale.view(-1)
        norm = 1.0 if sparse else pi[slot].norm()
        scale = 0.3 * norm * (0.5 * log_v).exp()
        noise, row_sq, log_det = per_group[slot]
        loss = loss + (scale.view(-1, 1) * noise * delta_weights[layer.layer_index]).sum()
        totals["kl_gaussian"] = totals["kl_gaussian"] + kl_gaussian(log_v, row_sq, log_det)
        totals["kl_wishart"] = totals["kl_wishart"] + kl_wishart(log_v, layer.dof)
        totals["kl_dirichlet"] = totals["kl_dirichlet"] + kl_dirichlet(alpha[slot], 1.0)
        totals["cooperative"] = totals["cooperative"] + cooperative_loss(pi[slot])
    return loss + sum(WEIGHTS[name] * totals[name] / len(layers) for name in WEIGHTS)


def sampler_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(LOG_PARAMS)}
    assert len(grads) == 1  # one stacked [ln v | ln alpha] for the adapter
    return grads


@pytest.mark.parametrize("ranks, sparse", [(None, False), ({"b": 2, "c": 3}, False), ({"b": 2}, True)])
def test_step_node_gradients_equal_autograd_through_the_per_layer_math(ranks, sparse):
    model = mlp(ranks, sparse)
    layers = list(monteclora_layers(model))
    assert sparse or len({layer.out_features for layer in layers}) == (1 if ranks is None else 3)
    generator = torch.Generator().manual_seed(2)
    delta_weights = [torch.randn(layer.out_features, layer.in_features, generator=generator) for layer in layers]
    loss, engine = engine_loss(model, delta_weights)
    loss.backward()
    ours = sampler_grads(model)
    model.zero_grad()
    reference = reference_loss(model, engine, delta_weights)
    assert torch.allclose(loss, reference, rtol=1e-5)
    reference.backward()
    for name, grad in sampler_grads(model).items():
        assert torch.allclose(ours[name], grad, rtol=1e-4, atol=1e-6), name


def test_a_layer_dof_defaults_to_its_own_rank():
    layers = {layer.out_features: layer.dof for layer in monteclora_layers(mlp({"b": 2, "c": 3}))}
    assert layers == {4: 4.0, 2: 2.0, 3: 3.0}


@pytest.mark.parametrize("reentrant", [True, False])
def test_mixed_ranks_keep_gradients_under_checkpointing(reentrant):
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_config(num_hidden_layers=3))
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()
        config = MonteCLoRAConfig(
            r=4, rank_pattern={"v_proj": 2, "down_proj": 6}, sample_scaler=0.5, init_lora_weights=False
        )
        model = get_monteclora_model(base, config)
        model.train()
        (model(input_ids=ids, labels=ids).loss + monteclora_losses(model)["total"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def _stacked_gradient_arrivals(model: nn.Module, steps: int) -> tuple[torch.Tensor, list[bool]]:
    """Train-mode backwards of the task loss plus the regulariser; every time autograd reached the
    stacked ln v / ln alpha parameter (ZeRO's reduction hook fires then, with or without a gradient)."""
    (stacked,) = [p for name, p in model.named_parameters() if name.endswith(LOG_PARAMS)]
    arrivals: list[bool] = []
    stacked.register_post_accumulate_grad_hook(lambda param: arrivals.append(param.grad is not None))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        (model(input_ids=ids, labels=ids).loss + monteclora_losses(model)["total"]).backward()
    return stacked.grad, arrivals


def _checkpointed_llama(reentrant: bool | None) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(num_hidden_layers=3))
    if reentrant is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.enable_input_require_grads()
    return get_monteclora_model(base, MonteCLoRAConfig(r=4, sample_scaler=0.5, init_lora_weights=False))


@pytest.mark.parametrize("reentrant", [True, False, None], ids=["reentrant", "non_reentrant", "no_checkpointing"])
def test_under_zero_v_and_alpha_get_their_gradient_once_per_backward_and_unchanged(monkeypatch, reentrant):
    """DeepSpeed ZeRO reduces a parameter's gradient each time autograd reaches it, once per
    backward. Reentrant checkpointing replays every block in a backward of its own, each reaching
    the step node: for ZeRO's parameters the gradient is handed over in one piece (`_HandOver`),
    after every block, and is the same sum (two accumulating backwards, as gradient accumulation)."""
    expected, plain_arrivals = _stacked_gradient_arrivals(_checkpointed_llama(reentrant), steps=2)
    assert len(plain_arrivals) == (8 if reentrant else 2)  # per backward: 3 replayed blocks, the regulariser
    monkeypatch.setattr(engine_module, "reduces_once", lambda param: True)  # ZeRO's, as far as the engine sees
    grad, arrivals = _stacked_gradient_arrivals(_checkpointed_llama(reentrant), steps=2)
    assert arrivals == [True, True]
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-7)


def test_under_zero_a_loss_without_the_regulariser_is_an_error_not_a_lost_gradient(monkeypatch):
    monkeypatch.setattr(engine_module, "reduces_once", lambda param: True)
    model = _checkpointed_llama(reentrant=True)
    ids = torch.arange(2, 12).reshape(1, 10)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match=r"add monteclora_losses\(model\)\['total'\] to the loss"):
        model(input_ids=ids, labels=ids)


def test_two_adapters_with_one_seed_draw_different_noise():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = MonteCLoRAConfig(r=4, seed=7, sample_scaler=0.5, init_lora_weights=False)
    model = get_monteclora_model(get_monteclora_model(LlamaForCausalLM(tiny_config()), config, "a"), config, "b")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    noise = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        model.train()
        with torch.no_grad():
            model(input_ids=ids)
        layer = next(layer for layer in monteclora_layers(model) if layer.adapter_name == name)
        noise[name] = layer.engine._train.deltas[0]
    assert not torch.equal(noise["a"], noise["b"])


def test_bf16_weights_get_their_deltas_in_bf16_from_the_second_forward():
    """The engine learns the weights' dtype from the layers (the first forward casts in each layer),
    then casts once per noise group; the values are the same cast of the same fp32 product."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # peft keeps adapter weights in fp32 on a bf16 base; a cast of the whole model (as DeepSpeed's
    # bf16 mode does) makes them, and the stacked ln v / ln alpha, bf16
    base = LlamaForCausalLM(tiny_config())
    model = get_monteclora_model(base, MonteCLoRAConfig(r=4, sample_scaler=0.5, init_lora_weights=False)).to(
        torch.bfloat16
    )
    engine = next(monteclora_layers(model)).engine
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    dtypes = []
    for _ in range(2):
        (model(input_ids=ids, labels=ids).loss + monteclora_losses(model)["total"]).backward()
        dtypes.append({delta.dtype for delta in engine._train.deltas})
    assert dtypes == [{torch.float32}, {torch.bfloat16}]
    (stacked,) = engine.stacked_parameters()
    assert stacked.dtype == torch.bfloat16 and stacked.grad is not None and torch.isfinite(stacked.grad).all()
    assert stacked.grad.abs().sum() > 0
