"""The record layouts (`data.format`): telling them apart by their columns, and converting them to
the forms TRL's SFTTrainer tokenizes itself (`text`, `messages`, `prompt`/`completion`).

Alpaca records (instruction / input / output) become prompt/completion pairs with the Stanford
Alpaca prompt, format "template" builds the prompt from any columns (e.g. GSM8k's question) and
ShareGPT `conversations` become chat `messages`.
"""

from __future__ import annotations

import string
from typing import Any

import datasets
from trl.data_utils import maybe_convert_to_chatml

from monte_ds.errors import UserError


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT speakers as chat roles
# Each format and the columns it needs ("messages" needs messages or conversations).
REQUIRED_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "messages": (),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "template": (),
}
FORMATS = ("auto", *REQUIRED_COLUMNS)  # `data.format`'s values; auto: `detect_format`


def detect_format(columns: list[str]) -> str:
    """The record layout from the column names."""
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if {"prompt", "completion"} <= set(columns):
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise UserError(
        f"cannot tell the format from the columns {columns}; expected instruction/input/output "
        "(alpaca), messages, prompt/completion or text (or set data.format)",
        key="data",
    )


def check_columns(columns: list[str], data_format: str, prompt_template: str | None, completion_column: str) -> None:
    """Refuse data that lacks a column the format (or the template) reads."""
    missing = [column for column in REQUIRED_COLUMNS[data_format] if column not in columns]
    if data_format == "messages" and not {"messages", "conversations"} & set(columns):
        missing = ["messages"]
    if missing:
        raise UserError(f"{data_format!r} needs the column(s) {missing}; the data has {columns}", key="data.format")
    if data_format == "template":
        absent = sorted((placeholders(prompt_template) | {completion_column}) - set(columns))
        if absent:
            raise UserError(f"no column(s) {absent} in the data (columns: {columns})", key="data.prompt_template")


def placeholders(template: str) -> set[str]:
    """The `{column}` names of a prompt template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def alpaca_to_prompt_completion(record: dict[str, Any]) -> dict[str, str]:
    context = (record.get("input") or "").strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return {
        "prompt": template.format(instruction=record["instruction"].strip(), input=context),
        "completion": record["output"],
    }


def template_to_prompt_completion(record: dict[str, Any], template: str, completion_column: str) -> dict[str, str]:
    return {"prompt": template.format(**record), "completion": record[completion_column]}


def sharegpt_to_messages(record: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """ShareGPT turns ({"from": "human" | "gpt" | ..., "value"}) as chat messages (role, content)."""
    turns = maybe_convert_to_chatml({"conversations": record["conversations"]})["messages"]
    return {
        "messages": [
            {"role": SHAREGPT_ROLES.get(turn["role"], turn["role"]), "content": turn["content"]} for turn in turns
        ]
    }


def convert(
    dataset: datasets.Dataset, data_format: str, prompt_template: str | None, completion_column: str
) -> datasets.Dataset:
    """Checked records of `data_format` in a form SFTTrainer reads (text, messages, prompt/completion)."""
    if data_format == "alpaca":
        return dataset.map(alpaca_to_prompt_completion, remove_columns=dataset.column_names)
    if data_format == "template":
        return dataset.map(
            template_to_prompt_completion,
            fn_kwargs={"template": prompt_template, "completion_column": completion_column},
            remove_columns=dataset.column_names,
        )
    if data_format == "messages" and "messages" not in dataset.column_names:
        return dataset.map(sharegpt_to_messages, remove_columns=["conversations"])
    return dataset


def dataset_texts(dataset: datasets.Dataset) -> list[str]:
    """Every string in the records (message contents included): a tokenizer's training corpus."""
    texts = []
    for record in dataset:
        for value in record.values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(
                    str(turn.get("content", turn.get("value", ""))) for turn in value if isinstance(turn, dict)
                )
    return texts
