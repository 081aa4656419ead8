"""The README and docs/*.md against the code, so that the docs cannot drift from it.

Every command of a ```bash block is exercised the way EXERCISES says, without running it whole (a
full run is a benchmark, trains, or needs a GPU, several nodes or the user's data): its own parser
takes the documented arguments, then what the command checks before it starts runs (for the demo,
its whole training plan: config, targets, data, trainable tokens, eval; a sweep's grid; the eval
options). A documented command that EXERCISES does not know fails here, so new docs come with a
way to run them. The names of the README's API table and of the docs' `from monte_ds import ...`
lines import; every config key the docs name (`training.seed`, `--set adapter.method=lora`, the
tables of docs/training.md) is in the training config's schema.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import itertools
import re
import runpy
import shlex
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peft import LoraConfig

import monte_ds
from monte_ds.evaluation import cli as eval_cli
from monte_ds.evaluation import validate_options
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE
from monte_ds.sweep import cli as sweep_cli
from monte_ds.train import run as train_run
from monte_ds.train.config import config_schema, load_config, read_config
from monte_ds.train.methods import ACCEPTED, METHODS


REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
TICKED = re.compile(r"`([^`]+)`")
# A config key as the docs write it: `training.seed`, `--set adapter.method=lora`, `eval.suites`.
SECTIONS = tuple(config_schema()["properties"])
DOTTED_KEY = re.compile(rf"(?<![\w./-])(?:{'|'.join(SECTIONS)})(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = {"md", "json", "jsonl", "py", "yaml"}
# Stand-ins for what a reader supplies: the base config of the sweep examples, the data.
PLACEHOLDERS = {"BASE.json": "configs/tiny.json"}
USER_DATA_STANDIN = "bundled:tiny_instruct.jsonl"


# -- the documented commands --------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: tuple[str, ...]  # shell words, the block's variables expanded

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def _logical_lines(block: str) -> Iterator[tuple[int, str]]:
    """(offset of the first line, the line) with backslash continuations joined."""
    start, pending = 0, ""
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            start = offset
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        yield start, pending + line
        pending = ""


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.finditer(text):
            if block.group(1) != "bash":
                continue
            first_line = text.count("\n", 0, block.start(2)) + 1
            variables: dict[str, list[str]] = {}
            for offset, line in _logical_lines(block.group(2)):
                line = re.sub(r"\[(--[^\[\]]*)\]", r"\1", line)  # an optional flag, `[--data-dir DIR]`
                words = [word for word in shlex.split(line, comments=True) if word != "..."]
                if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0], re.DOTALL):
                    name, value = words[0].split("=", 1)
                    variables[name] = shlex.split(value)
                elif words:
                    argv = [part for word in words for part in variables.get(word.removeprefix("$"), [word])]
                    commands.append(Command(f"{doc.relative_to(REPO)}:{first_line + offset}", tuple(argv)))
    return commands


def resolve(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(launcher argv, program, its arguments): `nice`, the interpreter and the launcher taken off;
    `python -m monte_ds.cli X` is `monte-ds X`."""
    if argv[0] == "nice":
        return resolve(argv[3:] if argv[1] == "-n" else argv[1:])
    if argv[0] in LAUNCHERS:
        script = next(index for index, word in enumerate(argv) if word.endswith(".py"))
        return argv[:script], argv[script], argv[script + 1 :]
    if argv[0] in ("python", "python3") or argv[0].endswith("/python"):
        if argv[1] == "-m" and argv[2] == "monte_ds.cli":
            return [], f"monte-ds {argv[3]}", argv[4:]
        if argv[1] == "-m":
            return [], f"python -m {argv[2]}", argv[3:]
        if argv[1] == "-c":
            return [], "python -c", argv[2:]
        return [], argv[1], argv[2:]
    if argv[0] == "monte-ds":
        return [], f"monte-ds {argv[1]}", argv[2:]
    return [], argv[0], argv[1:]


