"""JSON schemas derived from dataclasses, and validation errors that name the offending key.

Every section of the training config is a dataclass, and its schema is derived from it
(`dataclass_schema`): the type from each field's annotation (a `Literal` is an enum), the
constraints from its metadata (`option(default, minimum=1)`), required = no default. So a new TRL
or core field is accepted without editing this file, and a misspelt one is rejected with the
key's name. `validate` checks a JSON document against such a schema; `check_fields` checks a
dataclass instance built from Python against its own fields' schemas (MonteCLoRAConfig's
`__post_init__`), and `check_rules` the rules between fields that no single field can say.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import json
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

import jsonschema

from monte_ds.errors import InputError, UserError


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


def option(default: Any = dataclasses.MISSING, help: str = "", must_be: str | None = None, **bounds: Any) -> Any:
    """A dataclass field carrying its constraints: `bounds` are JSON-schema keywords joining the
    annotation's schema (`minimum=1`, `minLength=1`, `pattern=...`); `help` documents it; `must_be`
    words the constraint for `check_fields` ("a module name, a list of names, or null") where the
    words derived from the schema (">= 1", "in [0, 1)", "'ones' or 'uniform'") do not say it.
    No default: a required field. A list or dict default is copied for each instance."""
    metadata = {"help": help, "bounds": bounds, "must_be": must_be}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def dataclass_schema(
    cls: type, exclude: Iterable[str] = (), documented: bool = False, bounds: bool = True
) -> dict[str, Any]:
    """An object schema with one property per dataclass field (minus `exclude`), nothing else;
    the fields without a default are required.

    A field's `metadata["bounds"]` (e.g. `{"minimum": 1}`) joins its schema, unless `bounds` is
    false (the types alone); `documented` adds each field's default and `metadata["help"]` (for a
    schema that doubles as the options' reference).
    """
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        properties[f.name] = {**annotation_schema(hints[f.name]), **(f.metadata.get("bounds", {}) if bounds else {})}
        if not _has_default(f):
            required.append(f.name)
        if documented:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            properties[f.name].update(default=default, description=f.metadata.get("help", ""))
    return {
        "type": "object",
        "properties": properties,
        **({"required": required} if required else {}),
        "additionalProperties": False,
    }


def _is_integer(checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(checker: Any, value: Any) -> bool:
    """A number JSON can hold: no bool, no NaN or infinity."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value))
    )


# Python values, checked strictly: JSON Schema's integer takes 2.0, its number NaN.
_PYTHON_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"integer": _is_integer, "number": _is_number}
)
_PythonValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_PYTHON_TYPES)
_TYPE_WORDS = {
    "boolean": "a bool",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_BOUND_WORDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _must_be(schema: dict[str, Any]) -> str:
    """A field schema's constraint in words: its choices, its numeric range, else its type(s)."""
    if "enum" in schema:
        return _either([repr(choice) for choice in schema["enum"]])
    low = next((key for key in ("minimum", "exclusiveMinimum") if key in schema), None)
    high = next((key for key in ("maximum", "exclusiveMaximum") if key in schema), None)
    if low and high:
        opening, closing = "[("[low == "exclusiveMinimum"], "])"[high == "exclusiveMaximum"]
        return f"in {opening}{schema[low]}, {schema[high]}{closing}"
    if low or high:
        return f"{_BOUND_WORDS[low or high]} {schema[low or high]}"
    if "anyOf" in schema:
        return _either([_must_be(member) for member in schema["anyOf"]])
    kinds = schema.get("type", [])
    return _either([_TYPE_WORDS[kind] for kind in ([kinds] if isinstance(kinds, str) else kinds)] or ["valid"])


@functools.cache
def _field_checks(cls: type) -> dict[str, tuple[jsonschema.protocols.Validator, str]]:
    """Each field's validator (annotation and bounds) and its constraint in words."""
    must_be = {f.name: f.metadata.get("must_be") for f in dataclasses.fields(cls)}
    return {
        name: (_PythonValidator(schema), must_be[name] or _must_be(schema))
        for name, schema in dataclass_schema(cls)["properties"].items()
    }


def check_fields(instance: Any) -> None:
    """Raise an `InputError` naming the first field (in declaration order) whose value breaks its
    annotation or bounds: "must be <its constraint>, got <the value>"."""
    for name, (validator, must_be) in _field_checks(type(instance)).items():
        value = getattr(instance, name)
        if not validator.is_valid(value):
            raise InputError(f"must be {must_be}, got {value!r}", key=name)


def check_rules(instance: Any, rules: Iterable[tuple[bool, str, str]]) -> None:
    """The rules between fields, as (holds, field, what it must be): an `InputError` naming the
    field of the first that does not hold."""
    for holds, name, must_be in rules:
        if not holds:
            raise InputError(f"must be {must_be}, got {getattr(instance, name)!r}", key=name)


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
