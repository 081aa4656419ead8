"""Prompt tuning: learned virtual tokens before the input, no module of the model adapted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import PromptTuningConfig

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.train.methods.options import MethodOptions
from monte_ds.train.methods.record import Method, Refusal, TrainerHooks


if TYPE_CHECKING:
    from monte_ds.train.trainer import MonteCLoRATrainer


def _peft_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> PromptTuningConfig:
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=options.num_virtual_tokens,
        prompt_tuning_init=options.prompt_tuning_init,
        prompt_tuning_init_text=options.prompt_tuning_init_text,
        tokenizer_name_or_path=tokenizer_path if options.prompt_tuning_init == "TEXT" else None,
    )


class PromptTuningHooks(TrainerHooks):
    def after_save(self, trainer: MonteCLoRATrainer) -> None:
        if not trainer.args.should_save and trainer.is_deepspeed_enabled:
            # peft's save_pretrained runs the prompt encoder on the saving rank only. Under ZeRO-3
            # that forward changes the rank's module trace, and the ranks' next forwards then run
            # different collectives (a hang): every other rank runs the same forward.
            model = trainer.accelerator.unwrap_model(trainer.model)
            with torch.no_grad():
                model.get_prompt_embedding_to_save(model.active_adapter)


PROMPT_TUNING = Method(
    name="prompt_tuning",
    accepts=frozenset({"num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"}),
    output=run_folder.PEFT_ADAPTER_DIR,
    peft_config=_peft_config,
    refusals=(
        Refusal(
            lambda setup: setup.fsdp,
            "distributed.fsdp",
            "peft saves prompt tuning by running its prompt encoder on the saving rank alone, outside the "
            "forward where FSDP2 gathers it; use DeepSpeed ZeRO-2 or ZeRO-3",
        ),
    ),
    hooks=lambda options: PromptTuningHooks(),
)
