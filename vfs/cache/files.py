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
_ZSTD_MAGIC = 0xFD2FB528  # a frame's first 4 bytes, little-endian


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


def zstd_decoded_size(data: bytes | np.ndarray) -> int | None:
    """The decoded size zstd data declares: its frames' content sizes summed (RFC 8878: each
    frame's header, its blocks walked to its end; skippable frames passed over). None where some
    frame declares none, or the data is no sequence of whole frames: numcodecs decodes every frame,
    whatever the first declares, and a frame that declares nothing whole."""
    raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.ascontiguousarray(data).reshape(-1)
    view = raw.view(np.uint8).data
    at, total, end = 0, 0, len(view)
    while at < end:
        if end - at < 8:
            return None
        magic = int.from_bytes(view[at : at + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: its length, then that many bytes
            at += 8 + int.from_bytes(view[at + 4 : at + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            return None
        descriptor = view[at + 4]
        single_segment = (descriptor >> 5) & 1
        field = (single_segment, 2, 4, 8)[descriptor >> 6]  # the content size's bytes
        at += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
        if field == 0 or end - at < field:
            return None
        total += int.from_bytes(view[at : at + field], "little") + (256 if field == 2 else 0)
        at += field
        last = 0
        while not last:  # blocks: a 3-byte header (last, type, size), then its bytes (an RLE block: 1)
            if end - at < 3:
                return None
            header = int.from_bytes(view[at : at + 3], "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                return None
            at += 3 + (1 if kind == 1 else size)
        at += 4 if descriptor & 4 else 0  # the content checksum
    return total if at == end else None


def check_zstd(data: bytes | np.ndarray, path: str, limit: int) -> None:
    """Refuse (`UnsafeFile`) zstd data that would decode to more than `limit` bytes, or that does
    not declare what it decodes to (cut short; numcodecs would decode such data whole)."""
    size = zstd_decoded_size(data)
    if size is None:
        raise UnsafeFile(f"{path} holds no zstd frames that declare their decoded size (cut short?)")
    if size > limit:
        raise UnsafeFile(f"{path} declares {size:,} bytes decoded, more than its chunk may ({limit:,})")


class ChunkBounds:
    """What a cache's store checks of a zstd-coded array's chunk before zarr decodes it: its
    declared decoded size, at most a chunk of the array's (`MAX_CHUNK_BYTES` for strings). Chunk
    keys are the default ones, `<array>/c/0/…` (`check_array` refuses others)."""

    @cached_property
    def _bounds(self) -> dict[str, int | None]:
        """Each array's bound, by its path, read from its metadata once."""
        return {}

    async def chunk_bound(self, key: str) -> int | None:
        """The decoded bytes `key`'s chunk may have where its array is zstd-coded, else None."""
        parts = key.split("/")
        marks = [i for i, p in enumerate(parts) if p == "c" and all(q.isdigit() for q in parts[i + 1 :])]
        if not marks:
            return None
        array = "/".join(parts[: marks[-1]])
        bounds = self._bounds
        if array not in bounds:
            meta = await self.get(f"{array}/zarr.json" if array else "zarr.json", default_buffer_prototype())  # type: ignore[attr-defined]
            bounds[array] = None if meta is None else _zstd_chunk_bytes(json.loads(meta.to_bytes()))
        return bounds[array]

    async def checked(self, key: str, data: Buffer | None, byte_range: ByteRequest | None) -> Buffer | None:
        if data is not None and byte_range is None and (bound := await self.chunk_bound(key)) is not None:
            check_zstd(data.as_numpy_array(), key, bound)
        return data


def _zstd_chunk_bytes(meta: dict) -> int | None:
    """A chunk's bytes decoded for an array whose codecs include zstd (None: no zstd)."""
    codecs = meta.get("codecs", [])
    if not any(isinstance(c, dict) and c.get("name") == "zstd" for c in codecs):
        return None
    try:
        shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        return int(np.prod(shape)) * np.dtype(meta["data_type"]).itemsize
    except (KeyError, TypeError, ValueError):  # strings ("string", vlen): as many as a chunk may hold
        return MAX_CHUNK_BYTES


class CacheStore(ChunkBounds, zarr.storage.LocalStore):
    """A local cache's store as `open_cache` reads it: every file checked (`checked_file`), and a
    zstd-coded array's chunk (`ChunkBounds`) before zarr decodes it."""

    @cached_property
    def real_root(self) -> str:
        return os.path.realpath(self.root)

    def _exists(self, key: str) -> bool:
        """Whether the key's file is there, once checked."""
        limit = MAX_METADATA_BYTES if key.rsplit("/", 1)[-1] == "zarr.json" else MAX_CHUNK_FILE_BYTES
        try:
            checked_file(self.real_root, Path(self.root) / key, limit)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if not self._exists(key):
            return None
        return await self.checked(key, await super().get(key, prototype, byte_range), byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._exists(key)  # refuses what is no file of the cache; a missing one reads as None
        return await super().get_partial_values(prototype, key_ranges)


class RemoteCacheStore(ChunkBounds, zarr.storage.FsspecStore):
    """A cache at a URL as `open_cache` reads it: a zstd-coded array's chunk checked
    (`ChunkBounds`) before zarr decodes it. (What a server sends is bounded by time alone.)"""

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self.checked(key, await super().get(key, prototype, byte_range), byte_range)
