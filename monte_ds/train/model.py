"""The model side of a run: tokenizer, base model (full precision or bitsandbytes 4/8-bit), the
tiny LLaMA of the embedded config, a prepared pretrained base or a GGUF one (monte_ds.pretrained),
and the method's adapter (MonteCLoRA, a peft baseline, or none for full fine-tuning)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    set_seed,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from monte_ds import pretrained
from monte_ds.atomic import atomic_directory
from monte_ds.errors import UserError, first_line
from monte_ds.monteclora.targets import module_names, target_problems
from monte_ds.tiny import build_tiny_llama, tiny_llama_config
from monte_ds.train.config import QuantizationSection, TrainConfig
from monte_ds.train.methods import REGISTRY


logger = logging.getLogger(__name__)


def ensure_tiny_model(path: str | Path, texts: list[str], seed: int) -> None:
    """Build the tiny LLaMA and its tokenizer at `path` unless it is there (deterministic in
    `texts` and `seed`; written whole or not at all, so concurrent ranks cannot see half of it)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return
    logger.info("building a tiny LLaMA at %s", path)
    with atomic_directory(path) as tmp:
        build_tiny_llama(tmp, texts, seed=seed)


def ensure_base_model(config: TrainConfig, texts: list[str]) -> None:
    """Build or prepare the base at `model.path` when the config asks for it (main process only)."""
    if config.model.build_tiny:
        ensure_tiny_model(config.model.path, texts, seed=0)
    elif config.model.prepare is not None:
        pretrained.prepare_model(config.model.prepare, config.model.path)


def gguf_source(config: TrainConfig) -> tuple[Path, str] | None:
    """The folder and GGUF file the base is read from, when it is read from one: the user's
    `model.gguf_file`, or the packaged GGUF of a base still to prepare."""
    model = config.model
    if model.gguf_file is not None:
        return Path(model.path).expanduser(), model.gguf_file
    if model.prepare is not None and not pretrained.is_prepared(model.path):
        gguf = pretrained.packaged_gguf(model.prepare)
        return gguf.parent, gguf.name
    return None


def check_model_path(config: TrainConfig) -> PretrainedConfig:
    """Read the model's config (a local file or one small hub download) so that a wrong path or
    hub id fails as a user error before anything is written; a tiny base still to build is the
    tiny LLaMA's (its module names do not depend on the vocabulary it will get), a base still to
    prepare its GGUF's."""
    model = config.model
    if model.build_tiny and not Path(model.path).exists():
        return tiny_llama_config(vocab_size=512)
    gguf = gguf_source(config)
    try:
        if gguf is not None:
            return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        return AutoConfig.from_pretrained(
            model.path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load a model config from {model.path!r}: {first_line(err)}", key="model.path"
        ) from None


def check_adapter_targets(config: TrainConfig, model_config: PretrainedConfig) -> None:
    """Every adapter target must match a module of the model, built on the meta device (no
    weights read): all the problems in one user error, before anything is written. Methods that
    target no modules (full fine-tuning, prompt tuning) have nothing to check."""
    if not REGISTRY[config.method].targets_modules:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    problems = target_problems(module_names(skeleton), config.adapter)
    if problems:
        raise UserError("; ".join(f"adapter.{problem}" for problem in problems))


def load_tokenizer(config: TrainConfig) -> PreTrainedTokenizerBase:
    model = config.model
    gguf = gguf_source(config)
    if gguf is not None:
        return pretrained.load_gguf_tokenizer(*gguf)
    return AutoTokenizer.from_pretrained(model.path, revision=model.revision, trust_remote_code=model.trust_remote_code)


def quantization_config(quantization: QuantizationSection, shards_parameters: bool) -> BitsAndBytesConfig | None:
    """bitsandbytes settings; ZeRO-3 and FSDP2 need the 4-bit storage in a float dtype to shard it."""
    if not quantization.enabled:
        return None
    if quantization.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = quantization.quant_storage
    if storage == "auto":
        storage = quantization.compute_dtype if shards_parameters else "uint8"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.mode,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, storage),
    )


def load_base_model(config: TrainConfig, device: torch.device, sharded: bool) -> PreTrainedModel:
    """The base model, placed on this rank's device when quantized (bitsandbytes needs it there);
    when `sharded` (ZeRO-3, FSDP2) the engine places and shards it."""
    model = config.model
    if model.gguf_file is not None:  # never quantized nor sharded (the config refuses both)
        return pretrained.load_gguf(model.path, model.gguf_file, _dtype(model.dtype))
    quantization = quantization_config(config.quantization, config.shards_parameters)
    device_map = {"": device} if quantization is not None and not sharded else None
    return AutoModelForCausalLM.from_pretrained(
        model.path,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        dtype=_dtype(model.dtype),
        attn_implementation=model.attn_implementation,
        quantization_config=quantization,
        device_map=device_map,
    )


def _dtype(name: str) -> str | torch.dtype:
    return name if name == "auto" else getattr(torch, name)


def attach_adapter(
    model: PreTrainedModel,
    config: TrainConfig,
    seed: int,
    activation_checkpointing: bool,
    activation_checkpointing_kwargs: dict | None,
) -> PeftModel | PreTrainedModel:
    """QLoRA preparation when quantized, then the method's adapter, initialised from `seed`
    (`full` trains the model itself: nothing is attached)."""
    if config.quantization.enabled and not config.shards_parameters:
        # Upcasts the non-quantized weights (norms, embeddings) to fp32 and freezes the base;
        # ZeRO-3/FSDP2 runs skip it: sharding needs one storage dtype across the base.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=activation_checkpointing,
            gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
        )
    set_seed(seed)
    return REGISTRY[config.method].attach(model, config.adapter, config.method_options, config.model.path)
