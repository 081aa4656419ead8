"""CUDA paths (skipped without a GPU; benchmarks/gpu_suite.py runs them on one): an nf4 base on
CUDA gets the noise and evaluates as plain LoRA, and bf16 autocast keeps the regulariser fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from monte_ds import MonteCLoRAConfig, get_monteclora_model, monteclora_layers, monteclora_losses


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_nf4_base_on_cuda_gets_the_noise_and_evaluates_as_its_mean(tiny_checkpoint, input_ids):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = LlamaForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=quantization, device_map={"": 0})
    model = get_monteclora_model(base, MonteCLoRAConfig(r=4, sample_scaler=0.5, init_lora_weights=False))
    assert sum(1 for _ in monteclora_layers(model)) == 14
    ids = input_ids.cuda()
    model.train()
    with torch.no_grad():
        first, second = (model(input_ids=ids).logits for _ in range(2))
        model.eval()
        mean, again = (model(input_ids=ids).logits for _ in range(2))
    assert (first - second).abs().max() > 0  # sampled A in training
    assert torch.equal(mean, again)  # the mean in eval


def test_bf16_autocast_keeps_the_regulariser_in_fp32(tiny_checkpoint, input_ids):
    base = LlamaForCausalLM.from_pretrained(tiny_checkpoint).cuda()
    model = get_monteclora_model(base, MonteCLoRAConfig(r=4, sample_scaler=0.5))
    model.train()
    ids = input_ids.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        terms = monteclora_losses(model)
    assert all(value.dtype == torch.float32 for value in terms.values())
    (loss + terms["total"]).backward()
    layer = next(monteclora_layers(model))
    grads = layer.log_params_grad()
    assert grads is not None and all(torch.isfinite(grad).all() for grad in grads)
