"""Training data: load a local file, a saved dataset, a hub dataset or a bundled file, check every
row, and put it in one of the forms TRL's SFTTrainer tokenizes itself (`text`, `messages`,
`prompt`/`completion`).

Alpaca records (instruction / input / output) become prompt/completion pairs with the Stanford
Alpaca prompt, format "template" builds the prompt from any columns (e.g. GSM8k's question) and
ShareGPT `conversations` become chat `messages`: `training.completion_only_loss` (TRL's default for
prompt/completion pairs) then trains on the response only.

Every problem is a `UserError` naming the file, the row (`line N` of a JSON-lines file, else `row
N`) and the problem, raised before anything is written. With `data.on_bad_rows: "skip"` bad rows are
dropped instead, with a warning saying how many and which.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import huggingface_hub
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import common_prefix_length, is_conversational, maybe_convert_to_chatml

from monte_ds.errors import UserError, first_line


if TYPE_CHECKING:
    from monte_ds.train.config import DataSection

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
# Local files by extension -> the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
DATA_SUFFIXES = tuple(BUILDERS)
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")  # empty when they hold only whitespace
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json")  # what `save_to_disk` leaves in a folder
ON_BAD_ROWS = ("error", "skip")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT speakers as chat roles
LISTED_BAD_ROWS = 20  # a skip warning names this many rows, then counts the rest
CHECK_BATCH_ROWS = 1024
TOKEN_CHECK_BATCH_ROWS = 64  # the token check tokenizes this many rows per batched call

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


Rows = datasets.Dataset | list[dict[str, Any]]  # a dataset, or the exact records of a JSON file parsed here


@dataclass(frozen=True)
class Source:
    """Where a dataset's rows come from, to name them in messages: `line N` of a JSON-lines file
    (the builder skips blank lines, so row i is the i-th non-blank line), else `row N`."""

    name: str
    json_lines: Path | None = None
    lines: tuple[int, ...] | None = None  # the rows' line numbers, when some lines were dropped
    kept: tuple[int, ...] | None = None  # after bad rows were skipped: each row's index before

    def where(self, indices: Sequence[int]) -> list[str]:
        if self.kept is not None:
            indices = [self.kept[index] for index in indices]
        if self.lines is not None:
            return [f"line {self.lines[index]}" for index in indices]
        if self.json_lines is None:
            return [f"row {index + 1}" for index in indices]
        wanted, found, row = set(indices), {}, -1
        with self.json_lines.open(encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, 1):  # only on the error path: one pass, stops early
                if line.strip():
                    row += 1
                    if row in wanted:
                        found[row] = number
                        if len(found) == len(wanted):
                            break
        return [f"line {found[index]}" for index in indices]

    def keeping(self, rows: Sequence[int]) -> Source:
        """The source of `dataset.select(rows)`."""
        return replace(self, kept=tuple(self.kept[row] for row in rows) if self.kept is not None else tuple(rows))


def bundled_path(path: str) -> Path:
    """`bundled:NAME` -> the file NAME shipped in `monte_ds/data/` (works from any directory)."""
    name = path.removeprefix(BUNDLED_PREFIX)
    located = Path(str(resources.files("monte_ds") / "data" / name))
    if not name or not located.is_file():
        available = sorted(p.name for p in located.parent.iterdir() if p.is_file()) if located.parent.is_dir() else []
        raise UserError(f"no bundled file {name!r} (bundled: {', '.join(available) or 'none'})", key="data.path")
    return located


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars or error logs on stderr while loading and checking: the
    problems are reported here, and an error must stay one line."""
    was_disabled, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def training_dataset(data: DataSection) -> tuple[datasets.Dataset, Source]:
    """The `data` section's rows, checked (bad rows raise or are skipped, per `on_bad_rows`) and converted."""
    with quiet_datasets():
        dataset, source = load_source(data.path, data.split, data.subset, data.on_bad_rows)
        options = (data.format, data.max_samples, data.prompt_template, data.completion_column, data.on_bad_rows)
        return _prepare(dataset, source, *options)


