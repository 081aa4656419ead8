"""The evaluation options: one dataclass validates `evaluate(**options)`, derives the JSON
schema the training config embeds, and the `monte-ds eval` flags."""

from __future__ import annotations

import dataclasses

import jsonschema
import pytest

from monte_ds.errors import UserError
from monte_ds.evaluation import EvalOptions
from monte_ds.evaluation.cli import build_parser


CONTRACT_KEYS = {
    "suites",
    "data_dir",
    "limit",
    "num_fewshot",
    "batch_size",
    "apply_chat_template",
    "allow_code_execution",
    "humaneval_samples",
    "max_gen_toks",
    "predictive_samples",
}


def test_the_contract_keys_are_accepted_with_their_defaults():
    names = {f.name for f in dataclasses.fields(EvalOptions)}
    assert CONTRACT_KEYS <= names
    assert EvalOptions.from_kwargs({}) == EvalOptions()
    schema = EvalOptions.json_schema()
    assert set(schema["properties"]) == names
    for f in dataclasses.fields(EvalOptions):
        assert schema["properties"][f.name]["default"] == getattr(EvalOptions(), f.name)


def test_schema_accepts_a_full_section_and_rejects_bad_values():
    section = {
        "suites": ["gsm8k", "arc_easy"],
        "data_dir": "/data",
        "limit": 10,
        "num_fewshot": 0,
        "batch_size": 4,
        "apply_chat_template": True,
        "allow_code_execution": True,
        "humaneval_samples": 8,
        "max_gen_toks": 256,
        "predictive_samples": 4,
        "seed": 7,
    }
    validator = jsonschema.Draft202012Validator(EvalOptions.json_schema())
    assert list(validator.iter_errors(section)) == []
    assert EvalOptions.from_kwargs(section).humaneval_samples == 8
    for bad in ({"limit": "10"}, {"batch_size": True}, {"predictive_samples": -1}, {"suites": "gsm8k"}, {"typo": 1}):
        assert list(validator.iter_errors(bad)), bad


@pytest.mark.parametrize(
    "options, key, problem",
    [
        ({"limit": "3"}, "limit", 'expected integer or null, got "3"'),
        ({"humaneval_samples": 0}, "humaneval_samples", "0 is less than the minimum of 1"),
        ({"humaneval_temperature": "0"}, "humaneval_temperature", 'expected number, got "0"'),
        ({"allow_code_execution": "yes"}, "allow_code_execution", 'expected boolean, got "yes"'),
        ({"batch_size": True}, "batch_size", "expected integer, got true"),
        ({"suites": ["gsm8k", 3]}, "suites.1", "expected string, got 3"),
        ({"limt": 3}, "limt", "unknown key (did you mean 'limit'?)"),
    ],
)
def test_invalid_options_raise_a_user_error_naming_the_key(options, key, problem):
    """The same schema and wording as the training config's eval section (monte_ds.schema)."""
    with pytest.raises(UserError) as caught:
        EvalOptions.from_kwargs(options)
    assert (caught.value.key, caught.value.problem) == (key, problem)


def test_cli_flags_are_derived_from_the_options():
    parser = build_parser()
    flags = {action.dest for action in parser._actions}
    assert {f.name for f in dataclasses.fields(EvalOptions)} <= flags
    args = vars(
        parser.parse_args(
            [
                "--model",
                "m",
                "--output",
                "o",
                "--suites",
                "gsm8k, commonsense",
                "--limit",
                "5",
                "--allow-code-execution",
                "--data-dir",
                "/d",
            ]
        )
    )
    assert args["suites"] == ["gsm8k", "commonsense"]
    assert args["limit"] == 5 and args["allow_code_execution"] is True and args["data_dir"] == "/d"
    assert "num_fewshot" not in args  # unset flags fall back to the EvalOptions defaults
    assert (
        parser.parse_args(
            ["--model", "m", "--output", "o", "--suites", "humaneval", "--humaneval-temperature", "0.2"]
        ).humaneval_temperature
        == 0.2
    )
