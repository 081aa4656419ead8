"""The evaluation options: the training config's `eval` section and `monte-ds eval`'s flags.

`EvalOptions` is the single source of the accepted keys, their types, bounds and defaults:
`evaluate(**options)` validates with it, `monte-ds eval` derives its flags from it, and the
training config schema embeds `EvalOptions.json_schema()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monte_ds import schema
from monte_ds.schema import option


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; the defaults reproduce lm-eval's stock settings."""

    suites: list[str] = option(
        [], "suites (gsm8k, humaneval, commonsense) or individual task names; empty: no evaluation"
    )
    data_dir: str | None = option(
        None,
        "offline data: <data_dir>/<task>/<split>.jsonl (docs/evaluation.md), or bundled:eval for the sample "
        "shipped with monte-ds; unset: the hub datasets",
    )
    limit: int | None = option(None, "evaluate only the first N documents of each task (smoke tests)", minimum=1)
    num_fewshot: int | None = option(None, "few-shot examples per prompt; unset: each task's default", minimum=0)
    batch_size: int = option(8, "lm-eval batch size", minimum=1)
    apply_chat_template: bool = option(False, "format prompts with the tokenizer's chat template")
    allow_code_execution: bool = option(
        False, "run model-generated code against HumanEval's tests (required for humaneval)"
    )
    humaneval_samples: int = option(4, "sampled completions per HumanEval problem (n of pass@k)", minimum=1)
    humaneval_temperature: float = option(
        0.8,
        "HumanEval sampling temperature (top-p 0.95); 0: greedy decoding, one completion per problem (pass@1)",
        minimum=0,
    )
    max_gen_toks: int | None = option(
        None, "generation length cap; unset: each task's default (either is fitted to the model's context)", minimum=1
    )
    predictive_samples: int = option(
        0, "K posterior draws of a MonteCLoRA adapter averaged on the multiple-choice tasks; 0: off", minimum=0
    )
    seed: int = option(1234, "seed of lm-eval's python/numpy/torch RNGs and few-shot sampling", minimum=0)

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> EvalOptions:
        """Validate `options` (unknown keys, types, bounds); a `UserError` names the option's key."""
        schema.validate(dict(options), cls.json_schema())
        return cls(**options)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON schema of the options object, with defaults, for config validation and docs."""
        return schema.dataclass_schema(cls, documented=True)