def load_training_data(path: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """One split of a local file, a `save_to_disk` folder, a bundled file or a hub dataset."""
    rows = load_source(path, split, subset)[0]
    return rows if isinstance(rows, datasets.Dataset) else _to_dataset(rows, path)


def load_source(
    path: str, split: str = "train", subset: str | None = None, on_bad_rows: str = "error"
) -> tuple[Rows, Source]:
    """The rows behind `path` and how to name them; unreadable input is a `UserError` here."""
    if path.startswith(BUNDLED_PREFIX):
        return _load_file(bundled_path(path), path, on_bad_rows)
    local = Path(path).expanduser()
    if local.is_file():
        return _load_file(local, path, on_bad_rows)
    try:
        if local.is_dir():
            if not any((local / name).is_file() for name in SAVED_DATASET_FILES):
                raise UserError(
                    f"{path} is a directory but not a saved dataset ({' or '.join(SAVED_DATASET_FILES)}); "
                    f"point data.path at a data file ({', '.join(BUILDERS)})",
                    key="data.path",
                )
            saved = datasets.load_from_disk(str(local))
            return (saved[split] if isinstance(saved, datasets.DatasetDict) else saved), Source(path)
        return datasets.load_dataset(path, name=subset, split=split), Source(f"{path} (split {split})")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError) as err:
        if not local.exists() and huggingface_hub.is_offline_mode():
            raise UserError(
                f"{path!r} is not a local file or folder, and the hub is offline (HF_HUB_OFFLINE=1) "
                "with no cached copy of it",
                key="data.path",
            ) from None
        raise UserError(f"cannot load {path!r}: {first_line(err)}", key="data.path") from None


def _load_file(local: Path, name: str, on_bad_rows: str) -> tuple[Rows, Source]:
    if local.suffix not in BUILDERS:
        raise UserError(f"unsupported file type {local.suffix!r} (use {', '.join(BUILDERS)})", key="data.path")
    if _is_empty(local):
        raise UserError(f"{name} is empty", key="data")
    json_lines = _is_json_lines(local)
    try:
        dataset = datasets.load_dataset(BUILDERS[local.suffix], data_files=str(local), split="train")
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if local.suffix not in (".json", ".jsonl"):
            raise UserError(f"cannot read {name}: {first_line(err)}", key="data") from None
        return _parse_json(local, name, json_lines, on_bad_rows)  # the builder does not say which line
    except OSError as err:
        raise UserError(f"cannot read {name}: {first_line(err)}", key="data") from None
    if any(isinstance(feature, datasets.Json) for feature in dataset.features.values()):
        # A column of mixed types: the builder keeps it as JSON text and decodes the string "5"
        # as the number 5, so only the file itself says which values are strings.
        return _parse_json(local, name, json_lines, on_bad_rows)
    return dataset, Source(name, json_lines=local if json_lines else None)


def _first_byte(path: Path) -> bytes:
    """The file's first non-whitespace byte (b"" for none): reads as far as the first non-blank chunk."""
    with path.open("rb") as file:
        while chunk := file.read(1 << 16):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def _is_empty(path: Path) -> bool:
    return path.stat().st_size == 0 if path.suffix not in TEXT_SUFFIXES else not _first_byte(path)


def _is_json_lines(path: Path) -> bool:
    """A `.jsonl` file, or a `.json` one that is not one JSON array."""
    return path.suffix == ".jsonl" or (path.suffix == ".json" and _first_byte(path) != b"[")


def _parse_json(path: Path, name: str, json_lines: bool, on_bad_rows: str) -> tuple[list[dict[str, Any]], Source]:
    """The records of a JSON file the builder refused or read inexactly, parsed here to name the
    bad lines (and skip them if asked)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not json_lines:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{name} line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})", key="data"
            ) from None
        entries = list(enumerate(document, 1)) if isinstance(document, list) else [(1, document)]
        where = "row"
    else:
        entries, where = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    entries.append((number, err))
    records, numbers, bad = [], [], []
    for number, entry in entries:
        if isinstance(entry, json.JSONDecodeError):
            bad.append((f"{where} {number}", f"not valid JSON ({entry.msg}, column {entry.colno})"))
        elif not isinstance(entry, dict):
            bad.append((f"{where} {number}", f"not a JSON object ({_json_kind(entry)})"))
        else:
            records.append(entry)
            numbers.append(number)
    _report_bad_rows(name, bad, len(entries), on_bad_rows)
    return records, Source(name, lines=tuple(numbers) if json_lines else None)


def _to_dataset(records: list[dict[str, Any]], name: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(records, on_mixed_types="use_json")
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot read {name}: {first_line(err)}", key="data") from None


def _columns(rows: Rows) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return rows.column_names
    return list(dict.fromkeys(key for record in rows for key in record))


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
    return {
        "prompt": template.format(instruction=record["instruction"].strip(), input=context),
        "completion": record["output"],
    }


def placeholders(template: str) -> set[str]:
    """The `{column}` names of a prompt template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


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


