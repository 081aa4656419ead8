"""Saving and loading: the full resumable MonteCLoRA adapter, and the plain-LoRA export.

Both write atomically and gather parameters that DeepSpeed ZeRO-3 or FSDP2 shard, so the
files are complete on any setup (the empty-adapter bug of ZeRO-3 users does not arise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from torch import nn

from monte_ds.atomic import atomic_directory
from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError
from monte_ds.monteclora.distributed import data_parallel_rank, gathered
from monte_ds.monteclora.engine import LOG_PARAMS, stack_log_params
from monte_ds.monteclora.layer import EXTRA_PARAMS, LEGACY_PARAMS
from monte_ds.monteclora.model import get_monteclora_model, monteclora_engine, monteclora_layers, peft_model_of


WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME  # peft's: the export loads with PeftModel.from_pretrained
# Not config.json: that name is a run folder's whole training config and, to transformers, a model's.
CONFIG_NAME = "monteclora_config.json"
SAMPLER_JSON = "monteclora_sampler.json"  # the noise counter: the same file in a training checkpoint
LEGACY_SAMPLER_JSON = "sampler_state.json"  # its name in adapters saved before; still read


def _unwrap(model: nn.Module) -> PeftModel:
    peft_model = peft_model_of(model)
    if peft_model is None:
        raise InputError(f"expected a PeftModel built by get_monteclora_model, got {type(model).__name__}")
    return peft_model


def _full_cpu_state(peft_model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's state dict, complete and on CPU (collective under ZeRO-3/FSDP2: call on all ranks)."""
    with gathered(peft_model):
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        full = {}
        for key, tensor in state.items():
            if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor
                tensor = tensor.full_tensor()
            full[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return full


def _is_extra(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in EXTRA_PARAMS


def _saved_prefix(module_name: str, adapter_name: str) -> str:
    """A module's key prefix in a saved adapter: peft drops the adapter name."""
    return module_name.replace(f".{adapter_name}", "")


def _stack_legacy(state: dict[str, torch.Tensor], peft_model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """An adapter saved with one ln v (r, 1) and one ln alpha (1, N) per layer, in the stacked
    format: each device's rows in one [ln v (padded with 0) | ln alpha] tensor, keyed under the
    first layer's A. A state without legacy keys is returned as it is."""
    if not any(key.rsplit(".", 1)[-1] in LEGACY_PARAMS for key in state):
        return state
    state = dict(state)
    names = {id(module): name for name, module in peft_model.named_modules()}
    engine = monteclora_engine(peft_model, adapter_name)
    layers = [layer for layer in monteclora_layers(peft_model) if layer.adapter_name == adapter_name]
    stacks: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    owners: dict[int, str] = {}
    for layer in layers:
        prefix = _saved_prefix(names[id(layer)], adapter_name)
        try:
            log_v, log_alpha = (state.pop(f"{prefix}.{name}") for name in LEGACY_PARAMS)
        except KeyError as err:
            raise InputError(f"adapter does not match the model (missing {err.args[0]})") from None
        stack, slot = engine.row_of(layer)
        stacks.setdefault(stack, {})[slot] = (log_v, log_alpha)
        if slot == 0:
            owners[stack] = f"{prefix}.{LOG_PARAMS}"
    for stack, rows in stacks.items():
        state[owners[stack]] = stack_log_params([rows[slot] for slot in range(len(rows))])
    return state


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Everything needed to resume training: A, B, v, alpha, the config and the sampler state."""
    peft_model = _unwrap(model)
    state = _full_cpu_state(peft_model, adapter_name)
    if data_parallel_rank() != 0:
        return
    config = monteclora_engine(peft_model, adapter_name).config
    with atomic_directory(directory) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (tmp / SAMPLER_JSON).write_text(json.dumps(monteclora_engine(peft_model, adapter_name).state_dict()) + "\n")
        peft_model.peft_config[adapter_name].save_pretrained(tmp)


def load_adapter(
    base_model: nn.Module, directory: str | Path, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> PeftModel:
    """Rebuild the MonteCLoRA adapter saved by `save_adapter` on `base_model` (exactly), named
    `adapter_name`; on a PeftModel it is added next to the adapters already there."""
    directory = Path(directory)
    sampler = directory / SAMPLER_JSON
    if not sampler.is_file() and (directory / LEGACY_SAMPLER_JSON).is_file():
        sampler = directory / LEGACY_SAMPLER_JSON
    missing = [path.name for path in (directory / WEIGHTS_NAME, directory / CONFIG_NAME, sampler) if not path.is_file()]
    if missing:
        raise InputError(f"not a monte-ds adapter (missing {', '.join(missing)})", key=str(directory))
    config = MonteCLoRAConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    peft_model = get_monteclora_model(base_model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    state = _stack_legacy(load_file(directory / WEIGHTS_NAME), peft_model, adapter_name)
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name).keys())
    if set(state) != expected:
        absent, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InputError(
            f"adapter does not match the model (missing {absent[:3]}, unexpected {extra[:3]})", key=str(directory)
        )
    set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    monteclora_engine(peft_model, adapter_name).load_state_dict(json.loads(sampler.read_text()))
    return peft_model


def export_lora_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """A plain peft LoRA adapter of the means (A = mu): what MonteCLoRA is at inference.

    `peft.PeftModel.from_pretrained(base, directory)` loads it without monte_ds installed.
    """
    peft_model = _unwrap(model)
    state = {k: v for k, v in _full_cpu_state(peft_model, adapter_name).items() if not _is_extra(k)}
    if data_parallel_rank() != 0:
        return
    with atomic_directory(directory) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_model.peft_config[adapter_name].save_pretrained(tmp)
