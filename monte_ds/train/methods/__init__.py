"""The fine-tuning methods `adapter.method` names, one `Method` record each, registered here.

MonteCLoRA and the paper's comparison set (full fine-tuning, LoRA, DoRA, AdaLoRA, IA³, LoRA+,
prompt tuning, and LoHa/LoKr from the same LyCORIS family as IA³) share one pipeline; a method's
record (its module here) is the one place that says how it differs: the options it takes, its
adapter, where its output goes and how it is saved, the setups it refuses and its trainer hooks.
Adding a method is adding a record to `REGISTRY`. Every adapter but MonteCLoRA's comes from peft;
`full` has none.

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
from typing import Any

from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError, UserError
from monte_ds.train.methods.adalora import ADALORA
from monte_ds.train.methods.full import FULL
from monte_ds.train.methods.ia3 import IA3
from monte_ds.train.methods.lora import DORA, LORA
from monte_ds.train.methods.loraplus import LORAPLUS
from monte_ds.train.methods.lycoris import LOHA, LOKR
from monte_ds.train.methods.monteclora import MONTECLORA
from monte_ds.train.methods.options import MONTECLORA_LORA_FIELDS, MONTECLORA_ONLY, OPTION_FIELDS, MethodOptions
from monte_ds.train.methods.prompt_tuning import PROMPT_TUNING
from monte_ds.train.methods.record import Method, Setup, TrainerHooks


__all__ = [
    "ACCEPTED",
    "METHODS",
    "MONTECLORA",
    "MONTECLORA_LORA_FIELDS",
    "MONTECLORA_ONLY",
    "OPTION_FIELDS",
    "REGISTRY",
    "Method",
    "MethodOptions",
    "TrainerHooks",
    "check_method_options",
    "check_method_setup",
    "method_options",
    "resolved_options",
]

logger = logging.getLogger(__name__)

REGISTRY: dict[str, Method] = {
    method.name: method for method in (MONTECLORA, FULL, LORA, DORA, ADALORA, IA3, LOHA, LOKR, LORAPLUS, PROMPT_TUNING)
}
METHODS = tuple(REGISTRY)
# The adapter options each method takes.
ACCEPTED: dict[str, frozenset[str]] = {name: method.accepts for name, method in REGISTRY.items()}


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
    check = REGISTRY[method].check_options
    if check is not None:
        check(adapter, options)
    return options


def check_method_setup(method: str, quantized: bool, zero_stage: int | None, fsdp: bool) -> None:
    """What a method cannot do with the rest of the config, refused before anything runs."""
    REGISTRY[method].check_setup(Setup(quantized, zero_stage, fsdp))


def resolved_options(method: str, adapter: MonteCLoRAConfig, options: MethodOptions) -> dict[str, Any]:
    """The adapter section as it applies to `method` (what the run's config.json records)."""
    values = adapter.to_dict() | dataclasses.asdict(options)
    return {key: values[key] for key in sorted(ACCEPTED[method])}
