"""The evaluation tasks: lm-eval definitions in `evals/`, suites, and where their data comes from.

The task YAMLs are ours, not lm-eval's stock ones, so scores do not move when lm-eval
edits a prompt; they ship inside the package as `monte_ds.evals`, so an installed monte-ds can evaluate.
Online, each task reads its hub dataset; offline (`data_dir`), the same rows come from
`<data_dir>/<task>/<split>.jsonl` through lm-eval's `json` dataset path. `data_dir`
"bundled:eval" is the small sample shipped with the package (a few rows per task).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind
from lm_eval.tasks._yaml_loader import load_yaml

from monte_ds.errors import UserError, first_line
from monte_ds.evaluation import humaneval
from monte_ds.evaluation.data_check import check_task_files


logger = logging.getLogger(__name__)

EVALS_DIR = Path(str(resources.files("monte_ds.evals")))
BUNDLED_SAMPLE = "bundled:eval"
BUNDLED_SAMPLE_DIR = Path(str(resources.files("monte_ds") / "data" / "eval"))
# The order lm-eval falls back through when a task names no fewshot_split.
FEWSHOT_SPLIT_ORDER = ("fewshot_split", "training_split", "validation_split", "test_split")
DATA_LOAD_ERRORS = (
    OSError,
    ConnectionError,
    datasets.exceptions.DatasetNotFoundError,
    datasets.exceptions.DatasetGenerationError,
)


def task_manager() -> TaskManager:
    """An lm-eval TaskManager over monte-ds's tasks only: fast to index and immune to stock-task edits."""
    return TaskManager(include_path=str(EVALS_DIR), include_defaults=False)


def expand_suites(manager: TaskManager, suites: list[str]) -> dict[str, list[str]]:
    """Suite and task names -> each suite's task names, in order; a task runs once, in the
    first suite that names it (a suite left without tasks is dropped)."""
    if not suites:
        raise UserError("name at least one suite or task", key="suites")
    index = manager.task_index
    expanded: dict[str, list[str]] = {}
    seen: set[str] = set()
    for suite in suites:
        entry = index.get(suite)
        if entry is None or entry.kind not in (Kind.GROUP, Kind.TASK):
            known = ", ".join(manager.all_groups + manager.all_subtasks)
            raise UserError(f"unknown suite or task {suite!r} (known: {known})", key="suites")
        members = [name for name in (entry.cfg["task"] if entry.kind is Kind.GROUP else [suite]) if name not in seen]
        seen.update(members)
        if members:
            expanded[suite] = members
    return expanded


def data_root(data_dir: str) -> Path:
    """The directory `data_dir` names: the bundled sample for "bundled:eval", else the path."""
    return BUNDLED_SAMPLE_DIR if data_dir == BUNDLED_SAMPLE else Path(data_dir)


def effective_fewshot(config: dict[str, Any], num_fewshot: int | None) -> int:
    """The shots lm-eval will use: a task fixed at 0 stays 0, else the override, else its default."""
    default = config.get("num_fewshot")
    if default == 0 or num_fewshot is None:
        return default or 0
    return num_fewshot


def offline_files(config: dict[str, Any], task_dir: Path, shots: int) -> dict[str, Path]:
    """The split files a task reads offline: its evaluation split, and its few-shot split if shots > 0."""
    eval_split = config.get("test_split") or config.get("validation_split")
    splits = [eval_split]
    if shots > 0:
        splits.append(next(config[key] for key in FEWSHOT_SPLIT_ORDER if config.get(key)))
    return {split: task_dir / f"{split}.jsonl" for split in splits}


def _read_offline(config: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """`config` reading `files` through the json builder; splits without a file are dropped."""
    config = dict(config, dataset_path="json", dataset_name=None)
    config["dataset_kwargs"] = {"data_files": {split: str(path) for split, path in files.items()}}
    for key in FEWSHOT_SPLIT_ORDER:
        if config.get(key) not in files:
            config[key] = None
    return config


def task_configs(
    manager: TaskManager,
    names: list[str],
    data_dir: str | None,
    num_fewshot: int | None,
    humaneval_samples: int,
    humaneval_temperature: float = 0.8,
) -> dict[str, dict[str, Any]]:
    """Resolved task configs; offline, first checks that every data file exists, then every row.

    Raises one `UserError` listing, per task, exactly the files that are missing, or naming
    the task, file and line of the first bad row (`data_check`).
    """
    configs, missing = {}, {}
    for name in names:
        config = load_yaml(manager.task_index[name].yaml_path, resolve_func=True)
        if data_dir is None and is_generated(config):
            raise UserError(
                f"{name} is a generated task with no hub dataset: set data_dir to a folder of its generated rows "
                "(monte_ds.evaluation.generated.write_tasks)",
                key="data_dir",
            )
        if name == humaneval.TASK:
            config = humaneval.with_samples(config, humaneval_samples, humaneval_temperature)
        elif data_dir is not None:
            files = offline_files(config, data_root(data_dir) / name, effective_fewshot(config, num_fewshot))
            absent = [str(path) for path in files.values() if not path.is_file()]
            if absent:
                missing[name] = absent
            config = _read_offline(config, files)
        configs[name] = config
    if missing:
        listing = "; ".join(f"{name}: {', '.join(paths)}" for name, paths in missing.items())
        raise UserError(f"missing data files (layout in docs/evaluation.md) -- {listing}", key="data_dir")
    for name, config in configs.items():
        if config.get("dataset_path") == "json":  # read offline, from data_dir
            check_task_files(name, config)
    return configs


def is_generated(config: dict[str, Any]) -> bool:
    """A task whose rows monte-ds generates (`metadata.generated` in its YAML): offline only."""
    return bool((config.get("metadata") or {}).get("generated"))


def load_tasks(manager: TaskManager, configs: dict[str, dict[str, Any]], num_fewshot: int | None) -> dict[str, Task]:
    """Build the lm-eval tasks (this loads their datasets) and check there are enough few-shot examples."""
    tasks = {}
    for name, config in configs.items():
        try:
            task = manager.load(config)["tasks"][name]
        except DATA_LOAD_ERRORS as err:
            offline = config.get("dataset_path") == "json"
            source = config["dataset_kwargs"]["data_files"] if offline else config.get("dataset_path")
            hint = "" if offline else " (offline: set data_dir, layout in docs/evaluation.md)"
            raise UserError(f"cannot load {name} from {source}: {first_line(err)}{hint}", key="data_dir") from err
        shots = effective_fewshot(config, num_fewshot)
        if shots and (available := len(task.fewshot_docs())) < shots:
            raise UserError(
                f"{name} uses {shots} few-shot examples but its few-shot split has {available}", key="num_fewshot"
            )
        logger.info("%s: %d documents, %d-shot", name, len(task.eval_docs), shots)
        tasks[name] = task
    return tasks


def is_multiple_choice(task: Task) -> bool:
    return task.OUTPUT_TYPE == "multiple_choice"
