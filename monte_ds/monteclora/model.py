"""The one dispatch point: put MonteCLoRA on a model's peft LoRA layers, and read it back."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError
from monte_ds.monteclora.engine import REGULARISER_TERMS, MonteCLoRAEngine
from monte_ds.monteclora.layer import MonteCLoRALinearA
from monte_ds.monteclora.targets import check_targets, infer_task_type


_LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
# On the PeftModel: its MonteCLoRA engines by adapter name, so that the per-step calls
# (monteclora_losses) do not walk every module of the model (~10 ms a step at 224 layers).
_ENGINES = "_monteclora_engines"


def _supported_lora_layer_types() -> tuple[type, ...]:
    types: list[type] = [LoraLinear]
    try:  # bitsandbytes is a dependency, but a broken install must not break full precision
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

        types += [Linear4bit, Linear8bitLt]
    except ImportError:
        pass
    return tuple(types)


def lora_config(config: MonteCLoRAConfig) -> LoraConfig:
    """The plain peft LoRA config underneath (also what the exported adapter declares): every
    LoraConfig field MonteCLoRAConfig holds, passed by name (copies: peft extends some lists in
    place, e.g. `modules_to_save` with its classifier names)."""
    fields = {
        f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name in _LORA_FIELDS
    }
    fields["target_modules"] = config.resolved_target_modules
    if config.eva_config is not None:
        fields["eva_config"] = EvaConfig(**config.eva_config)
    return LoraConfig(**fields)


def get_monteclora_model(
    model: nn.Module,
    config: MonteCLoRAConfig,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with peft LoRA, then turn every adapted linear layer's A into MonteCLoRA's.

    `model` may already be a PeftModel: the adapter is then added under `adapter_name` (not
    activated, as peft's `add_adapter`), with its own engine. `config.task_type=None` is
    inferred from the model. Raises `InputError` naming every target entry that matches no
    module, and the module when a targeted layer is not linear (embedding, convolution, ...):
    nothing falls back to plain LoRA silently. Only peft's default init of A is re-drawn from
    the seed; every other `init_lora_weights` is kept exactly.
    """
    if config.task_type is None:
        config = dataclasses.replace(config, task_type=infer_task_type(model))
    check_targets(model, config)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, lora_config(config), low_cpu_mem_usage=low_cpu_mem_usage)
        peft_model = model
    else:
        peft_model = get_peft_model(model, lora_config(config), adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    engine = MonteCLoRAEngine(config, adapter_name)
    supported = _supported_lora_layer_types()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {}):
                raise InputError(
                    f"MonteCLoRA supports linear layers only; {name} is {type(module.get_base_layer()).__name__}"
                )
            continue
        if type(module) not in supported:
            raise InputError(
                f"MonteCLoRA supports linear layers only (nn.Linear, bitsandbytes Linear4bit/Linear8bitLt); "
                f"{name} is {type(module.get_base_layer()).__name__}"
            )
        module.lora_A[adapter_name] = MonteCLoRALinearA(
            module.lora_A[adapter_name], config, engine, seeded_init=config.init_lora_weights is True
        )
        if config.posthoc:
            module.lora_A[adapter_name].weight.requires_grad_(False)
            module.lora_B[adapter_name].weight.requires_grad_(False)
    if not engine.layers:
        raise InputError(f"target_modules {config.resolved_target_modules!r} matched no linear layer")
    engine.stack_parameters()
    root = peft_model.get_base_model()
    root.register_forward_pre_hook(ForwardStart(engine, _lora_layer(peft_model)))
    setattr(peft_model, _ENGINES, {**getattr(peft_model, _ENGINES, {}), adapter_name: engine})
    return peft_model


