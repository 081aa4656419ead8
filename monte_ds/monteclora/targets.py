"""What an adapter config points at: its targets checked against the model, and the model's task type.

peft adapts whatever its patterns match and silently skips the rest, so `["q_proj", "v_prj"]`
adapts q_proj alone and a wrong `rank_pattern` key leaves its layers at `r`. Here every entry
must match: `check_targets` raises one `InputError` naming all the entries that match nothing,
before any layer is built. Matching is peft's own (`check_target_module_exists`,
`get_pattern_key`'s rule), so what passes here is what peft then adapts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from peft import PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.models.auto import modeling_auto

from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError


# transformers' auto classes per peft task type, most specific first (a seq2seq LM is also
# a causal LM's relative; a bare encoder/decoder is a feature extractor).
_TASK_TYPE_CLASSES = (
    ("SEQ_2_SEQ_LM", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    ("CAUSAL_LM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ("SEQ_CLS", modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    ("TOKEN_CLS", modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    ("QUESTION_ANS", modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
    ("FEATURE_EXTRACTION", modeling_auto.MODEL_MAPPING_NAMES),
)
# The LoraConfig fields peft's matcher reads.
_MATCH_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")


def infer_task_type(model: nn.Module) -> str | None:
    """The peft task type of a transformers model's class; None (a plain `PeftModel`, which
    forwards any arguments) for custom modules and classes transformers does not map."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    name = type(model).__name__
    for task_type, classes in _TASK_TYPE_CLASSES:
        for value in classes.values():
            if name == value or (isinstance(value, tuple) and name in value):
                return task_type
    return None


def module_names(model: nn.Module) -> list[str]:
    """The names peft matches targets against: the base model's, without a PeftModel's prefix."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return [name for name, _ in model.named_modules() if name]


def check_targets(model: nn.Module, config: MonteCLoRAConfig) -> None:
    """Raise one `InputError` naming every target entry of `config` that matches nothing in `model`."""
    problems = target_problems(module_names(model), config)
    if problems:
        raise InputError("; ".join(problems))


def target_problems(names: Sequence[str], config: MonteCLoRAConfig) -> list[str]:
    """One message per config field with entries that match none of `names` (empty: all match)."""
    targets = config.resolved_target_modules
    problems = []
    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, name) for name in names):
            problems.append(f"target_modules: the pattern {targets!r} matched no module")
        if config.layers_to_transform is not None:
            problems.append(
                "layers_to_transform: applies to a list of target_modules only (peft ignores it for a pattern)"
            )
    else:
        default = "" if config.target_modules is not None else " (the default: LLaMA's projections; set target_modules)"
        problems += _unmatched(
            "target_modules", targets, lambda entry: _selects(names, target_modules=[entry]), default
        )
        if config.layers_pattern is not None:
            patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
            problems += _unmatched(
                "layers_pattern",
                patterns,
                lambda pattern: any(re.match(rf"(?:^|.*?\.){pattern}\.\d+\.", name) for name in names),
            )
        if config.layers_to_transform is not None:
            indices = (
                [config.layers_to_transform]
                if isinstance(config.layers_to_transform, int)
                else config.layers_to_transform
            )
            problems += _unmatched(
                "layers_to_transform",
                indices,
                lambda index: _selects(
                    names, target_modules=targets, layers_to_transform=[index], layers_pattern=config.layers_pattern
                ),
                " (no targeted module in that layer)",
            )
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        if not any(re.fullmatch(exclude, name) for name in names):
            problems.append(f"exclude_modules: the pattern {exclude!r} matched no module")
    elif exclude:
        problems += _unmatched("exclude_modules", exclude, lambda entry: _selects(names, target_modules=[entry]))
    if config.modules_to_save:
        problems += _unmatched(
            "modules_to_save",
            config.modules_to_save,
            lambda entry: any(name == entry or name.endswith(f".{entry}") for name in names),
        )
    spec = _spec(**{**{field: getattr(config, field) for field in _MATCH_FIELDS}, "target_modules": targets})
    adapted = [name for name in names if check_target_module_exists(spec, name)]
    for field in ("rank_pattern", "alpha_pattern"):
        problems += _unmatched(
            field,
            getattr(config, field),
            lambda key: any(re.match(rf"(.*\.)?({key})$", name) for name in adapted),
            " (no adapted module)",
        )
    return problems


def _unmatched(field: str, entries: Sequence[Any], matches, note: str = "") -> list[str]:
    missing = [entry for entry in entries if not matches(entry)]
    if not missing:
        return []
    return [f"{field}: {', '.join(repr(entry) for entry in missing)} matched no module{note}"]


def _spec(**fields: Any) -> SimpleNamespace:
    """The LoraConfig attributes peft's matcher reads: `fields`, the rest unset."""
    return SimpleNamespace(**{**dict.fromkeys(_MATCH_FIELDS), "target_parameters": None, **fields})


def _selects(names: Sequence[str], **fields: Any) -> bool:
    """Whether peft's matcher, with only `fields` set, selects any of `names`."""
    spec = _spec(**fields)
    return any(check_target_module_exists(spec, name) for name in names)
