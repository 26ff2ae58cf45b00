"""How a build is stopped from outside: Ctrl-C (SIGINT) and SIGTERM (`kill`, a job scheduler's or
`docker stop`'s stop) raise in the main thread, and the build keeps what it computed (the CLI
says how to resume). A write the main thread is doing is let finish first (`between_writes`): cut
in the middle, its pending images could be half stored."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt: everything that stops a build on Ctrl-C
    stops it so."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def sigterm_stops_builds() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread while this lasts (off the main thread, where no
    handler can be set, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """A build's SIGTERM handler back after the block: `ray.init` puts its own in its place
    (`sys.exit`), which would stop a cluster build without keeping what it computed, or a word."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if before is _raise_terminated and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)


_RAISING = {
    signal.SIGINT: (signal.default_int_handler, KeyboardInterrupt),
    signal.SIGTERM: (_raise_terminated, Terminated),
}
"""The handlers `between_writes` holds, and what each raises: Python's own and ours, not a caller's."""


@contextmanager
def between_writes() -> Iterator[None]:
    """Ctrl-C and SIGTERM held while the block (a write) runs, and raised right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: error for sig, (handler, error) in _RAISING.items() if signal.getsignal(sig) is handler}
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise held[signal.Signals(caught[0])]
