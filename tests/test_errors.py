"""`vfs.errors`: a third-party error in one line, whatever its message, and whether it says memory ran out."""

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


def test_memory_run_out_is_told_from_other_errors():
    """What a build says to lower its batch size for: Python's and numpy's MemoryError, PyTorch's
    allocators' words, and a thread that could not start (zarr's, under a tight address-space limit:
    it was a bare "can't start new thread"; failure-injection recheck)."""
    from vfs.errors import out_of_memory

    for error in (
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 321126400 bytes"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("can't start new thread"),
    ):
        assert out_of_memory(error), error
    for error in (
        RuntimeError("the model fails"),
        ValueError("out of memory"),
        OSError(12, "Cannot allocate"),
    ):
        assert not out_of_memory(error), error