class ForwardStart:
    """Root-module pre-hook: each training forward of the whole model draws the step's noise and
    computes its row scales and regulariser for all layers at once (never during checkpoint
    recomputation, which re-runs layers only); eval forwards prepare posterior-predictive draws.

    An object rather than a closure so that `copy.deepcopy(model)` gives the copy a hook bound
    to the copy's own engine (functions are not copied by deepcopy).
    """

    def __init__(self, engine: MonteCLoRAEngine, lora_layer: LoraLayer) -> None:
        self.engine = engine
        self.lora_layer = lora_layer  # one of the adapter's peft layers: says whether it is active

    # Eager under torch.compile: the draws use explicit torch.Generators and the step node is a
    # custom Function with Python state, which dynamo cannot trace. One graph break, before the
    # first decoder layer; the layers only read this forward's deltas.
    @torch.compiler.disable
    def __call__(self, module: nn.Module, args) -> None:
        if not _is_active(self.lora_layer, self.engine.adapter_name):
            return  # an inactive or disabled adapter draws nothing and its counter stays
        if module.training:
            self.engine.begin_training_forward(root=module)
        else:
            self.engine.begin_eval_forward(root=module)


def _lora_layer(model: nn.Module) -> LoraLayer:
    """One of the model's peft LoRA layers: peft sets the active and disabled adapters on all alike."""
    return next(module for module in model.modules() if isinstance(module, LoraLayer))


def _is_active(lora_layer: LoraLayer, adapter_name: str) -> bool:
    return not lora_layer.disable_adapters and adapter_name in lora_layer.active_adapters


def monteclora_layers(model: nn.Module) -> Iterator[MonteCLoRALinearA]:
    """The adapted layers' A modules, in model order (works through DeepSpeed/FSDP wrappers)."""
    for module in model.modules():
        if isinstance(module, MonteCLoRALinearA):
            yield module


def peft_model_of(model: nn.Module) -> PeftModel | None:
    """The PeftModel inside DeepSpeed/FSDP/DDP wrappers (their `.module`), or None."""
    while not isinstance(model, PeftModel):
        model = getattr(model, "module", None)
        if model is None:
            return None
    return model


def monteclora_engines(model: nn.Module) -> dict[str, MonteCLoRAEngine]:
    """The model's MonteCLoRA adapters by name: each one's config, layers, sampler and counter."""
    peft_model = peft_model_of(model)
    registered = None if peft_model is None else peft_model.__dict__.get(_ENGINES)
    if registered is not None:
        return dict(registered)
    engines: dict[str, MonteCLoRAEngine] = {}
    for layer in monteclora_layers(model):
        engines.setdefault(layer.adapter_name, layer.engine)
    return engines


def monteclora_engine(model: nn.Module, adapter_name: str | None = None) -> MonteCLoRAEngine:
    """The engine of `adapter_name` (default: the model's only, or first, MonteCLoRA adapter)."""
    engines = monteclora_engines(model)
    if not engines:
        raise InputError("model has no MonteCLoRA layers (build it with monte_ds.get_monteclora_model)")
    if adapter_name is None:
        return next(iter(engines.values()))
    if adapter_name not in engines:
        raise InputError(f"no MonteCLoRA adapter named {adapter_name!r}; the model has {', '.join(engines)}")
    return engines[adapter_name]


def monteclora_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The regulariser of the last training forward, averaged over layers (fp32, differentiable).

    total = kl_weight * mean(KL_N + KL_W + KL_D) + mean(cooperative), summed over the active
    MonteCLoRA adapters (peft's `set_adapter`); zero while the adapters are disabled.
    """
    engines = monteclora_engines(model)
    if not engines:
        raise InputError("model has no MonteCLoRA layers (build it with monte_ds.get_monteclora_model)")
    lora_layer = _lora_layer(model)
    terms = [engine.regulariser() for name, engine in engines.items() if _is_active(lora_layer, name)]
    if not terms:
        zero = torch.zeros((), device=next(iter(engines.values())).layers[0].weight.device)
        return {name: zero for name in (*REGULARISER_TERMS, "total")}
    return {name: sum((each[name] for each in terms[1:]), terms[0][name]) for name in terms[0]}


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
