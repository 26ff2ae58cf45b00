"""A build stopped from outside (Ctrl-C, SIGTERM) stops between writes, never inside one."""

from __future__ import annotations

import os
import signal

import pytest

from vfs.interrupts import Terminated, between_writes, sigterm_stops_builds


@pytest.mark.parametrize(
    ("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)]
)
def test_a_signal_during_a_write_is_raised_after_it(sig, raised):
    """The Ray build writes on the main thread: cut there, its pending images could be half stored."""
    done = []
    with sigterm_stops_builds(), pytest.raises(raised):
        with between_writes():
            os.kill(os.getpid(), sig)
            done.append("the rest of the write")
    assert done == ["the rest of the write"]


def test_sigterm_raises_only_while_a_build_runs():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_stops_builds(), pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    with between_writes():  # no build's handler: SIGTERM is not ours to hold
        assert signal.getsignal(signal.SIGTERM) is before


def test_a_callers_own_handler_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with between_writes():
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT]  # called at once, as the caller asked, and nothing raised
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_build_keeps_its_sigterm_handler_through_ray_init():
    """ray.init sets SIGTERM to sys.exit: a cluster build stopped with no word and nothing flushed."""
    import sys

    from vfs.interrupts import sigterm_kept

    with sigterm_stops_builds():
        ours = signal.getsignal(signal.SIGTERM)
        with sigterm_kept():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) is ours
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
    theirs = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # no build: another's handler is left as set
    try:
        with sigterm_kept():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, theirs)