def prepare_dataset(
    dataset: datasets.Dataset,
    data_format: str = "auto",
    max_samples: int | None = None,
    prompt_template: str | None = None,
    completion_column: str = "completion",
    on_bad_rows: str = "error",
) -> datasets.Dataset:
    """Select the first `max_samples` records, check them and convert them to a form SFTTrainer reads."""
    args = (data_format, max_samples, prompt_template, completion_column, on_bad_rows)
    return _prepare(dataset, Source("the dataset"), *args)[0]


def _prepare(
    rows: Rows,
    source: Source,
    data_format: str,
    max_samples: int | None,
    prompt_template: str | None,
    completion_column: str,
    on_bad_rows: str,
) -> tuple[datasets.Dataset, Source]:
    if max_samples is not None:
        if isinstance(rows, datasets.Dataset):
            rows = rows.select(range(min(max_samples, len(rows))))
        else:
            rows = rows[:max_samples]
    if len(rows) == 0:
        raise UserError(f"{source.name} has no rows", key="data")
    columns = _columns(rows)
    data_format = detect_format(columns) if data_format == "auto" else data_format
    missing = [column for column in REQUIRED_COLUMNS[data_format] if column not in columns]
    if data_format == "messages" and not {"messages", "conversations"} & set(columns):
        missing = ["messages"]
    if missing:
        raise UserError(f"{data_format!r} needs the column(s) {missing}; the data has {columns}", key="data.format")
    if data_format == "template":
        absent = sorted((placeholders(prompt_template) | {completion_column}) - set(columns))
        if absent:
            raise UserError(f"no column(s) {absent} in the data (columns: {columns})", key="data.prompt_template")
    checks = _field_checks(columns, data_format, prompt_template, completion_column)
    dataset, source = _without_bad_rows(rows, checks, source, on_bad_rows)
    if data_format == "alpaca":
        dataset = dataset.map(alpaca_to_prompt_completion, remove_columns=dataset.column_names)
    elif data_format == "template":
        dataset = dataset.map(
            template_to_prompt_completion,
            fn_kwargs={"template": prompt_template, "completion_column": completion_column},
            remove_columns=dataset.column_names,
        )
    elif data_format == "messages" and "messages" not in dataset.column_names:
        dataset = dataset.map(sharegpt_to_messages, remove_columns=["conversations"])
    return dataset, source


# -- row checks ----------------------------------------------------------------------------------------
Check = Callable[[Any], "str | None"]  # a field's value -> its problem, or None when it is fine


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _string(value: Any) -> str | None:
    if value is None:
        return "is missing or null"
    return None if isinstance(value, str) else f"is {_json_kind(value)}, not a string"


def _optional_string(value: Any) -> str | None:
    return None if value is None else _string(value)


def _present(value: Any) -> str | None:
    return "is missing or null" if value is None else None


def _conversation(roles: Sequence[str]) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return "is missing or null"
        if not isinstance(value, list):
            return f"is {_json_kind(value)}, not a list of messages"
        if not value:
            return "is an empty conversation"
        for number, message in enumerate(value, 1):
            if not isinstance(message, dict):
                return f"message {number} is {_json_kind(message)}, not an object"
            role = message.get("role", message.get("from"))
            content = message.get("content", message.get("value"))
            if role not in roles:
                which = "no role" if role is None else f"the unknown role {role!r}"
                return f"message {number} has {which} (known: {', '.join(roles)})"
            if not isinstance(content, str):
                return f"message {number} content {_string(content)}"
        return None

    return check


