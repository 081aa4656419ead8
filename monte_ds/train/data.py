"""Training data: load a local file, a saved dataset, a hub dataset or a bundled file, and put it
in one of the forms TRL's SFTTrainer tokenizes itself (`text`, `messages`, `prompt`/`completion`).

Alpaca records (instruction / input / output) become prompt/completion pairs with the Stanford
Alpaca prompt, and format "template" builds the prompt from any columns (e.g. GSM8k's question):
`training.completion_only_loss` (TRL's default for such pairs) then trains on the response only.
"""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from monte_ds.errors import UserError

BUNDLED_PREFIX = "bundled:"
# Local files by extension -> the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
DATA_SUFFIXES = tuple(BUILDERS)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def bundled_path(path: str) -> Path:
    """`bundled:NAME` -> the file NAME shipped in `monte_ds/data/` (works from any directory)."""
    name = path.removeprefix(BUNDLED_PREFIX)
    located = Path(str(resources.files("monte_ds") / "data" / name))
    if not name or not located.is_file():
        available = sorted(p.name for p in located.parent.iterdir() if p.is_file()) if located.parent.is_dir() else []
        raise UserError(f"data.path: no bundled file {name!r} (bundled: {', '.join(available) or 'none'})")
    return located


def load_training_data(path: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """One split of a local file, a `save_to_disk` folder, a data folder, a bundled file or a hub dataset."""
    try:
        if path.startswith(BUNDLED_PREFIX):
            return datasets.load_dataset("json", data_files=str(bundled_path(path)), split="train")
        local = Path(path).expanduser()
        if local.is_file():
            if local.suffix not in BUILDERS:
                raise UserError(f"data.path: unsupported file type {local.suffix!r} (use {', '.join(BUILDERS)})")
            return datasets.load_dataset(BUILDERS[local.suffix], data_files=str(local), split="train")
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(local))
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        return datasets.load_dataset(path, name=subset, split=split)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(f"data.path: cannot load {path!r}: {err}") from None


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
        f"data: cannot tell the format from the columns {columns}; expected instruction/input/output "
        "(alpaca), messages, prompt/completion or text (or set data.format)"
    )


REQUIRED_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "messages": (),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "template": (),
}


def alpaca_to_prompt_completion(record: dict[str, Any]) -> dict[str, str]:
    context = (record.get("input") or "").strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return {"prompt": template.format(instruction=record["instruction"].strip(), input=context), "completion": record["output"]}


def template_to_prompt_completion(record: dict[str, Any], template: str, completion_column: str) -> dict[str, str]:
    return {"prompt": template.format(**record), "completion": record[completion_column]}


def prepare_dataset(
    dataset: datasets.Dataset,
    data_format: str = "auto",
    max_samples: int | None = None,
    prompt_template: str | None = None,
    completion_column: str = "completion",
) -> datasets.Dataset:
    """Select the first `max_samples` records and convert them to a form SFTTrainer reads."""
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise UserError("data.path: the dataset is empty")
    data_format = detect_format(dataset.column_names) if data_format == "auto" else data_format
    missing = [column for column in REQUIRED_COLUMNS[data_format] if column not in dataset.column_names]
    if data_format == "messages" and not {"messages", "conversations"} & set(dataset.column_names):
        missing = ["messages"]
    if missing:
        raise UserError(f"data.format: {data_format!r} needs the column(s) {missing}; the data has {dataset.column_names}")
    if data_format == "alpaca":
        return dataset.map(alpaca_to_prompt_completion, remove_columns=dataset.column_names)
    if data_format == "template":
        placeholders = {name for _, name, _, _ in string.Formatter().parse(prompt_template) if name}
        absent = sorted((placeholders | {completion_column}) - set(dataset.column_names))
        if absent:
            raise UserError(f"data.prompt_template: no column(s) {absent} in the data (columns: {dataset.column_names})")
        return dataset.map(
            template_to_prompt_completion,
            fn_kwargs={"template": prompt_template, "completion_column": completion_column},
            remove_columns=dataset.column_names,
        )
    return dataset


def dataset_texts(dataset: datasets.Dataset) -> list[str]:
    """Every string in the records (message contents included): a tokenizer's training corpus."""
    texts = []
    for record in dataset:
        for value in record.values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(str(turn.get("content", turn.get("value", ""))) for turn in value if isinstance(turn, dict))
    return texts
