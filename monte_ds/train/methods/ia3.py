"""IA³: learned rescaling vectors on the targeted modules' activations."""

from __future__ import annotations

from peft import IA3Config

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import UserError
from monte_ds.train.methods.options import TARGETING, MethodOptions
from monte_ds.train.methods.record import Method


# The default feed-forward modules: LLaMA's MLP projections among the targets.
_LLAMA_FEEDFORWARD = ("gate_proj", "up_proj", "down_proj")


def ia3_feedforward_modules(adapter: MonteCLoRAConfig, options: MethodOptions) -> list[str] | str:
    if options.feedforward_modules is not None:
        return options.feedforward_modules
    targets = adapter.resolved_target_modules
    if isinstance(targets, str):
        raise UserError("required for IA³ when target_modules is a pattern", key="adapter.feedforward_modules")
    return [name for name in targets if name in _LLAMA_FEEDFORWARD]


def _peft_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> IA3Config:
    return IA3Config(
        task_type="CAUSAL_LM",
        target_modules=adapter.resolved_target_modules,
        modules_to_save=adapter.modules_to_save,
        feedforward_modules=ia3_feedforward_modules(adapter, options),
    )


def _check_options(adapter: MonteCLoRAConfig, options: MethodOptions) -> None:
    ia3_feedforward_modules(adapter, options)  # a string target pattern needs explicit feed-forward modules


IA3 = Method(
    name="ia3",
    accepts=TARGETING | {"feedforward_modules"},
    output=run_folder.PEFT_ADAPTER_DIR,
    peft_config=_peft_config,
    check_options=_check_options,
)
