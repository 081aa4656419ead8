"""Where training rows come from: a local file, a saved dataset, a hub dataset or a bundled file;
and the `data` section (`DataSection`), loaded, checked and converted by `training_dataset`.

Unreadable input is a `UserError` here, raised before anything is written; a JSON file the
`datasets` builder refuses is parsed here, to name its bad lines (and skip them if asked).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import datasets
import huggingface_hub

from monte_ds.errors import UserError, first_line
from monte_ds.schema import option
from monte_ds.train.data import formats, rows
from monte_ds.train.data.rows import Rows, Source


BUNDLED_PREFIX = "bundled:"
# Local files by extension -> the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
DATA_SUFFIXES = tuple(BUILDERS)
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")  # empty when they hold only whitespace
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json")  # what `save_to_disk` leaves in a folder


@dataclass(frozen=True)
class DataSection:
    path: str = option(minLength=1)
    format: Literal[formats.FORMATS] = "auto"
    split: str = option("train", minLength=1)
    subset: str | None = None
    max_samples: int | None = option(None, minimum=1)
    prompt_template: str | None = None  # format "template": the prompt, with {column} placeholders
    completion_column: str = option("completion", minLength=1)  # format "template": the column trained on
    # "skip": drop rows that fail the checks, with a warning naming them.
    on_bad_rows: Literal[rows.ON_BAD_ROWS] = "error"
    # The last `eval_size` rows are held out: the evaluation set of `training.eval_strategy`.
    eval_size: int | None = option(None, minimum=1)


def training_dataset(data: DataSection) -> tuple[datasets.Dataset, Source]:
    """The `data` section's rows, checked (bad rows raise or are skipped, per `on_bad_rows`) and converted."""
    with quiet_datasets():
        dataset, source = load_source(data.path, data.split, data.subset, data.on_bad_rows)
        options = (data.format, data.max_samples, data.prompt_template, data.completion_column, data.on_bad_rows)
        return _prepare(dataset, source, *options)


def split_eval(dataset: datasets.Dataset, eval_size: int | None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out evaluation rows): the last `eval_size` rows, the same on every rank
    and every resume, so an evaluation during training always scores the same examples."""
    if eval_size is None:
        return dataset, None
    if eval_size >= len(dataset):
        raise UserError(f"{eval_size} would hold out every row (the data has {len(dataset)})", key="data.eval_size")
    kept = len(dataset) - eval_size
    return dataset.select(range(kept)), dataset.select(range(kept, len(dataset)))


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
    records: Rows,
    source: Source,
    data_format: str,
    max_samples: int | None,
    prompt_template: str | None,
    completion_column: str,
    on_bad_rows: str,
) -> tuple[datasets.Dataset, Source]:
    if max_samples is not None:
        if isinstance(records, datasets.Dataset):
            records = records.select(range(min(max_samples, len(records))))
        else:
            records = records[:max_samples]
    if len(records) == 0:
        raise UserError(f"{source.name} has no rows", key="data")
    columns = rows.column_names(records)
    data_format = formats.detect_format(columns) if data_format == "auto" else data_format
    formats.check_columns(columns, data_format, prompt_template, completion_column)
    checks = rows.field_checks(columns, data_format, prompt_template, completion_column)
    dataset, source = rows.without_bad_rows(records, checks, source, on_bad_rows)
    return formats.convert(dataset, data_format, prompt_template, completion_column), source


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


def load_training_data(path: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """One split of a local file, a `save_to_disk` folder, a bundled file or a hub dataset."""
    records = load_source(path, split, subset)[0]
    return records if isinstance(records, datasets.Dataset) else rows.to_dataset(records, path)


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
            bad.append((f"{where} {number}", f"not a JSON object ({rows.json_kind(entry)})"))
        else:
            records.append(entry)
            numbers.append(number)
    rows.report_bad_rows(name, bad, len(entries), on_bad_rows)
    return records, Source(name, lines=tuple(numbers) if json_lines else None)
