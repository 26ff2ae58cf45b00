"""What a local cache's files may be, checked before a byte of one is read.

A cache from someone else (a shared folder, an unpacked archive) may hold a link out of it, a
device (`/dev/zero`: a read without end), a pipe (a read that waits for ever), a file of any size or
a zstd frame that declares any size: each read would then take what the cache's author chose, not
what its metadata declares. Every file a reader opens is a regular file inside the cache, of at
most `MAX_METADATA_BYTES` (metadata) or `MAX_CHUNK_FILE_BYTES` (a chunk), and a zstd chunk declares
at most `MAX_CHUNK_BYTES` decoded. (A file swapped between the check and the read is not covered.)
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from .format import MAX_CHUNK_BYTES

MAX_METADATA_BYTES = 64 << 20
"""A `zarr.json`: a few KB, more with a long build report (100,000 skipped images ≈ 20 MB)."""
MAX_CHUNK_FILE_BYTES = MAX_CHUNK_BYTES + (MAX_CHUNK_BYTES >> 7) + (1 << 16)
"""The largest chunk, stored as it is or zstd-compressed (zstd's bound on incompressible data)."""
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class UnsafeFile(ValueError):
    """A cache's file that no build writes: its readers say which rows or table it held."""


def checked_file(root: str, path: str | Path, limit: int) -> int:
    """The size of `path`, a file of the cache whose real path is `root`, or `UnsafeFile` where it
    is not a regular file inside the cache of at most `limit` bytes; FileNotFoundError where there
    is none (missing chunks are the caller's to judge)."""
    real = os.path.realpath(path)
    if os.path.commonpath((root, real)) != root:
        raise UnsafeFile(f"{path} leads out of the cache (to {real}): a cache holds only its own files")
    mode = os.stat(real)
    if not stat.S_ISREG(mode.st_mode):
        raise UnsafeFile(f"{path} is no regular file (a device, a pipe?): a cache holds only its own files")
    if mode.st_size > limit:
        raise UnsafeFile(f"{path} holds {mode.st_size:,} bytes, more than a cache's file may ({limit:,})")
    return mode.st_size


def zstd_content_size(data: bytes | np.ndarray) -> int | None:
    """The decoded size a zstd frame declares in its header (RFC 8878, 3.1.1.1); None where `data`
    is no zstd frame or declares none (numcodecs reads it, but does not say it)."""
    head = bytes(data[:18])
    if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
        return None
    descriptor = head[4]
    single_segment = (descriptor >> 5) & 1
    field = (0 if not single_segment else 1, 2, 4, 8)[descriptor >> 6]
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    if field == 0 or len(head) < at + field:
        return None
    return int.from_bytes(head[at : at + field], "little") + (256 if field == 2 else 0)


def check_zstd(data: bytes | np.ndarray, path: str, limit: int = MAX_CHUNK_BYTES) -> None:
    """Refuse (`UnsafeFile`) a zstd frame that would decode to more than `limit` bytes, or that
    declares no size (cut short; numcodecs would decode such a frame whole, whatever its size)."""
    size = zstd_content_size(data)
    if size is None:
        raise UnsafeFile(f"{path} holds no zstd frame that declares its decoded size (cut short?)")
    if size > limit:
        raise UnsafeFile(f"{path} declares {size:,} bytes decoded, more than its chunk may ({limit:,})")


class CacheStore(zarr.storage.LocalStore):
    """A local cache's store as `open_cache` reads it: every file checked (`checked_file`), and the
    declared size of a zstd-coded array's chunk (`check_zstd`) before zarr decodes it."""

    @cached_property
    def real_root(self) -> str:
        return os.path.realpath(self.root)

    @cached_property
    def _zstd_arrays(self) -> dict[str, bool]:
        return {}

    def _exists(self, key: str) -> bool:
        """Whether the key's file is there, once checked."""
        limit = MAX_METADATA_BYTES if key.rsplit("/", 1)[-1] == "zarr.json" else MAX_CHUNK_FILE_BYTES
        try:
            checked_file(self.real_root, Path(self.root) / key, limit)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    async def _uses_zstd(self, key: str) -> bool:
        """Whether `key` is a chunk of an array coded with zstd (default chunk keys: `<array>/c/0/…`)."""
        parts = key.split("/")
        marks = [i for i, p in enumerate(parts) if p == "c" and all(q.isdigit() for q in parts[i + 1 :])]
        if not marks:
            return False
        array = "/".join(parts[: marks[-1]])
        if array not in self._zstd_arrays:
            meta = await self.get(f"{array}/zarr.json" if array else "zarr.json", default_buffer_prototype())
            codecs = json.loads(meta.to_bytes()).get("codecs", []) if meta is not None else []
            self._zstd_arrays[array] = any(isinstance(c, dict) and c.get("name") == "zstd" for c in codecs)
        return self._zstd_arrays[array]

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if not self._exists(key):
            return None
        data = await super().get(key, prototype, byte_range)
        if data is not None and byte_range is None and await self._uses_zstd(key):
            check_zstd(data.as_numpy_array(), f"{self.root}/{key}")
        return data

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._exists(key)  # refuses what is no file of the cache; a missing one reads as None
        return await super().get_partial_values(prototype, key_ranges)
