"""Generation limits that fit the model's context, settled before anything is generated.

lm-eval generates up to a task's `max_gen_toks` after a prompt left-truncated to
`context - max_gen_toks` tokens, and stops with an assertion when `max_gen_toks` is not
below the context (HumanEval's 1024 on a 512-token model). Here each generation task's
limit is chosen so that every evaluated document's own prompt (zero-shot: the problem or
question itself) stays whole: the generation gets the task's length (or the
`max_gen_toks` cap) when it fits, else what the longest such prompt leaves of the context.
Few-shot examples, ahead of the question, are what lm-eval cuts when a prompt is longer.
A task where a document's own prompt leaves no room to generate cannot run on the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM

from monte_ds.evaluation.options import EvalOptions


@dataclass(frozen=True)
class GenerationLimit:
    """What one generation task was run with, for the report."""

    context_length: int  # the model's, as lm-eval resolves it
    requested_max_gen_toks: int  # the task's length, or the max_gen_toks option
    max_gen_toks: int  # what was used
    longest_prompt: int  # tokens of the longest evaluated document's own prompt

    @property
    def max_prompt_tokens(self) -> int:
        """Longer prompts are left-truncated to this by lm-eval (few-shot examples go first)."""
        return self.context_length - self.max_gen_toks

    def as_dict(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length,
            "requested_max_gen_toks": self.requested_max_gen_toks,
            "max_gen_toks": self.max_gen_toks,
            "derived": self.max_gen_toks != self.requested_max_gen_toks,
            "max_prompt_tokens": self.max_prompt_tokens,
            "longest_prompt_tokens": self.longest_prompt,
        }


def requested_max_gen_toks(tasks: dict[str, Task], opts: EvalOptions) -> dict[str, int]:
    """Per generation task, the length it asks for: the `max_gen_toks` option, else the task's own.

    Read once, from the tasks as loaded: `apply_limits` later writes the fitted length into them.
    """
    return {
        name: opts.max_gen_toks or task.config.generation_kwargs["max_gen_toks"]
        for name, task in tasks.items()
        if task.OUTPUT_TYPE == "generate_until"
    }


def generation_limits(
    tasks: dict[str, Task], requested: dict[str, int], lm: HFLM, opts: EvalOptions
) -> tuple[dict[str, GenerationLimit], dict[str, str]]:
    """Per generation task, the limit that fits `lm`'s context; and per task that cannot run, why."""
    context = lm.max_length
    limits, unfit = {}, {}
    for name, wanted in requested.items():
        longest = max(prompt_tokens(lm, prompt) for prompt in own_prompts(tasks[name], lm, opts))
        if longest >= context:
            unfit[name] = (
                f"{name}: cannot run on this model: a prompt of {longest} tokens leaves nothing to generate "
                f"in its {context}-token context"
            )
            continue
        limits[name] = GenerationLimit(context, wanted, min(wanted, context - longest), longest)
    return limits, unfit


def apply_limits(tasks: dict[str, Task], limits: dict[str, GenerationLimit]) -> None:
    """Set each task's `max_gen_toks` to its limit (lm-eval reads it from the task config)."""
    for name, limit in limits.items():
        tasks[name].set_config(key="generation_kwargs", value={"max_gen_toks": limit.max_gen_toks}, update=True)


def truncated_prompts(samples: Iterable[dict[str, Any]], lm: HFLM, limit: GenerationLimit) -> int:
    """How many of a task's documents had their prompt (with its few-shot examples) left-truncated
    by lm-eval. lm-eval logs a sample per document and filter: each document counts once."""
    return len(
        {
            sample["doc_id"]
            for sample in samples
            if prompt_tokens(lm, sample["arguments"][0][0]) > limit.max_prompt_tokens
        }
    )


def own_prompts(task: Task, lm: HFLM, opts: EvalOptions) -> Iterable[str]:
    """The evaluated documents' prompts without few-shot examples, as lm-eval renders them."""
    for _, doc in task.doc_iterator(limit=opts.limit):
        yield task.fewshot_context(
            doc,
            num_fewshot=0,
            apply_chat_template=opts.apply_chat_template,
            fewshot_as_multiturn=opts.apply_chat_template,
            chat_template=lm.apply_chat_template if opts.apply_chat_template else None,
            gen_prefix=task.doc_to_prefix(doc),
        )


def prompt_tokens(lm: HFLM, prompt: str) -> int:
    return len(lm.tok_encode(prompt))
