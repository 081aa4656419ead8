"""User-facing errors: reported as one line and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (config, paths, flags). The message names the problem."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`, turning a `UserError` into `monte-ds: error: ...` and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"monte-ds: error: {err}", file=sys.stderr)
        return 2
