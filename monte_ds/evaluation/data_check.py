"""Offline evaluation data (`data_dir`): every row of every task file is checked before lm-eval
loads it, so a bad file is one line naming the task, the file, the line and the problem (not an
lm-eval traceback, possibly hours into a run after training).

A row must be a JSON object holding every field the task's prompts read. Those fields come from
the task's YAML: the variables of its `doc_to_text` / `doc_to_target` / `doc_to_choice` templates
(a bare name is a column), or, for tasks whose prompts are lm-eval functions, `FUNCTION_FIELDS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, meta

from monte_ds.errors import UserError


PROMPT_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
# Tasks whose prompts lm-eval functions build (no template to read the fields from): what they read.
FUNCTION_FIELDS = {
    "winogrande": ("sentence", "option1", "option2", "answer"),  # lm_eval.tasks.winogrande.preprocess_winogrande
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),  # lm_eval.tasks.hellaswag.utils
}
_TEMPLATES = Environment()


def expected_fields(name: str, config: dict[str, Any]) -> tuple[str, ...] | None:
    """The fields a row of task `name` needs; None when its prompts are functions we cannot read."""
    if name in FUNCTION_FIELDS:
        return FUNCTION_FIELDS[name]
    if callable(config.get("process_docs")) or any(callable(config.get(key)) for key in PROMPT_KEYS):
        return None
    fields: dict[str, None] = {}
    for key in PROMPT_KEYS:
        value = config.get(key)
        if not isinstance(value, str):
            continue  # a fixed list of choices, or unset
        if "{{" in value or "{%" in value:
            fields.update(dict.fromkeys(sorted(meta.find_undeclared_variables(_TEMPLATES.parse(value)))))
        elif value.isidentifier():
            fields[value] = None  # lm-eval reads a bare name as the column of that name
    return tuple(fields)


def check_task_files(name: str, config: dict[str, Any]) -> None:
    """Check the offline files of task `name` (its config reads them through the json builder)."""
    fields = expected_fields(name, config)
    for path in config["dataset_kwargs"]["data_files"].values():
        check_task_file(name, Path(path), fields)


def check_task_file(name: str, path: Path, fields: tuple[str, ...] | None) -> None:
    """One JSON-lines file: a `UserError` for the first bad line (and how many there are)."""
    bad: list[str] = []
    rows = 0
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                rows += 1
                if (problem := _row_problem(line, name, fields)) is not None:
                    bad.append(f"line {number}: {problem}")
    if not rows:
        raise UserError(f"{name}: {path} is empty", key="data_dir")
    if bad:
        count = f" ({len(bad)} of {rows} rows bad)" if len(bad) > 1 else ""
        raise UserError(f"{name}: {path} {bad[0]}{count}", key="data_dir")


def _row_problem(line: str, name: str, fields: tuple[str, ...] | None) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg}, column {err.colno})"
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [field for field in fields or () if row.get(field) is None]
    if not missing:
        return None
    return (
        f"no {', '.join(repr(field) for field in missing)} (a {name} row has the fields {', '.join(fields)}; "
        f"this one has {', '.join(row) or 'none'})"
    )
