"""The row checks: what each column a format reads must hold, and what happens to the rows that
fail (`data.on_bad_rows`).

Every problem is a `UserError` naming the file, the row (`line N` of a JSON-lines file, else `row
N`: `Source`) and the problem, raised before anything is written. With `on_bad_rows: "skip"` bad
rows are dropped instead, with a warning saying how many and which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets

from monte_ds.errors import UserError, first_line
from monte_ds.train.data.formats import SHAREGPT_ROLES, placeholders


logger = logging.getLogger(__name__)

ON_BAD_ROWS = ("error", "skip")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
LISTED_BAD_ROWS = 20  # a skip warning names this many rows, then counts the rest
CHECK_BATCH_ROWS = 1024

Rows = datasets.Dataset | list[dict[str, Any]]  # a dataset, or the exact records of a JSON file parsed here
Check = Callable[[Any], "str | None"]  # a field's value -> its problem, or None when it is fine


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


def to_dataset(records: list[dict[str, Any]], name: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(records, on_mixed_types="use_json")
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot read {name}: {first_line(err)}", key="data") from None


def column_names(rows: Rows) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return rows.column_names
    return list(dict.fromkeys(key for record in rows for key in record))


def json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _string(value: Any) -> str | None:
    if value is None:
        return "is missing or null"
    return None if isinstance(value, str) else f"is {json_kind(value)}, not a string"


def _optional_string(value: Any) -> str | None:
    return None if value is None else _string(value)


def _present(value: Any) -> str | None:
    return "is missing or null" if value is None else None


def _conversation(roles: Sequence[str]) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return "is missing or null"
        if not isinstance(value, list):
            return f"is {json_kind(value)}, not a list of messages"
        if not value:
            return "is an empty conversation"
        for number, message in enumerate(value, 1):
            if not isinstance(message, dict):
                return f"message {number} is {json_kind(message)}, not an object"
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


def field_checks(
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


def without_bad_rows(
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
        return (rows if isinstance(rows, datasets.Dataset) else to_dataset(rows, source.name)), source
    shown = bad[:1] if on_bad_rows == "error" else bad[:LISTED_BAD_ROWS]
    located = list(zip(source.where([row for row, _ in shown]), (problem for _, problem in shown)))
    report_bad_rows(source.name, located, len(rows), on_bad_rows, len(bad))
    skipped = {row for row, _ in bad}
    kept = [row for row in range(len(rows)) if row not in skipped]
    if isinstance(rows, datasets.Dataset):
        return rows.select(kept), source.keeping(kept)
    return to_dataset([rows[row] for row in kept], source.name), source.keeping(kept)


def report_bad_rows(
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