def substitute(word: str) -> str:
    """`$(python -c '...')` inside a word: the snippet runs here and its output takes its place."""

    def run_snippet(match: re.Match) -> str:
        launcher, program, args = resolve(shlex.split(match.group(1)))
        assert program == "python -c" and not launcher, f"no way to run {match.group(0)} here"
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(args[0], {})  # noqa: S102 - the documented snippet, as the shell would run it
        return output.getvalue().strip()

    return re.sub(r"\$\((.*)\)", run_snippet, word)


# -- how each program is exercised --------------------------------------------------------------


class _Parsed(Exception):
    """Raised once a script's parser has taken its arguments: the script goes no further."""


def parse_script_args(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A benchmark or study script: its own parser takes the documented arguments; nothing runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        original(self, *a, **kw)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [program, *args])
    monkeypatch.syspath_prepend(str((REPO / program).parent))  # sibling modules (overhead_worker)
    with pytest.raises(_Parsed):
        runpy.run_path(str(REPO / program), run_name="__main__")


def check_train(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `monte-ds train` checks before it writes anything: the config and its overrides; for
    the demo's locally built tiny base, the whole plan (targets, data, trainable tokens, eval)."""
    options = train_run.parse_args(args)
    overrides = [*options.overrides, f"training.output_dir={tmp_path / 'out'}"]
    data = read_config(options.config, overrides)["data"]["path"]
    if not data.startswith("bundled:") and Path(data).suffix and not Path(data).exists():
        overrides.append(f"data.path={USER_DATA_STANDIN}")  # the reader's own data
    config = load_config(options.config, overrides)
    if config.model.build_tiny:
        overrides.append(f"model.path={tmp_path / 'tiny'}")
        train_run.plan_run(["--config", options.config, *(f"--set={override}" for override in overrides)])


def check_eval(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`monte-ds eval`'s flags and the checks that need neither a model nor the datasets."""
    parsed = vars(eval_cli.build_parser().parse_args(args))
    options = {name: parsed[name] for name in eval_cli.OPTION_FIELDS if name in parsed}
    if options.get("data_dir") is not None:
        options["data_dir"] = BUNDLED_SAMPLE  # the reader's own data
    validate_options(options)


def check_sweep(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`monte-ds sweep`'s flags, grid, methods and seeds, planned (nothing trains)."""
    sweep = sweep_cli.parse_sweep(sweep_cli.build_parser().parse_args([PLACEHOLDERS.get(a, a) for a in args]))
    assert sweep.runs


def check_lm_eval(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """lm-eval's own parser takes the flags; the tasks are found under --include_path."""
    from lm_eval._cli import HarnessCLI  # what the lm_eval console script runs
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(sys, "argv", [program, *args])
    parsed = HarnessCLI().parse_args()
    tasks = parsed.tasks if isinstance(parsed.tasks, list) else parsed.tasks.split(",")
    manager = TaskManager(include_path=parsed.include_path, include_defaults=False)
    missing = set(tasks) - set(manager.match_tasks(tasks))
    assert not missing, f"not found under {parsed.include_path}: {sorted(missing)}"


def check_make_target(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Makefile has the target (`make -n`: its commands printed, not run)."""
    subprocess.run(["make", "-n", *args], cwd=REPO, check=True, capture_output=True, timeout=30)


def check_shell_syntax(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A shell script that runs a whole study: it parses (`bash -n`)."""
    subprocess.run(["bash", "-n", str(REPO / program)], check=True, capture_output=True, timeout=30)


def check_gpu_kit_run(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`.gpu-kit/run.sh`, which `make gpu-kit` writes from scripts/gpu_kit.py: it parses, and the
    `gpu_kit.py run --kit KIT` it execs takes the documented arguments."""
    run_sh = tmp_path / "run.sh"
    run_sh.write_text(runpy.run_path(str(REPO / "scripts" / "gpu_kit.py"))["RUN_SH"])
    subprocess.run(["sh", "-n", str(run_sh)], check=True, capture_output=True, timeout=30)
    parse_script_args("scripts/gpu_kit.py", ["run", "--kit", str(tmp_path), *args], monkeypatch, tmp_path)


Exercise = Callable[[str, list[str], pytest.MonkeyPatch, Path], None]
EXERCISES: dict[str, Exercise] = {
    "make": check_make_target,
    "monte-ds train": check_train,
    "launch/train.py": check_train,
    "monte-ds eval": check_eval,
    "monte-ds sweep": check_sweep,
    "lm_eval": check_lm_eval,
    "benchmarks/vs_peft_monteclora.py": parse_script_args,
    "benchmarks/overhead.py": parse_script_args,
    "benchmarks/collectives.py": parse_script_args,
    "benchmarks/gpu_suite.py": parse_script_args,
    "studies/robustness/make_data.py": parse_script_args,
    "studies/robustness/pretrain.py": parse_script_args,
    "studies/robustness/run.sh": check_shell_syntax,
    "studies/smollm2-robustness/run.sh": check_shell_syntax,
    ".gpu-kit/run.sh": check_gpu_kit_run,
}


def _torchrun(argv: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    get_args_parser().parse_args(argv)


def _deepspeed(argv: list[str]) -> None:
    from deepspeed.launcher.runner import parse_args

    parse_args(argv)


# A launcher's own options go through its own parser; the script it launches is then exercised.
LAUNCHERS: dict[str, Callable[[list[str]], None]] = {"torchrun": _torchrun, "deepspeed": _deepspeed}

COMMANDS = documented_commands()


def test_every_documented_command_has_an_exercise():
    programs = {command: resolve(list(command.argv))[1] for command in COMMANDS}
    unknown = [str(command) for command, program in programs.items() if program not in EXERCISES]
    assert not unknown, "documented commands with no entry in EXERCISES:\n" + "\n".join(unknown)
    assert set(EXERCISES) <= set(programs.values()), "EXERCISES entries no doc uses"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command(command, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    argv = [substitute(word) for word in command.argv]
    launcher, program, args = resolve(argv)
    if launcher:
        LAUNCHERS[launcher[0]]([*launcher[1:], program, *args])
    if program not in EXERCISES:
        pytest.fail(f"no entry in EXERCISES for {program!r}")
    EXERCISES[program](program, args, monkeypatch, tmp_path)


# -- the Python API -----------------------------------------------------------------------------


def _table(text: str, header: str) -> Iterator[tuple[str, list[str]]]:
    """(the heading above it, the cells of each row) of every table whose first header cell is
    `header`."""
    heading = ""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("#"):
            heading = line
        if re.match(rf"\|\s*{header}\s*\|", line) and index + 1 < len(lines) and lines[index + 1].startswith("|--"):
            for row in itertools.takewhile(lambda row: row.startswith("|"), lines[index + 2 :]):
                yield heading, [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def _api_rows() -> list[list[str]]:
    return [cells for _, cells in _table((REPO / "README.md").read_text(), "function")]


def test_every_name_of_the_readme_api_table_is_exported_with_the_documented_parameters():
    rows = _api_rows()
    assert rows, "the README's API table (| function | what it does |) is gone"
    for cells in rows:
        for entry in TICKED.findall(cells[0]):
            expression = ast.parse(entry, mode="eval").body
            name = ast.unparse(expression.func if isinstance(expression, ast.Call) else expression)
            assert name in monte_ds.__all__, f"README lists {name}, monte_ds does not export it"
            elided = any(isinstance(arg, ast.Constant) and arg.value is ... for arg in getattr(expression, "args", []))
            if not isinstance(expression, ast.Call) or elided:
                continue
            parameters = inspect.signature(getattr(monte_ds, name)).parameters
            positional = [arg.id for arg in expression.args]
            assert positional == list(parameters)[: len(positional)], f"{entry}: the signature is {list(parameters)}"
            for keyword in expression.keywords:
                assert keyword.arg in parameters, f"{entry}: {name} takes no {keyword.arg!r}"
                if isinstance(keyword.value, ast.Constant):
                    assert parameters[keyword.arg].default == keyword.value.value, f"{entry}: the default differs"


def test_the_readme_monteclora_config_row_names_its_fields_and_values():
    (cells,) = [cells for cells in _api_rows() if cells[0].startswith("`MonteCLoRAConfig")]
    fields = {field.name for field in dataclasses.fields(monte_ds.MonteCLoRAConfig)}
    hints = typing.get_type_hints(monte_ds.MonteCLoRAConfig)
    literals = [hint for hint in hints.values() if typing.get_origin(hint) is typing.Literal]
    values = {str(value) for hint in literals for value in typing.get_args(hint)}
    named = {entry for entry in TICKED.findall(cells[1]) if entry.isidentifier()}
    assert named - fields - values == set()


def test_every_monte_ds_import_of_a_python_block_works():
    for doc in DOCS:
        for block in FENCE.finditer(doc.read_text()):
            if block.group(1) != "python":
                continue
            for node in ast.walk(ast.parse(block.group(2))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "monte_ds":
                    module = importlib.import_module(node.module)
                    missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                    assert not missing, f"{doc.name}: from {node.module} import {missing}"


# -- config keys --------------------------------------------------------------------------------


def _schema_has(key: str) -> bool:
    node = config_schema()
    for part in key.split("."):
        if "properties" not in node:  # a free-form object (a DeepSpeed config): any key
            return node.get("type") in ("object", ["object", "string"])
        if part not in node["properties"]:
            return False
        node = node["properties"][part]
    return True


def _prose_and_bash(text: str) -> str:
    """The doc without its non-bash code blocks (Python code, sample output, folder layouts)."""
    return FENCE.sub(lambda block: block.group(0) if block.group(1) == "bash" else "", text)


def test_every_dotted_config_key_the_docs_name_exists():
    named = {
        (doc.name, key)
        for doc in DOCS
        for key in DOTTED_KEY.findall(_prose_and_bash(doc.read_text()))
        if key.rsplit(".", 1)[1] not in FILE_SUFFIXES
    }
    assert named, "no config key found: the pattern no longer matches the docs"
    assert sorted(f"{doc}: {key}" for doc, key in named if not _schema_has(key)) == []


TRAINING_MD = REPO / "docs" / "training.md"


def test_the_key_tables_of_the_training_doc_name_schema_keys():
    properties = config_schema()["properties"]
    checked = set()
    for heading, cells in _table(TRAINING_MD.read_text(), "key"):
        section = TICKED.search(heading).group(1)
        unknown = [key for key in TICKED.findall(cells[0]) if key not in properties[section]["properties"]]
        assert not unknown, f"{heading}: not keys of {section}: {unknown}"
        checked.add(section)
    assert checked >= {"model", "quantization", "data"}


def _outside_parentheses(cell: str) -> str:
    while re.search(r"\([^()]*\)", cell):
        cell = re.sub(r"\([^()]*\)", "", cell)
    return cell


def test_the_methods_table_names_every_method_and_only_its_options():
    documented = set()
    for _, cells in _table(TRAINING_MD.read_text(), "method"):
        methods = TICKED.findall(cells[0])
        documented.update(methods)
        options = {entry for entry in TICKED.findall(_outside_parentheses(cells[2])) if entry.isidentifier()}
        accepted = set().union(*(ACCEPTED[method] for method in methods if method in ACCEPTED))
        assert options <= accepted, f"{methods}: not their options: {sorted(options - accepted)}"
    assert documented - {"monteclora"} == set(METHODS) - {"monteclora"}


def test_the_lora_field_table_covers_peft_and_says_what_is_offered():
    offered = config_schema()["properties"]["adapter"]["properties"]
    listed = set()
    for _, (fields, meaning) in _table(TRAINING_MD.read_text(), "field"):
        names = set(TICKED.findall(fields))
        listed |= names
        refused = meaning.startswith(("not offered", "set by peft"))
        wrong = sorted(name for name in names if (name in offered) == refused)
        assert not wrong, f"{fields}: the table says {'not ' if refused else ''}offered, the schema differs: {wrong}"
    assert listed == {field.name for field in dataclasses.fields(LoraConfig)}
