"""Load what is evaluated: a causal LM (full precision or bitsandbytes-quantized), optionally
with a monte-ds MonteCLoRA adapter or a plain peft adapter on top. `monte-ds eval` and the
evaluation after training both load through `load_model`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME as PEFT_CONFIG
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from monte_ds import load_adapter, pretrained
from monte_ds.errors import UserError, first_line
from monte_ds.monteclora.io import CONFIG_NAME as MONTECLORA_CONFIG


logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """The model in eval mode, its tokenizer, and the report metadata describing them."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    metadata: dict[str, Any]


def adapter_kind(directory: Path) -> str:
    """The adapter format: "monteclora" for a `save_adapter` directory, "peft" for a plain peft one."""
    if not directory.is_dir():
        raise UserError(f"no such directory {directory}", key="adapter")
    if (directory / MONTECLORA_CONFIG).is_file():
        return "monteclora"
    if (directory / PEFT_CONFIG).is_file():
        return "peft"
    raise UserError(
        f"{directory} is neither a monte-ds adapter ({MONTECLORA_CONFIG}) nor a peft adapter ({PEFT_CONFIG})",
        key="adapter",
    )


def nf4_config(dtype: str) -> BitsAndBytesConfig:
    """`--load-in-4bit`: nf4 with double quantization, computing in `dtype` (float32 for "auto")."""
    compute = torch.float32 if dtype == "auto" else DTYPES[dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_model(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    quantization: BitsAndBytesConfig | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
) -> LoadedModel:
    """The base model placed whole on `device`, the adapter on top, in eval mode.

    The tokenizer comes from the adapter directory when it has one (a fine-tune may add
    tokens), else from the base model. A `gguf_file` inside `model` is dequantised to `dtype`
    (it cannot also be quantized).
    """
    kind = adapter_kind(Path(adapter)) if adapter is not None else None
    hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file is not None and quantization is not None:
        raise UserError("a GGUF base is dequantised on load and cannot also be quantized", key="gguf_file")
    try:
        if gguf_file is not None:
            base = pretrained.load_gguf(model, gguf_file, DTYPES[dtype]).to(device)
        else:
            base = AutoModelForCausalLM.from_pretrained(
                model,
                dtype=DTYPES[dtype],
                device_map={"": device},  # straight onto the device, quantized or not
                quantization_config=quantization,
                attn_implementation=attn_implementation,
                **hub,
            )
        has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
        if has_tokenizer or gguf_file is None:
            tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else model, **hub)
        else:
            tokenizer = pretrained.load_gguf_tokenizer(model, gguf_file)
    except OSError as err:
        raise UserError(f"cannot load {model}: {first_line(err)}", key="model") from None
    if kind == "monteclora":
        loaded = load_adapter(base, adapter)
    elif kind == "peft":
        loaded = PeftModel.from_pretrained(base, adapter)
    else:
        loaded = base
    loaded.eval()
    metadata = {
        "model": str(model) if gguf_file is None else str(Path(model) / gguf_file),
        "adapter": None if adapter is None else str(adapter),
        "adapter_type": kind,
        "quantization": _quantization_name(quantization),
        "dtype": dtype,
    }
    logger.info("loaded %s", metadata)
    return LoadedModel(loaded, tokenizer, metadata)


def _quantization_name(quantization: BitsAndBytesConfig | None) -> str | None:
    if quantization is None:
        return None
    return "int8" if quantization.load_in_8bit else quantization.bnb_4bit_quant_type
