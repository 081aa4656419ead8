"""Shared fixtures: tiny LLaMA bases built from a config (no hub, fp32, seconds on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from monte_ds.tiny import tiny_llama_config


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128


def tiny_config(**overrides) -> LlamaConfig:
    """monte_ds.tiny's LLaMA, smaller still (hidden 32) unless overridden."""
    return tiny_llama_config(
        VOCAB, **{"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64, **overrides}
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny LLaMA: the real from_pretrained path (also for bitsandbytes quantisation)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(1234)
    LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=128)).save_pretrained(path)
    return path


QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture
def load_base(tiny_checkpoint) -> Callable[..., LlamaForCausalLM]:
    """`load_base()` in full precision, `load_base("nf4" | "fp4" | "int8")` quantized with bitsandbytes."""

    def load(quantization: str | None = None) -> LlamaForCausalLM:
        kwargs = {}
        if quantization is not None:
            kwargs = {"quantization_config": BitsAndBytesConfig(**QUANTIZATIONS[quantization]), "device_map": "cpu"}
        return LlamaForCausalLM.from_pretrained(tiny_checkpoint, **kwargs)

    return load


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def sigkill_when(argv: Sequence[str], ready: Callable[[], bool], timeout_s: float) -> None:
    """Start `argv` (output discarded) and SIGKILL it as soon as `ready()` holds; fails if the
    process exits first or `timeout_s` passes."""
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
