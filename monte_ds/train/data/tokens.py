"""The trainable-token check: refuse, before anything is written, data in which TRL would keep no
trainable token once it has templated, masked and truncated every row.

The tokenization and masking below re-implement TRL's because TRL 1.16 has no public function for
them (they are closures inside `SFTTrainer._prepare_dataset`, which only a whole trainer runs, and
their helper `trl.data_utils._tokenize` is private); `tests/test_bad_inputs.py` checks that the
counts here equal the labels of TRL's prepared dataset.
"""

from __future__ import annotations

from typing import Any

import datasets
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import common_prefix_length, is_conversational, maybe_convert_to_chatml

from monte_ds.errors import UserError, first_line
from monte_ds.train.data.rows import Source


TOKEN_CHECK_BATCH_ROWS = 64  # the token check tokenizes this many rows per batched call


def check_trainable_tokens(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, args: SFTConfig, source: Source
) -> None:
    """Refuse a dataset in which no row keeps a single trainable token once TRL has templated,
    masked and truncated it (TRL would drop every row and fail later, after writing). Rows are
    tokenized as TRL does, a batch at a time, stopping at the first batch with a row that keeps
    one: the first batch, usually."""
    completion_only = args.completion_only_loss
    if completion_only is None:  # TRL's default: completion-only for prompt/completion data
        completion_only = {"prompt", "completion"} <= set(dataset.column_names)
    chat_template = None
    if args.assistant_only_loss:
        if not is_conversational(maybe_convert_to_chatml(dict(dataset[0]))):
            raise UserError(
                "only applies to chat data (messages); this data is not", key="training.assistant_only_loss"
            )
        if not has_generation_markers(tokenizer.chat_template or ""):
            try:
                chat_template = get_training_chat_template(tokenizer)
            except ValueError as err:
                raise UserError(f"{first_line(err)}", key="training.assistant_only_loss") from None
    for start in range(0, len(dataset), TOKEN_CHECK_BATCH_ROWS):
        batch = dataset[start : start + TOKEN_CHECK_BATCH_ROWS]
        rows = [maybe_convert_to_chatml(dict(zip(batch, values))) for values in zip(*batch.values())]
        try:
            masks = _loss_masks(rows, tokenizer, args, completion_only, chat_template)
        except (ValueError, TypeError, TemplateError):
            raise _untemplatable(rows, start, tokenizer, args, completion_only, chat_template, source) from None
        if any(any(_truncated(mask, args)) for mask in masks):
            return
    if args.assistant_only_loss:
        reason = "training.assistant_only_loss is set but no assistant token survives"
    elif completion_only:
        reason = "the loss is on completions only and every prompt fills training.max_length"
    else:
        reason = "every sequence is empty"
    raise UserError(
        f"no row of {source.name} has a trainable token after templating and truncation to "
        f"training.max_length={args.max_length} ({reason}); raise training.max_length or shorten the prompts",
        key="data",
    )


def _truncated(mask: list[int], args: SFTConfig) -> list[int]:
    """What TRL's truncation to `max_length` keeps (packing chunks sequences instead)."""
    if args.max_length is None or args.packing:
        return mask
    return mask[-args.max_length :] if args.truncation_mode == "keep_end" else mask[: args.max_length]


def _untemplatable(
    rows: list[dict[str, Any]],
    start: int,
    tokenizer: PreTrainedTokenizerBase,
    args: SFTConfig,
    completion_only: bool,
    chat_template: str | None,
    source: Source,
) -> UserError:
    """The error naming the first row of a batch that fails to template (retried one by one)."""
    for offset, row in enumerate(rows):
        try:
            _loss_masks([row], tokenizer, args, completion_only, chat_template)
        except (ValueError, TypeError, TemplateError) as err:
            return UserError(
                f"{source.name} {source.where([start + offset])[0]}: cannot template it: {first_line(err)}", key="data"
            )
    return UserError(f"{source.name}: rows {start + 1}-{start + len(rows)} cannot be templated together", key="data")


def _loss_masks(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    args: SFTConfig,
    completion_only: bool,
    chat_template: str | None,
) -> list[list[int]]:
    """For each row (ChatML), 1 for each token of its training sequence that TRL's labels keep,
    before truncation: TRL's tokenization, batched (one batched call per kind of row)."""
    conversational = [is_conversational(row) for row in rows]
    if len(set(conversational)) > 1:
        return [mask for row in rows for mask in _loss_masks([row], tokenizer, args, completion_only, chat_template)]
    chat = {"tokenize": True, "return_dict": True, "chat_template": chat_template}
    assistant = {"return_assistant_tokens_mask": args.assistant_only_loss}

    def with_eos(text: str) -> str:
        return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token

    if "prompt" in rows[0]:
        prompts = [row["prompt"] for row in rows]
        if conversational[0]:
            prompt_ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, **chat)["input_ids"]
            full = tokenizer.apply_chat_template(
                [row["prompt"] + row["completion"] for row in rows], **assistant, **chat
            )
        else:
            prompt_ids = tokenizer(text=prompts)["input_ids"]
            full = tokenizer(text=[row["prompt"] + with_eos(row["completion"]) for row in rows])
        pairs = zip(prompt_ids, full["input_ids"])
        starts = [common_prefix_length(ids, all_ids) if completion_only else 0 for ids, all_ids in pairs]
    elif conversational[0]:
        full = tokenizer.apply_chat_template([row["messages"] for row in rows], **assistant, **chat)
        starts = [0] * len(rows)
    else:
        full = tokenizer(text=[with_eos(row[args.dataset_text_field]) for row in rows])
        starts = [0] * len(rows)
    masks = [[0] * start + [1] * (len(ids) - start) for start, ids in zip(starts, full["input_ids"])]
    if "assistant_masks" in full:
        masks = [[bit and kept for bit, kept in zip(mask, bits)] for mask, bits in zip(masks, full["assistant_masks"])]
    return masks
