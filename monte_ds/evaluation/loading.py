"""Load what `monte-ds eval` evaluates: a causal LM (full precision or 4-bit), optionally
with a monte-ds MonteCLoRA adapter or a plain peft adapter on top."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from monte_ds import load_adapter
from monte_ds.errors import UserError
from monte_ds.monteclora.io import CONFIG_NAME as MONTECLORA_CONFIG

logger = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_kind(directory: Path) -> str:
    """The adapter format: "monteclora" for a `save_adapter` directory, "peft" for a plain peft one."""
    if not directory.is_dir():
        raise UserError(f"--adapter: no such directory {directory}")
    if (directory / MONTECLORA_CONFIG).is_file():
        return "monteclora"
    if (directory / PEFT_CONFIG).is_file():
        return "peft"
    raise UserError(
        f"--adapter: {directory} is neither a monte-ds adapter ({MONTECLORA_CONFIG}) nor a peft adapter ({PEFT_CONFIG})"
    )


def load_model(
    model: str, adapter: str | None, load_in_4bit: bool, dtype: str, device: str
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, dict[str, Any]]:
    """The model to evaluate, its tokenizer and the run metadata describing them.

    The tokenizer comes from the adapter directory when it has one (a fine-tune may add
    tokens), else from the base model.
    """
    kind = adapter_kind(Path(adapter)) if adapter is not None else None
    torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": {"": device}}  # straight onto the device
    if load_in_4bit:
        compute = torch.float32 if torch_dtype == "auto" else torch_dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    try:
        base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except OSError as err:
        raise UserError(f"--model: cannot load {model}: {err}".splitlines()[0]) from None
    if kind == "monteclora":
        loaded = load_adapter(base, adapter)
    elif kind == "peft":
        loaded = PeftModel.from_pretrained(base, adapter)
    else:
        loaded = base
    loaded.eval()
    metadata = {"model": model, "adapter": adapter, "adapter_type": kind, "load_in_4bit": load_in_4bit, "dtype": dtype}
    logger.info("loaded %s", metadata)
    return loaded, tokenizer, metadata
