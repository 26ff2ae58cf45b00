"""One build per cache: a lock file beside the output, taken before the cache exists."""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from types import ModuleType

from .format import CacheError

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows: the lock falls back to a pid file
    fcntl = None


class BuildLock:
    """One build per output. `<out>.lock` is locked with flock(2), which the kernel releases when
    the owner exits or is killed, so a dead build never blocks the next one (and a reused pid
    cannot fake an owner); the file names the owner (pid, host) for the refusal message.
    Without fcntl (Windows) the file's existence is the lock and a dead owner's pid is ignored.

    On read-only media (EROFS: nothing there can be written, by anyone) the lock is refused with
    the reason (`refusal`), unless `read_only_ok` and the cache is there: then no lock is taken,
    and `unwritable` says so, for a rerun of a finished build to answer "complete" (any write
    fails). A folder merely not writable by this user (EACCES) is no such case: another user's
    build may hold the lock, and the error is the system's."""

    def __init__(self, out: str | Path, read_only_ok: bool = False):
        # "x.zarr/" is x.zarr (its lock never inside it); a link to it, or through a linked folder,
        # is it too (one lock for both names); "." a name
        cache = Path(os.path.realpath(out))
        if not cache.name:
            raise CacheError(f"{str(out)!r} names no folder to build a cache in; name one (caches/c.zarr)")
        self.path = cache.with_name(cache.name + ".lock")  # beside the cache: taken before it exists
        self._fd: int | None = None
        self._read_only_ok = read_only_ok
        self.unwritable: OSError | None = None

    def _refuse(self, owner: str) -> CacheError:
        return CacheError(
            f"another build is writing {self.path.with_suffix('')} (lock {self.path}: "
            f"{owner.strip() or 'owner unknown'}); wait for it to finish or stop it first"
        )

    def refusal(self) -> CacheError:
        """Why nothing can be done to the cache in a folder on read-only media."""
        cache = self.path.with_suffix("")
        return CacheError(
            f"cannot build or change {cache}: its folder {cache.parent} is on read-only media; "
            "build into a writable folder, or resume it where it can be written"
        )

    def refuse_unwritable_cache(self) -> None:
        """Refuse, before anything is computed, to resume a cache whose own folder cannot be written
        though the folder holding it can (mounted read-only on its own; not this user's to write):
        the first write failed after a batch's work, as "[Errno 30] Read-only file system: '….zarr/
        features/c'" (review). One file made and removed in it tells."""
        cache = self.path.with_suffix("")
        try:
            with tempfile.TemporaryFile(dir=cache):
                pass
        except OSError as e:
            why = "is on read-only media" if e.errno == errno.EROFS else f"cannot be written ({e.strerror})"
            raise CacheError(
                f"cannot build or change {cache}: the cache's folder {why}; resume it where it can be "
                "written, or build into another folder"
            ) from e

    def _refuse_a_file_above(self) -> None:
        """Refuse, in words, an output under a file: mkdir's bare "[Errno 17] File exists" or
        "[Errno 20] Not a directory" came after the model had loaded (review)."""
        above = next((folder for folder in self.path.parents if folder.exists()), None)
        if above is not None and not above.is_dir():
            raise CacheError(
                f"cannot build {self.path.with_suffix('')}: {above} is a file, not a folder; "
                "choose another output"
            )

    def refuse_if_held(self) -> None:
        """Refuse now where another build holds the lock, or where no folder can hold the output,
        before a build spends seconds loading its model only to be refused (review); the lock itself
        is taken later, by `with`."""
        self._refuse_a_file_above()
        if fcntl is None:
            if self.path.exists() and self._owner_alive():
                raise self._refuse(self.path.read_text())
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file: no build there (or none this user may see)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while an exclusive lock is held
        except OSError:
            raise self._refuse(os.read(fd, 4096).decode(errors="replace")) from None
        finally:
            os.close(fd)  # a shared lock, if taken, goes with it

    def __enter__(self) -> BuildLock:
        self._refuse_a_file_above()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
            return self._enter_pidfile(owner) if fcntl is None else self._enter_flock(owner)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            if not (self._read_only_ok and self.path.with_suffix("").is_dir()):
                raise self.refusal() from e
            self.unwritable = e
            return self

    def _enter_flock(self, owner: bytes) -> BuildLock:
        assert fcntl is not None
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flocked(fd):  # held by a live process
                text = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise self._refuse(text)
            try:  # the previous owner may have removed the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, owner)
                self._fd = fd
                return self
            os.close(fd)
        raise CacheError(f"cannot take the build lock {self.path}")

    def _enter_pidfile(self, owner: bytes) -> BuildLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    raise self._refuse(self.path.read_text()) from None
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, owner)
            os.close(fd)
            return self
        raise CacheError(f"cannot take the build lock {self.path}")

    def _owner_alive(self) -> bool:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        if owner.get("host") != socket.gethostname():
            return True  # cannot tell: be safe
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError, ValueError):
            return True
        return True

    def __exit__(self, *exc: object) -> None:
        if self.unwritable is None:
            self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _flocked(fd: int, tries: int = 3, wait_s: float = 0.05) -> bool:
    """Whether an exclusive flock on `fd` was taken, trying a few times: another process's
    `refuse_if_held` holds a shared one for an instant, which alone must refuse no build (review)."""
    assert fcntl is not None
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(wait_s)
    return False
