"""The one dispatch point: put MonteCLoRA on a model's peft LoRA layers, and read it back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora.engine import MonteCLoRAEngine
from monte_ds.monteclora.layer import MonteCLoRALinearA


def _supported_lora_layer_types() -> tuple[type, ...]:
    types: list[type] = [LoraLinear]
    try:  # bitsandbytes is a dependency, but a broken install must not break full precision
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

        types += [Linear4bit, Linear8bitLt]
    except ImportError:
        pass
    return tuple(types)


def lora_config(config: MonteCLoRAConfig) -> LoraConfig:
    """The plain peft LoRA config underneath (also what the exported adapter declares)."""
    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=config.resolved_target_modules,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        modules_to_save=config.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def get_monteclora_model(
    model: nn.Module,
    config: MonteCLoRAConfig,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with peft LoRA, then turn every adapted linear layer's A into MonteCLoRA's.

    Raises ValueError naming the module when a targeted layer is not linear (embedding,
    convolution, ...): nothing falls back to plain LoRA silently.
    """
    peft_model = get_peft_model(model, lora_config(config), adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    engine = MonteCLoRAEngine(config, adapter_name)
    supported = _supported_lora_layer_types()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {}):
                raise ValueError(f"MonteCLoRA supports linear layers only; {name} is {type(module.get_base_layer()).__name__}")
            continue
        if type(module) not in supported:
            raise ValueError(
                f"MonteCLoRA supports linear layers only (nn.Linear, bitsandbytes Linear4bit/Linear8bitLt); "
                f"{name} is {type(module.get_base_layer()).__name__}"
            )
        module.lora_A[adapter_name] = MonteCLoRALinearA(module.lora_A[adapter_name], config, engine)
        if config.posthoc:
            module.lora_A[adapter_name].weight.requires_grad_(False)
            module.lora_B[adapter_name].weight.requires_grad_(False)
    if not engine.layers:
        raise ValueError(f"target_modules {config.resolved_target_modules!r} matched no linear layer")
    root = peft_model.get_base_model()
    root.register_forward_pre_hook(ForwardStart(engine))
    return peft_model


class ForwardStart:
    """Root-module pre-hook: each training forward of the whole model draws the step's noise and
    computes its row scales and regulariser for all layers at once (never during checkpoint
    recomputation, which re-runs layers only); eval forwards prepare posterior-predictive draws.

    An object rather than a closure so that `copy.deepcopy(model)` gives the copy a hook bound
    to the copy's own engine (functions are not copied by deepcopy).
    """

    def __init__(self, engine: MonteCLoRAEngine) -> None:
        self.engine = engine

    def __call__(self, module: nn.Module, args) -> None:
        if module.training:
            self.engine.begin_training_forward()
        else:
            self.engine.begin_eval_forward()


def monteclora_layers(model: nn.Module) -> Iterator[MonteCLoRALinearA]:
    """The adapted layers' A modules, in model order (works through DeepSpeed/FSDP wrappers)."""
    for module in model.modules():
        if isinstance(module, MonteCLoRALinearA):
            yield module


def monteclora_engines(model: nn.Module) -> dict[str, MonteCLoRAEngine]:
    """The model's MonteCLoRA adapters by name: each one's config, layers, sampler and counter."""
    engines: dict[str, MonteCLoRAEngine] = {}
    for layer in monteclora_layers(model):
        engines.setdefault(layer.adapter_name, layer.engine)
    return engines


def monteclora_engine(model: nn.Module, adapter_name: str | None = None) -> MonteCLoRAEngine:
    """The engine of `adapter_name` (default: the model's only, or first, MonteCLoRA adapter)."""
    engines = monteclora_engines(model)
    if not engines:
        raise ValueError("model has no MonteCLoRA layers (build it with monte_ds.get_monteclora_model)")
    if adapter_name is None:
        return next(iter(engines.values()))
    if adapter_name not in engines:
        raise ValueError(f"no MonteCLoRA adapter named {adapter_name!r}; the model has {', '.join(engines)}")
    return engines[adapter_name]


def monteclora_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The regulariser of the last training forward, averaged over layers (fp32, differentiable).

    total = kl_weight * mean(KL_N + KL_W + KL_D) + mean(cooperative)
    """
    return monteclora_engine(model).regulariser()


def sampler_state(model: nn.Module) -> dict[str, int]:
    """What a checkpoint must hold for the noise of a resumed run to continue exactly."""
    return monteclora_engine(model).state_dict()


def load_sampler_state(model: nn.Module, state: dict[str, int]) -> None:
    monteclora_engine(model).load_state_dict(state)


@contextmanager
def predictive_sampling(model: nn.Module, draw: int) -> Iterator[None]:
    """Eval-mode forwards inside use sampled weights (posterior-predictive draw `draw`,
    deterministic in (seed, rank, draw)) instead of the mean."""
    engine = monteclora_engine(model)
    previous, engine.predictive_draw = engine.predictive_draw, int(draw)
    try:
        yield
    finally:
        engine.predictive_draw = previous
