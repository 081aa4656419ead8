"""The one place an error's message becomes part of a one-line problem."""

from __future__ import annotations

from monte_ds.errors import first_line


def test_first_line_is_the_first_non_blank_line_or_the_type_of_an_empty_error():
    assert first_line(OSError("\n  no such file: x  \nTraceback (most recent call last):")) == "no such file: x"
    assert first_line(KeyError()) == "KeyError"  # an empty message (splitlines()[0] raised IndexError)
    assert first_line(ValueError("   ")) == "ValueError"
