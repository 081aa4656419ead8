"""Bad-input errors that name their input, and the one place they become a line of text.

An error carries the offending input in `key` (a dotted config key, a flag, a path; None: the
input as a whole) apart from its `problem`, so a caller that knows the input by another name
(`eval.limit` in a training config, `--limit` on the command line) renames it with `under` or
`with_key` instead of cutting the message apart. Library code raises `InputError` (a
`ValueError`); the commands raise `UserError`. Only `run_cli`, the command-line edge, turns either
into `monte-ds: error: <key>: <problem>` and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar


EXIT_USER_ERROR = 2
_Error = TypeVar("_Error", bound="KeyedError")


class KeyedError(Exception):
    """A problem with one named input; `str()` is `<key>: <problem>` (just the problem without a key)."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        self.problem = problem
        self.key = key
        super().__init__(f"{key}: {problem}" if key else problem)

    def with_key(self: _Error, key: str | None) -> _Error:
        """The same problem, naming the input as the caller knows it."""
        return type(self)(self.problem, key)

    def under(self: _Error, section: str) -> _Error:
        """The same problem with its key inside `section` (`limit` under `eval` is `eval.limit`)."""
        return self.with_key(f"{section}.{self.key}" if self.key else section)


class InputError(KeyedError, ValueError):
    """Bad input to a library function (a config field, an adapter folder)."""


class UserError(KeyedError):
    """Bad input to a command (config, flags, data files)."""


def first_line(err: BaseException) -> str:
    """The first non-blank line of an error's message (a library's multi-line message), or the
    error's type where the message is empty, to go inside a one-line problem."""
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`; a bad-input error becomes one line on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except KeyedError as err:
        print(f"monte-ds: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
