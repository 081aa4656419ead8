"""The fine-tuning methods `adapter.method` names: which adapter options each takes, and its peft config.

MonteCLoRA and the paper's comparison set (full fine-tuning, LoRA, DoRA, AdaLoRA, IA³, LoRA+,
prompt tuning, and LoHa/LoKr from the same LyCORIS family as IA³) share one pipeline; this module
is the one place that knows how they differ. Every adapter comes from peft; `full` has none.

Option rules (checked before anything is written):
- an option the method does not use is an error (`adapter.r` on an IA³ run);
- except MonteCLoRA's own options, which the other methods ignore with a warning, so that one
  MonteCLoRA config can be the base of a comparison sweep;
- LoHa and LoKr read `lora_alpha` as their `alpha`, so LoRA-like methods share one base config.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, PeftConfig, PromptTuningConfig

from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError, UserError
from monte_ds.monteclora.model import lora_config


logger = logging.getLogger(__name__)

METHODS = ("monteclora", "full", "lora", "dora", "adalora", "ia3", "loha", "lokr", "loraplus", "prompt_tuning")
# LoRA adapters (peft LoraConfig) whatever the optimizer: they go to the run's lora_adapter/.
LORA_ADAPTERS = ("lora", "dora", "loraplus")

# MonteCLoRAConfig fields that only MonteCLoRA uses (the noise seed included).
_MONTECLORA_FIELDS = frozenset(field.name for field in dataclasses.fields(MonteCLoRAConfig))
MONTECLORA_ONLY = _MONTECLORA_FIELDS & {
    "n_components",
    "sample_scaler",
    "kl_weight",
    "dirichlet_prior",
    "dirichlet_init",
    "wishart_df",
    "sparse_mixture",
    "posthoc",
    "sampler",
    "seed",
}
# Everything else of MonteCLoRAConfig is a peft LoraConfig field.
LORA_FIELDS = _MONTECLORA_FIELDS - MONTECLORA_ONLY
_TARGETING = frozenset({"target_modules", "modules_to_save"})
_LYCORIS = _TARGETING | {"r", "lora_alpha", "rank_dropout", "module_dropout"}
ACCEPTED: dict[str, frozenset[str]] = {
    "monteclora": _MONTECLORA_FIELDS,
    "full": frozenset(),
    "lora": LORA_FIELDS,
    "dora": LORA_FIELDS - {"use_dora"},  # implied
    "loraplus": LORA_FIELDS | {"loraplus_lr_ratio", "loraplus_lr_embedding"},
    "adalora": _TARGETING
    | {"r", "lora_alpha", "lora_dropout", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"},
    "ia3": _TARGETING | {"feedforward_modules"},
    "loha": _LYCORIS,
    "lokr": _LYCORIS | {"decompose_both", "decompose_factor"},
    "prompt_tuning": frozenset({"num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"}),
}
# The default IA³ feed-forward modules: LLaMA's MLP projections among the targets.
_LLAMA_FEEDFORWARD = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MethodOptions:
    """The comparison methods' options that MonteCLoRAConfig does not hold, under peft's names.

    AdaLoRA prunes from `init_r` (default 1.5 r, peft's 12 for r = 8) to an average rank of
    `r`, so that it ends with LoRA's budget; its `total_step` is the run's step count.
    LoRA+'s default ratio 16 is the LoRA+ paper's recommendation for decoder models.
    """

    init_r: int | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    loraplus_lr_ratio: float = 16.0
    loraplus_lr_embedding: float = 1e-6
    feedforward_modules: list[str] | str | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    num_virtual_tokens: int = 20
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    def __post_init__(self) -> None:
        rules = [
            (self.init_r is None or self.init_r >= 1, "init_r", "null or >= 1"),
            (self.tinit >= 0, "tinit", ">= 0"),
            (self.tfinal >= 0, "tfinal", ">= 0"),
            (self.deltaT >= 1, "deltaT", ">= 1"),
            (0 < self.beta1 < 1, "beta1", "in (0, 1)"),
            (0 < self.beta2 < 1, "beta2", "in (0, 1)"),
            (self.orth_reg_weight >= 0, "orth_reg_weight", ">= 0"),
            (self.loraplus_lr_ratio > 0, "loraplus_lr_ratio", "> 0"),
            (self.loraplus_lr_embedding >= 0, "loraplus_lr_embedding", ">= 0"),
            (0 <= self.rank_dropout < 1, "rank_dropout", "in [0, 1)"),
            (0 <= self.module_dropout < 1, "module_dropout", "in [0, 1)"),
            (self.decompose_factor == -1 or self.decompose_factor >= 1, "decompose_factor", "-1 or >= 1"),
            (self.num_virtual_tokens >= 1, "num_virtual_tokens", ">= 1"),
            (
                (self.prompt_tuning_init == "TEXT") == bool(self.prompt_tuning_init_text),
                "prompt_tuning_init_text",
                "set exactly when prompt_tuning_init is 'TEXT'",
            ),
        ]
        for ok, name, rule in rules:
            if not ok:
                raise InputError(f"must be {rule}, got {getattr(self, name)!r}", key=name)


OPTION_FIELDS = frozenset(field.name for field in dataclasses.fields(MethodOptions))


def check_method_options(method: str, section: Mapping[str, Any]) -> None:
    """Refuse the adapter options `method` does not use; warn about MonteCLoRA's, which it ignores."""
    accepted = ACCEPTED[method]
    for key in sorted(section):
        if key not in accepted and key not in MONTECLORA_ONLY:
            takes = ", ".join(sorted(accepted)) or "no adapter options"
            raise UserError(f"not an option of method {method!r} (it takes: {takes})", key=f"adapter.{key}")
    ignored = sorted(key for key in section if key not in accepted)
    if ignored:
        logger.warning("adapter: method %r ignores the MonteCLoRA settings %s", method, ", ".join(ignored))


def method_options(method: str, section: Mapping[str, Any], adapter: MonteCLoRAConfig) -> MethodOptions:
    """The validated MethodOptions of `section` (its MethodOptions keys; checked by `check_method_options`)."""
    values = {key: value for key, value in section.items() if key in OPTION_FIELDS}
    try:
        options = MethodOptions(**values)
    except InputError as err:
        raise UserError(err.problem, key=err.key).under("adapter") from None
    if method == "adalora" and options.init_r is not None and options.init_r < adapter.r:
        raise UserError(f"AdaLoRA prunes from init_r down to r, so it must be >= r ({adapter.r})", key="adapter.init_r")
    if method == "ia3":
        ia3_feedforward_modules(adapter, options)  # a string target pattern needs explicit feed-forward modules
    return options


def check_method_setup(method: str, quantized: bool, zero_stage: int | None, fsdp: bool) -> None:
    """What a method cannot do with the rest of the config, refused before anything runs."""
    if quantized and method == "full":
        raise UserError(
            "full fine-tuning trains every weight, and quantized weights cannot be trained", key="quantization.mode"
        )
    if quantized and method in ("loha", "lokr"):
        raise UserError(f"peft's {method} has no bitsandbytes layers; use none", key="quantization.mode")
    if zero_stage == 3 and method == "loha":
        raise UserError(
            "peft's LoHa sizes its factors from the base weight's shape, which ZeRO-3 partitions "
            "before the adapter is attached; use ZeRO-2 or FSDP2",
            key="distributed.deepspeed",
        )
    if (zero_stage == 3 or fsdp) and method == "adalora":
        raise UserError(
            "AdaLoRA's rank allocation reads whole weights and gradients, which ZeRO-3 and FSDP shard",
            key="distributed",
        )
    if zero_stage is not None and method == "adalora":
        raise UserError(
            "AdaLoRA's rank allocation reads the gradients after the optimizer step, and DeepSpeed's step "
            "has cleared them by then; use DDP",
            key="distributed.deepspeed",
        )
    if fsdp and method == "prompt_tuning":
        raise UserError(
            "peft saves prompt tuning by running its prompt encoder on the saving rank alone, outside the "
            "forward where FSDP2 gathers it; use DeepSpeed ZeRO-2 or ZeRO-3",
            key="distributed.fsdp",
        )


def resolved_options(method: str, adapter: MonteCLoRAConfig, options: MethodOptions) -> dict[str, Any]:
    """The adapter section as it applies to `method` (what the run's config.json records)."""
    values = adapter.to_dict() | dataclasses.asdict(options)
    return {key: values[key] for key in sorted(ACCEPTED[method])}


def ia3_feedforward_modules(adapter: MonteCLoRAConfig, options: MethodOptions) -> list[str] | str:
    if options.feedforward_modules is not None:
        return options.feedforward_modules
    targets = adapter.resolved_target_modules
    if isinstance(targets, str):
        raise UserError("required for IA³ when target_modules is a pattern", key="adapter.feedforward_modules")
    return [name for name in targets if name in _LLAMA_FEEDFORWARD]


def adalora_init_r(adapter: MonteCLoRAConfig, options: MethodOptions) -> int:
    return options.init_r if options.init_r is not None else round(1.5 * adapter.r)


def peft_config(method: str, adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> PeftConfig:
    """The peft config of a peft method (not `full`, not `monteclora`).

    AdaLoRA's `total_step` is a placeholder the trainer replaces with the run's step count
    before the first step (`MonteCLoRATrainer`); peft refuses a config without one.
    """
    targets = adapter.resolved_target_modules
    if method in ("lora", "loraplus"):
        return lora_config(adapter)
    if method == "dora":
        return dataclasses.replace(lora_config(adapter), use_dora=True)
    if method == "adalora":
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            target_modules=targets,
            modules_to_save=adapter.modules_to_save,
            init_r=adalora_init_r(adapter, options),
            target_r=adapter.r,
            lora_alpha=adapter.lora_alpha,
            lora_dropout=adapter.lora_dropout,
            tinit=options.tinit,
            tfinal=options.tfinal,
            deltaT=options.deltaT,
            beta1=options.beta1,
            beta2=options.beta2,
            orth_reg_weight=options.orth_reg_weight,
            total_step=options.tinit + options.tfinal + 1,
        )
    if method == "ia3":
        return IA3Config(
            task_type="CAUSAL_LM",
            target_modules=targets,
            modules_to_save=adapter.modules_to_save,
            feedforward_modules=ia3_feedforward_modules(adapter, options),
        )
    if method in ("loha", "lokr"):
        lycoris = {
            "task_type": "CAUSAL_LM",
            "target_modules": targets,
            "modules_to_save": adapter.modules_to_save,
            "r": adapter.r,
            "alpha": adapter.lora_alpha,
            "rank_dropout": options.rank_dropout,
            "module_dropout": options.module_dropout,
        }
        if method == "loha":
            return LoHaConfig(**lycoris)
        return LoKrConfig(**lycoris, decompose_both=options.decompose_both, decompose_factor=options.decompose_factor)
    if method == "prompt_tuning":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=options.prompt_tuning_init,
            prompt_tuning_init_text=options.prompt_tuning_init_text,
            tokenizer_name_or_path=tokenizer_path if options.prompt_tuning_init == "TEXT" else None,
        )
    raise ValueError(f"{method!r} has no peft config")
