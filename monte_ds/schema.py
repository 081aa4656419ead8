"""JSON schemas derived from dataclasses, and validation errors that name the offending key.

The training config's `training` section is TRL's `SFTConfig`, its `adapter` section
`MonteCLoRAConfig`, and its `eval` section (and `evaluate(**options)`) `EvalOptions`: each schema
is derived from the dataclass's annotations, so a new TRL or core field is accepted without
editing this file, and a misspelt one is rejected with the key's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

import jsonschema

from monte_ds.errors import UserError


MAX_LISTED_CHOICES = 8
# "did you mean" only for a likely misspelling: difflib's default (0.6) offers 'kl_weight' for
# 'init_lora_weight' and 'use_rslora' for 'use_dora'.
SUGGESTION_CUTOFF = 0.8
_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object", list: "array"}


def annotation_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a type annotation; {} (anything) where JSON cannot express it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return {"type": "null"}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    if origin in (list, tuple):
        item = annotation_schema(args[0]) if args else {}
        return {"type": "array", **({"items": item} if item else {})}
    if origin is dict:
        return {"type": "object"}
    if origin is typing.Union or isinstance(hint, types.UnionType):
        if any(isinstance(arg, type) and issubclass(arg, enum.Enum) for arg in args):
            args = tuple(arg for arg in args if arg is not str)  # `Enum | str`: only the members are valid
        members = [annotation_schema(arg) for arg in args]
        if any(not member for member in members):
            return {}
        return {"anyOf": members}
    return {}


def dataclass_schema(cls: type, exclude: Iterable[str] = (), documented: bool = False) -> dict[str, Any]:
    """An object schema with one property per dataclass field (minus `exclude`), nothing else.

    A field's `metadata["bounds"]` (e.g. `{"minimum": 1}`) joins its schema; `documented` adds each
    field's default and `metadata["help"]` (for a schema that doubles as the options' reference).
    """
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        properties[f.name] = {**annotation_schema(hints[f.name]), **f.metadata.get("bounds", {})}
        if documented:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            properties[f.name].update(default=default, description=f.metadata.get("help", ""))
    return {"type": "object", "properties": properties, "additionalProperties": False}


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """Raise a `UserError` naming the dotted key of the most relevant violation, if any."""
    errors = jsonschema.Draft202012Validator(schema).iter_errors(instance)
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        key, problem = describe(error)
        raise UserError(problem, key=key)


def describe(error: jsonschema.ValidationError) -> tuple[str, str]:
    """(dotted key, problem) of a violation, in words a config author reads."""
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))[0]
        close = difflib.get_close_matches(unknown, known, n=1, cutoff=SUGGESTION_CUTOFF)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _join(path, unknown), f"unknown key{hint}"
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        return _join(path, missing), "required"
    if error.validator in ("type", "anyOf", "oneOf"):
        expected = _expected_types(error.schema)
        if expected:
            return path, f"expected {expected}, got {json.dumps(error.instance)}"
    if error.validator == "enum":
        return path, _enum_problem(error.validator_value, error.instance)
    return path, error.message


def _enum_problem(choices: list[Any], value: Any) -> str:
    listed = ", ".join(json.dumps(choice) for choice in choices[:MAX_LISTED_CHOICES])
    more = f" and {len(choices) - MAX_LISTED_CHOICES} more" if len(choices) > MAX_LISTED_CHOICES else ""
    strings = [choice for choice in choices if isinstance(choice, str)]
    close = difflib.get_close_matches(value, strings, n=1, cutoff=SUGGESTION_CUTOFF) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"must be one of {listed}{more}, got {json.dumps(value)}{hint}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _expected_types(schema: dict[str, Any]) -> str:
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return " or ".join(kinds)
    members = schema.get("anyOf") or schema.get("oneOf") or []
    names = [_expected_types(member) or json.dumps(member.get("enum")) for member in members]
    return " or ".join(name for name in names if name and name != "null") + (
        " or null" if any(member.get("type") == "null" for member in members) else ""
    )
