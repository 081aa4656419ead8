"""The adapter options of the training methods: MonteCLoRAConfig's fields, and `MethodOptions`,
the comparison methods' own, under peft's names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError


MONTECLORA_FIELDS = frozenset(f.name for f in dataclasses.fields(MonteCLoRAConfig))
# MonteCLoRAConfig fields that only MonteCLoRA uses (the noise seed included).
MONTECLORA_ONLY = MONTECLORA_FIELDS & {
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
MONTECLORA_LORA_FIELDS = MONTECLORA_FIELDS - MONTECLORA_ONLY
# What every module-targeting peft adapter takes.
TARGETING = frozenset({"target_modules", "modules_to_save"})


def _option(default: Any, must_be: str = "", valid: Callable[[Any], bool] | None = None) -> Any:
    """A dataclass field carrying its rule: `valid(value)` holds, or the error says what it `must_be`."""
    return field(default=default, metadata={"must_be": must_be, "valid": valid} if valid is not None else {})


@dataclass(frozen=True)
class MethodOptions:
    """The comparison methods' options that MonteCLoRAConfig does not hold, under peft's names.

    AdaLoRA prunes from `init_r` (default 1.5 r, peft's 12 for r = 8) to an average rank of
    `r`, so that it ends with LoRA's budget; its `total_step` is the run's step count.
    LoRA+'s default ratio 16 is the LoRA+ paper's recommendation for decoder models.
    """

    init_r: int | None = _option(None, "null or >= 1", lambda value: value is None or value >= 1)
    tinit: int = _option(0, ">= 0", lambda value: value >= 0)
    tfinal: int = _option(0, ">= 0", lambda value: value >= 0)
    deltaT: int = _option(1, ">= 1", lambda value: value >= 1)
    beta1: float = _option(0.85, "in (0, 1)", lambda value: 0 < value < 1)
    beta2: float = _option(0.85, "in (0, 1)", lambda value: 0 < value < 1)
    orth_reg_weight: float = _option(0.5, ">= 0", lambda value: value >= 0)
    loraplus_lr_ratio: float = _option(16.0, "> 0", lambda value: value > 0)
    loraplus_lr_embedding: float = _option(1e-6, ">= 0", lambda value: value >= 0)
    feedforward_modules: list[str] | str | None = None
    rank_dropout: float = _option(0.0, "in [0, 1)", lambda value: 0 <= value < 1)
    module_dropout: float = _option(0.0, "in [0, 1)", lambda value: 0 <= value < 1)
    decompose_both: bool = False
    decompose_factor: int = _option(-1, "-1 or >= 1", lambda value: value == -1 or value >= 1)
    num_virtual_tokens: int = _option(20, ">= 1", lambda value: value >= 1)
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            valid = f.metadata.get("valid")
            if valid is not None and not valid(getattr(self, f.name)):
                raise InputError(f"must be {f.metadata['must_be']}, got {getattr(self, f.name)!r}", key=f.name)
        if (self.prompt_tuning_init == "TEXT") != bool(self.prompt_tuning_init_text):
            raise InputError(
                f"must be set exactly when prompt_tuning_init is 'TEXT', got {self.prompt_tuning_init_text!r}",
                key="prompt_tuning_init_text",
            )


OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(MethodOptions))
