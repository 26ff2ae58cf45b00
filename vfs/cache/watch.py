"""Whether a cache was rebuilt or finished since it was opened, asked without holding the caller.

A long-lived holder of a cache's rows (a server's pages, a notebook widget) must not show them once
another cache stands at its place. A local cache answers in about a millisecond; one behind a URL
reads its metadata over the network, and a server that hangs held every stroke for its timeout
(reviews). `ReplacementWatch` asks in a background thread, one question at a time, waits for the
answer as long as the caller allows, and leaves a later answer to the next call.
"""

from __future__ import annotations

import math
import threading
import time

from .reader import FeatureCache


class ReplacementWatch:
    """`replaced()`: whether `cache.replaced_on_disk()` said so, in this call or an earlier one —
    once replaced, always (the rows in memory stay the old cache's)."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self._replaced = False
        self._asked = -math.inf  # when the last question went out (time.monotonic)
        self._asking: threading.Thread | None = None  # the question out, if one is
        self._lock = threading.Lock()

    def replaced(self, every_s: float = 0.0, wait_s: float | None = None) -> bool:
        """Asks the disk (or the URL's server) unless a question is out or the last one went out
        less than `every_s` ago, and waits for the answer of a question it asks at most `wait_s`
        (None: until it comes)."""
        with self._lock:
            out = self._asking if self._asking is not None and self._asking.is_alive() else None
            due = not self._replaced and out is None and time.monotonic() - self._asked >= every_s
            if due:
                self._asked = time.monotonic()
                if wait_s is not None:
                    out = self._asking = threading.Thread(target=self._ask, name="vfs-replaced", daemon=True)
                    out.start()
        if due and wait_s is None:
            self._ask()  # waited for in any case: no thread
        elif due and out is not None:  # a question out since an earlier call is not waited for again:
            out.join(wait_s)  # a server that hangs cost every call its wait (review)
        return self._replaced

    def _ask(self) -> None:
        if self.cache.replaced_on_disk():
            self._replaced = True
