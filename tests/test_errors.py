"""`vfs.errors.error_line`: a third-party error in one line, whatever its message."""

import pytest

from vfs.errors import ERROR_CHARS, error_line


def test_an_error_in_one_line():
    ray_like = RuntimeError("Traceback (most recent call last):\n  File 'x.py'\n\n  OSError: disk full\n")
    assert error_line(ray_like, "last") == "OSError: disk full"  # a Ray error ends with its cause
    assert error_line(ray_like, "first", named=True) == "RuntimeError: Traceback (most recent call last):"
    state_dict = RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): fc.weight")
    assert error_line(state_dict) == "Error(s) in loading state_dict: Missing key(s): fc.weight"
    assert error_line(ValueError("\x1b[31mred\x1b[0m text")) == "red text"  # no terminal colour codes
    long = error_line(ValueError("x" * 5000))
    assert len(long) == ERROR_CHARS and long.endswith("…")


@pytest.mark.parametrize("part", ["whole", "first", "last"])
def test_an_error_without_a_message_is_named(part):
    """An empty message raised IndexError where a failed cluster build said its cause (review)."""
    assert error_line(MemoryError(), part) == "MemoryError"
    assert error_line(RuntimeError("\n \n"), part, named=True) == "RuntimeError"
