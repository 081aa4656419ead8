"""Command-line flags: the argparse parser of every monte-ds command, and how a key is spelt as a flag."""

from __future__ import annotations

import argparse
from typing import NoReturn

from monte_ds.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s: a bad flag is one line and exit 2, like any bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def flag(key: str) -> str:
    """The flag an option key is given as: `max_gen_toks` -> `--max-gen-toks`."""
    return "--" + key.replace("_", "-")
