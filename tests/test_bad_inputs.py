"""A corpus of bad inputs to `monte-ds train` and `monte-ds eval` (flags, config, training data,
evaluation data), each run through the command line: exit code 2, exactly one line on stderr naming the
problem, no traceback, and nothing written (the output directory absent, or byte-identical when
it held an earlier run).

Most cases run in-process (the CLI's `main`, stderr captured); the ones marked `subprocess` run
`python -m monte_ds.cli` in a fresh process, for the real stderr and a real `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from monte_ds.cli import main as cli_main
from monte_ds.errors import UserError
from monte_ds.tiny import build_tiny_llama, build_tokenizer
from monte_ds.train import checkpoints
from monte_ds.train.data import DataSection, Source, bundled_path, check_trainable_tokens, training_dataset
from monte_ds.train.data.tokens import _loss_masks, _truncated


ALPACA = [
    {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
    {"instruction": "Name a colour.", "input": "", "output": "blue"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
PIQA = [
    {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
    {"goal": "Dry a towel.", "sol1": "Soak it.", "sol2": "Hang it in the sun.", "label": 1},
    {"goal": "Cool tea.", "sol1": "Add ice.", "sol2": "Boil it.", "label": 0},
]
BOOLQ = [
    {"question": "is the sky blue", "passage": "The sky is blue on clear days.", "idx": 0, "label": 1},
    {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0},
    {"question": "do fish swim", "passage": "Fish swim in water.", "idx": 2, "label": 1},
]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def replaced(rows: list[dict], index: int, **changes) -> list[dict]:
    """`rows` with row `index` updated (a value of `...` removes the key)."""
    row = {key: value for key, value in {**rows[index], **changes}.items() if value is not ...}
    return [*rows[:index], row, *rows[index + 1 :]]


@dataclass(frozen=True)
class Case:
    """`files` (relative to the case's directory; a str is the content, None a directory) are
    written first; `{dir}` in `args`, `sets` and `message` is that directory."""

    command: str  # "train" or "eval"
    message: str
    files: dict[str, str | None] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    earlier_run: bool = False  # the output directory holds a finished earlier run
    subprocess: bool = False


CASES = {
    # -- config -----------------------------------------------------------------------------------
    "config-unknown-key": Case(
        "train",
        "training.lerning_rate: unknown key (did you mean 'learning_rate'?)",
        sets=("training.lerning_rate=1e-4",),
    ),
    "config-bad-on-bad-rows": Case(
        "train", 'data.on_bad_rows: must be one of "error", "skip", got "drop"', sets=("data.on_bad_rows=drop",)
    ),
    "config-not-json": Case(
        "train",
        "--config: {dir}/broken.json is not valid JSON",
        files={"broken.json": "{"},
        args=("--config", "{dir}/broken.json"),
    ),
    "config-out-of-range": Case("train", "adapter.r: must be >= 1, got 0", sets=("adapter.r=0",)),
    "config-unknown-suite": Case(
        "train", "eval.suites: unknown suite or task 'nope'", sets=('eval={"suites": ["nope"]}',), earlier_run=True
    ),
    "config-unfinished-run": Case(
        "train", "holds an unfinished run (latest checkpoint-2); pass --resume", earlier_run=True
    ),
    # -- flags: every command answers a bad flag the same way (monte_ds.flags) -----------------------
    "train-unknown-flag": Case(
        "train", "monte-ds: error: unrecognized arguments: --learning-rate 1e-4", args=("--learning-rate", "1e-4")
    ),
    "eval-unknown-flag": Case(
        "eval", "monte-ds: error: unrecognized arguments: --learning-rate 1e-4", args=("--learning-rate", "1e-4")
    ),
    "train-bad-flag-value": Case(
        "train",
        "monte-ds: error: argument --local_rank/--local-rank: invalid int value: 'one'",
        args=("--local-rank", "one"),
    ),
    # -- training data ----------------------------------------------------------------------------
    "train-unparseable-line": Case(
        "train",
        "data: {dir}/train.jsonl line 3: not valid JSON (Expecting value, column 35) (1 of 4 rows bad",
        files={"train.jsonl": jsonl(ALPACA[:2]) + '{"instruction": "Add.", "output": \n' + jsonl(ALPACA[2:])},
        subprocess=True,
    ),
    "train-empty-file": Case("train", "data: {dir}/train.jsonl is empty", files={"train.jsonl": ""}),
    "train-blank-file": Case("train", "data: {dir}/train.jsonl is empty", files={"train.jsonl": "\n  \n\n"}),
    "train-null-field-over-earlier-run": Case(
        "train",
        "data: {dir}/train.jsonl line 2: 'output' is missing or null (1 of 3 rows bad",
        files={"train.jsonl": jsonl(replaced(ALPACA, 1, output=None))},
        earlier_run=True,
        subprocess=True,
    ),
    "train-missing-field": Case(
        "train",
        "data: {dir}/train.jsonl line 3: 'instruction' is missing or null",
        files={"train.jsonl": jsonl(replaced(ALPACA, 2, instruction=...))},
    ),
    "train-non-string-field": Case(
        "train",
        "data: {dir}/train.jsonl line 2: 'output' is a number, not a string",
        files={"train.jsonl": jsonl(replaced(ALPACA, 1, output=5))},
    ),
    "train-blank-lines-keep-line-numbers": Case(
        "train",
        "data: {dir}/train.jsonl line 5: 'input' is a list, not a string",
        files={"train.jsonl": "\n" + jsonl(ALPACA[:2]) + "\n" + jsonl(replaced(ALPACA, 2, input=["a"])[2:])},
    ),
    "train-empty-conversation": Case(
        "train",
        "data: {dir}/chat.jsonl line 2: 'messages' is an empty conversation",
        files={"chat.jsonl": jsonl([CHAT[0], {"messages": []}, CHAT[1]])},
    ),
    "train-unknown-role": Case(
        "train",
        "data: {dir}/chat.jsonl line 2: 'messages' message 3 has the unknown role 'bot' (known: system, developer",
        files={
            "chat.jsonl": jsonl([CHAT[0], {"messages": [*CHAT[1]["messages"][:2], {"role": "bot", "content": "4"}]}])
        },
    ),
    "train-null-message-content": Case(
        "train",
        "data: {dir}/chat.jsonl line 1: 'messages' message 2 content is missing or null",
        files={
            "chat.jsonl": jsonl(
                [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}, CHAT[1]]
            )
        },
    ),
    "train-no-trainable-token": Case(
        "train",
        "data: no row of {dir}/train.jsonl has a trainable token after templating and truncation to "
        "training.max_length=8 (the loss is on completions only",
        files={"train.jsonl": jsonl(ALPACA)},
        sets=("training.max_length=8",),
    ),
    "train-every-row-bad-when-skipping": Case(
        "train",
        "data: every row of {dir}/train.jsonl is bad, nothing to train on (line 1: 'text' is a number",
        files={"train.jsonl": jsonl([{"text": 1}, {"text": 2}])},
        sets=("data.on_bad_rows=skip",),
    ),
    "train-bad-json-document": Case(
        "train",
        "data: {dir}/train.json line 4: not valid JSON (Expecting ',' delimiter, column 1)",
        files={"train.json": '[\n  {"text": "a"},\n  {"text": "b"\n]\n'},
    ),
    "train-directory": Case(
        "train",
        "data.path: {dir}/data is a directory but not a saved dataset",
        files={"data": None},
        sets=("data.path={dir}/data",),
    ),
    "train-unsupported-extension": Case(
        "train",
        "data.path: unsupported file type '.xml'",
        files={"train.xml": "<rows/>"},
        sets=("data.path={dir}/train.xml",),
    ),
    "train-hub-id-offline": Case(
        "train",
        "data.path: 'no-such-org/no-such-data' is not a local file or folder, and the hub is offline",
        sets=("data.path=no-such-org/no-such-data",),
        subprocess=True,
    ),
    # -- evaluation data --------------------------------------------------------------------------
    "eval-unparseable-line": Case(
        "eval",
        "--data-dir: piqa: {dir}/data/piqa/validation.jsonl line 2: not valid JSON",
        files={"data/piqa/validation.jsonl": jsonl(PIQA[:1]) + '{"goal": "x",\n' + jsonl(PIQA[1:])},
    ),
    "eval-wrong-schema": Case(
        "eval",
        "--data-dir: piqa: {dir}/data/piqa/validation.jsonl line 1: no 'goal', 'label', 'sol1', 'sol2' "
        "(a piqa row has the fields goal, label, sol1, sol2; this one has question, answer)",
        files={"data/piqa/validation.jsonl": jsonl([{"question": "2+2?", "answer": "4"}] * 3)},
        subprocess=True,
    ),
    "eval-row-missing-a-field": Case(
        "eval",
        "--data-dir: boolq: {dir}/data/boolq/validation.jsonl line 3: no 'passage' (a boolq row has the fields "
        "passage, question, label",
        files={
            "data/piqa/validation.jsonl": jsonl(PIQA),
            "data/boolq/validation.jsonl": jsonl(replaced(BOOLQ, 2, passage=None)),
        },
        args=("--suites", "piqa,boolq"),
    ),
    "eval-empty-file": Case(
        "eval", "--data-dir: piqa: {dir}/data/piqa/validation.jsonl is empty", files={"data/piqa/validation.jsonl": ""}
    ),
    "eval-row-not-an-object-over-earlier-report": Case(
        "eval",
        "--data-dir: piqa: {dir}/data/piqa/validation.jsonl line 2: not a JSON object",
        files={"data/piqa/validation.jsonl": jsonl([PIQA[0], ["Open a jar.", 0], PIQA[2]])},
        earlier_run=True,
    ),
    "train-eval-section-bad-row": Case(
        "train",
        "eval.data_dir: piqa: {dir}/data/piqa/validation.jsonl line 1: no 'sol2'",
        files={"data/piqa/validation.jsonl": jsonl(replaced(PIQA, 0, sol2=...))},
        sets=('eval={"suites": ["piqa"], "data_dir": "{dir}/data"}',),
    ),
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    texts = [bundled_path("bundled:tiny_instruct.jsonl").read_text(), jsonl(ALPACA + CHAT + PIQA + BOOLQ)]
    return build_tiny_llama(tmp_path_factory.mktemp("bad-inputs") / "tiny-llama", texts, vocab_size=256, seed=0)


def train_config(directory: Path, base: Path, data: str) -> Path:
    config = {
        "model": {"path": str(base), "dtype": "float32"},
        "adapter": {"r": 2, "lora_alpha": 4},
        "data": {"path": data},
        "training": {
            "output_dir": str(directory / "out"),
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 64,
            "activation_checkpointing": False,
            "report_to": [],
            "save_steps": 2,
        },
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def command_line(case: Case, directory: Path, base: Path) -> list[str]:
    def fill(text: str) -> str:
        return text.replace("{dir}", str(directory))

    if case.command == "eval":
        args = [
            "eval",
            "--model",
            str(base),
            "--suites",
            "piqa",
            "--data-dir",
            str(directory / "data"),
            "--output",
            str(directory / "out"),
        ]
    else:
        data = next((name for name in case.files if name.startswith(("train.", "chat."))), None)
        config = train_config(directory, base, str(directory / data) if data else "bundled:tiny_instruct.jsonl")
        args = ["train", "--config", str(config)]
    args += [fill(arg) for arg in case.args]
    for override in case.sets:
        args += ["--set", fill(override)]
    return args


def write_earlier_run(case: Case, output: Path) -> None:
    """What an earlier run left: a finished run's files (a report for eval), or an unfinished run."""
    output.mkdir()
    if case.command == "eval":
        (output / "report.json").write_text('{"tasks": {"piqa": {"acc": 0.5}}}')
        return
    checkpoint = output / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    checkpoints.mark_complete(checkpoint, 2)
    if case.message.startswith("holds an unfinished run"):
        return
    (output / "metrics.json").write_text('{"status": "completed", "global_step": 2}')
    (output / "adapter").mkdir()
    (output / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter")


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` with its bytes (None for a folder)."""
    return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes() for p in sorted(directory.rglob("*"))}


def run_in_subprocess(args: list[str]) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "monte_ds.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    return done.returncode, done.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, tiny_base, capsys):
    case = CASES[name]
    for relative, content in case.files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if content is None else path.write_text(content)
    args = command_line(case, tmp_path, tiny_base)
    if case.earlier_run:
        write_earlier_run(case, tmp_path / "out")
    before = snapshot(tmp_path)

    if case.subprocess:
        code, err = run_in_subprocess(args)
    else:
        code = cli_main(args)
        err = capsys.readouterr().err

    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("monte-ds: error: "), err
    assert "Traceback" not in err
    assert case.message.replace("{dir}", str(tmp_path)) in err
    assert snapshot(tmp_path) == before  # nothing written: no output directory, or the earlier run as it was
    assert case.earlier_run == (tmp_path / "out").exists()


# -- data.on_bad_rows = "skip" and the trainable-token check, without the CLI --------------------------
def test_skip_drops_exactly_the_bad_rows_and_names_them(tmp_path, caplog):
    rows = [ALPACA[0], replaced(ALPACA, 1, output=None)[1], {"instruction": "Count.", "output": 5}, ALPACA[2]]
    lines = [json.dumps(row) for row in rows]
    (tmp_path / "train.jsonl").write_text("\n".join([lines[0], "{broken", *lines[1:], ""]))
    data = DataSection(path=str(tmp_path / "train.jsonl"), on_bad_rows="skip")
    with caplog.at_level(logging.WARNING, logger="monte_ds"):
        dataset, _ = training_dataset(data)
    assert dataset["completion"] == ["5", "blue"]  # the string "5" of row 1 stays a string
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert "skipping 1 of 5 rows" in warnings[0] and "line 2 (not valid JSON" in warnings[0]
    assert "skipping 2 of 4 rows" in warnings[1]
    assert "line 3 ('output' is missing or null), line 4 ('output' is a number, not a string)" in warnings[1]


def test_the_token_check_stops_at_the_first_row_that_keeps_a_token(tmp_path):
    tokenizer = build_tokenizer(jsonl(ALPACA), vocab_size=128)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=24, report_to=[], use_cpu=True)
    long_prompt = {"prompt": "word " * 40, "completion": "yes"}
    source = Source("rows")
    fits = datasets.Dataset.from_list([long_prompt, long_prompt, {"prompt": "Q: hi\nA:", "completion": " yes"}])
    check_trainable_tokens(fits, tokenizer, args, source)  # the last row fits: no error
    with pytest.raises(UserError, match=r"no row of rows has a trainable token .*training\.max_length=24"):
        check_trainable_tokens(fits.select([0, 1]), tokenizer, args, source)
    # The whole sequence is trained on without completion-only loss: the long rows keep tokens too.
    whole = SFTConfig(
        output_dir=str(tmp_path / "out"), max_length=24, completion_only_loss=False, report_to=[], use_cpu=True
    )
    check_trainable_tokens(fits.select([0, 1]), tokenizer, whole, source)


PAIRS = [  # prompt/completion rows whose prompts fit max_length=30, or not
    {"prompt": "Q: 2 + 3?\nA:", "completion": " 5"},
    {
        "prompt": "Reverse the word stone, letter by letter, and answer with the reversed word only:" * 2,
        "completion": " enots",
    },
    {"prompt": "Colour of the sky?", "completion": " blue, on a clear day"},
]


@pytest.mark.parametrize("rows", [PAIRS, CHAT], ids=["prompt-completion", "messages"])
def test_the_token_check_counts_the_tokens_trl_trains_on(rows, tiny_base, tmp_path):
    """The check mirrors TRL's tokenization, label masking and truncation: for every row, the tokens
    it counts are those TRL's prepared dataset labels (rows TRL drops count none)."""
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(rows * 3))
    dataset, _ = training_dataset(DataSection(path=str(path)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_length=30, report_to=[], use_cpu=True, activation_checkpointing=False
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_base),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trained_by_trl = sorted(sum(label != -100 for label in labels) for labels in trainer.train_dataset["labels"])
    completion_only = args.completion_only_loss is not False and "prompt" in dataset.column_names
    counted = [
        sum(_truncated(mask, args)) for mask in _loss_masks(list(dataset), tokenizer, args, completion_only, None)
    ]
    assert sorted(count for count in counted if count) == trained_by_trl
    assert 0 < len(trained_by_trl)  # a non-trivial comparison: rows are trained on
    assert (0 in counted) == (rows is PAIRS)  # and the long prompts' rows dropped
