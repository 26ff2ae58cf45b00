"""An error as one line: what the CLI's `error:` line, a failed build or a dead shard says of a
third-party exception whose message may run to pages (state-dict mismatches, Ray's remote
tracebacks) or be empty."""

from __future__ import annotations

import re
from typing import Literal

ERROR_CHARS = 300
"""The most characters of an error kept: a state dict's missing keys ran to pages."""


def error_line(
    error: BaseException, part: Literal["whole", "first", "last"] = "whole", named: bool = False
) -> str:
    """`error`'s message in one line of at most `ERROR_CHARS`, terminal colour codes out: the whole
    of it, or its first or last non-blank line (a Ray error ends with its cause, after the remote
    traceback). `named`: after its type's name. An empty message gives the type's name alone."""
    lines = [" ".join(line.split()) for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    text = {"whole": " ".join(lines), "first": lines[0], "last": lines[-1]}[part]
    if len(text) > ERROR_CHARS:
        text = text[: ERROR_CHARS - 1] + "…"
    return f"{type(error).__name__}: {text}" if named else text


_MEMORY_WORDS = ("can't allocate memory", "not enough memory", "out of memory", "can't start new thread")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` says memory ran out: Python's `MemoryError` (numpy's too), PyTorch's
    RuntimeError from its CPU allocator ("can't allocate memory", "not enough memory") or a GPU's
    (`torch.OutOfMemoryError`, "out of memory"), or Python's for a thread it could not start (its
    stack not mapped: zarr's I/O thread under a tight address-space limit)."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _MEMORY_WORDS)