def _text_or_conversation(value: Any) -> str | None:
    return _conversation(CHAT_ROLES)(value) if isinstance(value, list) else _string(value)


def _field_checks(
    columns: list[str], data_format: str, prompt_template: str | None, completion_column: str
) -> dict[str, Check]:
    """The check of each column a format reads."""
    if data_format == "alpaca":
        checks = {"instruction": _string, "output": _string}
        return checks | ({"input": _optional_string} if "input" in columns else {})
    if data_format == "prompt_completion":
        return {"prompt": _text_or_conversation, "completion": _text_or_conversation}
    if data_format == "text":
        return {"text": _string}
    if data_format == "messages":
        if "messages" in columns:
            return {"messages": _conversation(CHAT_ROLES)}
        return {"conversations": _conversation((*CHAT_ROLES, *SHAREGPT_ROLES))}
    fields = placeholders(prompt_template) - {completion_column}
    return {name: _present for name in sorted(fields)} | {completion_column: _string}


def _needs_row_checks(dataset: datasets.Dataset, column: str, check: Check) -> bool:
    """False when the column's type and null count already prove every value passes (the usual
    case: then checking costs nothing)."""
    feature = dataset.features[column]
    is_string = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    has_nulls = dataset.data.column(column).null_count > 0
    if check is _present or (is_string and check in (_string, _text_or_conversation)):
        return has_nulls
    return not (is_string and check is _optional_string)


def _values(rows: Rows, columns: list[str]) -> Iterator[tuple[Any, ...]]:
    """Each row's values of `columns`, in order (a dataset is read in column batches)."""
    if isinstance(rows, list):
        yield from (tuple(record.get(column) for column in columns) for record in rows)
        return
    for batch in rows.select_columns(columns).iter(batch_size=CHECK_BATCH_ROWS):
        yield from zip(*(batch[column] for column in columns))


def _without_bad_rows(
    rows: Rows, checks: dict[str, Check], source: Source, on_bad_rows: str
) -> tuple[datasets.Dataset, Source]:
    """Raise on the first bad row (counting them all), or drop the bad rows with a warning."""
    if isinstance(rows, datasets.Dataset):
        checks = {column: check for column, check in checks.items() if _needs_row_checks(rows, column, check)}
    bad: list[tuple[int, str]] = []
    for index, values in enumerate(_values(rows, list(checks)) if checks else ()):
        for (column, check), value in zip(checks.items(), values):
            if (problem := check(value)) is not None:
                bad.append((index, f"{column!r} {problem}"))
                break
    if not bad:
        return (rows if isinstance(rows, datasets.Dataset) else _to_dataset(rows, source.name)), source
    shown = bad[:1] if on_bad_rows == "error" else bad[:LISTED_BAD_ROWS]
    located = list(zip(source.where([row for row, _ in shown]), (problem for _, problem in shown)))
    _report_bad_rows(source.name, located, len(rows), on_bad_rows, len(bad))
    skipped = {row for row, _ in bad}
    kept = [row for row in range(len(rows)) if row not in skipped]
    if isinstance(rows, datasets.Dataset):
        return rows.select(kept), source.keeping(kept)
    return _to_dataset([rows[row] for row in kept], source.name), source.keeping(kept)


def _report_bad_rows(
    name: str, bad: list[tuple[str, str]], total: int, on_bad_rows: str, count: int | None = None
) -> None:
    """`bad` holds (where, problem) of the first bad rows; `count` of them all (default len(bad))."""
    count = len(bad) if count is None else count
    if not count:
        return
    where, problem = bad[0]
    if on_bad_rows == "error":
        raise UserError(
            f"{name} {where}: {problem} ({count} of {total} rows bad; "
            'set data.on_bad_rows="skip" to train without them)',
            key="data",
        )
    if count == total:
        raise UserError(f"every row of {name} is bad, nothing to train on ({where}: {problem})", key="data")
    listed = ", ".join(f"{where} ({problem})" for where, problem in bad[:LISTED_BAD_ROWS])
    more = f" and {count - LISTED_BAD_ROWS} more" if count > LISTED_BAD_ROWS else ""
    logger.warning("data: skipping %d of %d rows of %s: %s%s", count, total, name, listed, more)


# -- trainable tokens ----------------------------------------------------------------------------------
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
