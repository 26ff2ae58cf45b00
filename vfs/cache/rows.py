"""How a cache array's rows are read: decoded by zarr, or straight from their chunk files.

The way is chosen once per array when a cache is opened (`row_reader`): a local cache as VFS
writes it (plain little-endian chunk files, optionally zstd, every chunk stored) is read from
its files — 4× faster than through zarr, whose per-chunk overhead costs more than these files
take to read, and mapped in place for streaming; anything else (remote stores, other codecs,
older caches that may lack all-zero chunks) through zarr. Another way of reading (say, remote
byte ranges) is one more `RowReader` here.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from abc import ABC, abstractmethod
from io import BufferedReader
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from .files import MAX_CHUNK_FILE_BYTES, UnsafeFile, check_zstd, checked_file
from .format import CacheError


class RowReader(ABC):
    """Rows of one array (images along the first axis); damage is a `CacheError` naming the rows."""

    def __init__(self, arr: zarr.Array, location: str):
        self.arr, self.location = arr, location
        self.per = arr.chunks[0]  # rows per chunk

    @abstractmethod
    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1."""

    @abstractmethod
    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Some rows, in the order asked, without reading more of their chunks than needed."""

    def stream(self, start: int, stop: int) -> np.ndarray | list[torch.Tensor]:
        """Rows start..stop-1 for a streamed search: read, or tensors over mapped files."""
        return self.read(start, stop)

    def _missing(self, i: int, key: str, count: int = 1) -> CacheError:
        end = min((i + 1) * self.per, self.arr.shape[0]) - 1
        return CacheError(
            f"the cache at {self.location} is damaged: {self.arr.path} rows {i * self.per}..{end} "
            f"are missing (chunk {key!r}; {count} chunk(s) missing); rerun the build that made it "
            "(the same command computes the missing rows again) or build it anew"
        )

    def _key(self, i: int) -> str:
        return self.arr.metadata.encode_chunk_key((i, *(0,) * (self.arr.ndim - 1)))


class ZarrRows(RowReader):
    """Decoded by zarr: any store, any allowed codec. Where the writer stored every chunk
    (`every_chunk_stored`), a missing chunk is refused — zarr alone would read it as zeros."""

    def __init__(self, arr: zarr.Array, location: str, every_chunk_stored: bool):
        super().__init__(arr, location)
        self.every_chunk_stored = every_chunk_stored

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_stored(range(start, stop))
        return np.asarray(self.arr[start:stop])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        self._check_stored(indices)
        return np.asarray(self.arr.get_orthogonal_selection((indices, *(slice(None),) * (self.arr.ndim - 1))))

    def _check_stored(self, rows: np.ndarray | range) -> None:
        if not self.every_chunk_stored:
            return
        ids = sorted({int(r) // self.per for r in rows})
        keys = [f"{self.arr.path}/{self._key(i)}" for i in ids]
        store = self.arr.store
        if isinstance(store, zarr.storage.LocalStore):
            present = [(Path(store.root) / k).is_file() for k in keys]
        else:

            async def exists() -> list[bool]:
                return list(await asyncio.gather(*(_stored(store, k) for k in keys)))

            present = sync(exists())
        missing = [j for j, ok in enumerate(present) if not ok]
        if missing:
            raise self._missing(ids[missing[0]], keys[missing[0]], len(missing))


async def _stored(store: Store, key: str) -> bool:
    """Whether a remote store holds `key`; a store that does not answer raises. fsspec's HTTP
    `exists` says False to any failure — a server down, or answering 500, read as a lost chunk:
    "the cache is damaged: rerun the build" (review); asked strictly, only a 404 is False."""
    from fsspec.implementations.http import HTTPFileSystem

    fs = getattr(store, "fs", None)
    if isinstance(fs, HTTPFileSystem) and isinstance(store, zarr.storage.FsspecStore):
        return bool(await fs._exists(f"{store.path.rstrip('/')}/{key}", strict=True))  # as zarr joins them
    return await store.exists(key)


class ChunkFileRows(RowReader):
    """Read from the chunk files of a local cache, plain or zstd, every chunk stored (so a missing
    file is damage). Plain files are read at the rows' offsets and mapped for streaming."""

    def __init__(self, arr: zarr.Array, location: str, root: Path, compressed: bool):
        super().__init__(arr, location)
        self.root, self.compressed = root, compressed
        self.real_root = os.path.realpath(root)
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.row_shape = tuple(arr.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        for i, a, b in self._spans(start, stop):
            if self.compressed:
                out[a - start : b - start] = self._chunk(i)[a - i * self.per : b - i * self.per]
            else:
                with self._open(i) as f:
                    self._read_into(f, i, a - i * self.per, out[a - start : b - start])
        return out

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Each row on its own: re-scoring a few images must not read (or decode) their whole chunks
        (compressed chunks are decoded once each)."""
        out = np.empty((len(indices), *self.row_shape), dtype=self.dtype)
        chunks, firsts = np.divmod(np.asarray(indices, dtype=np.int64), self.per)
        for i in np.unique(chunks).tolist():  # each chunk's file opened (and checked) once
            rows = np.flatnonzero(chunks == i)
            if self.compressed:
                out[rows] = self._chunk(i)[firsts[rows]]
                continue
            with self._open(i) as f:
                for j in rows.tolist():
                    self._read_into(f, i, int(firsts[j]), out[j : j + 1])
        return out

    def stream(self, start: int, stop: int) -> np.ndarray | list[torch.Tensor]:
        """Plain files as tensors over their mapped pages (one per file, consecutive): no copy — a
        warm cache is scored straight from the page cache, and the pages are released when the
        tensors are."""
        if self.compressed:
            return self.read(start, stop)
        out = []
        for i, a, b in self._spans(start, stop):
            with self._open(i) as f:
                if os.fstat(f.fileno()).st_size < (b - i * self.per) * self.row_bytes:
                    raise self._truncated(i)
                # Copy-on-write: pages are the page cache's until written (never, here), and a
                # consumer that writes changes its own copy, not the cache.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            count = (b - a) * self.row_bytes // self.dtype.itemsize
            rows = np.frombuffer(
                mapped, dtype=self.dtype, count=count, offset=(a - i * self.per) * self.row_bytes
            )
            out.append(torch.from_numpy(rows).view(b - a, *self.row_shape))
        return out

    def _file(self, i: int) -> Path:
        return self.root / self.arr.path / self._key(i)

    def _open(self, i: int) -> BufferedReader:
        """Chunk i's file, once `checked_file` (no device, pipe or link out of the cache; ≈ 25 µs,
        on every opening: a file replaced since would be read otherwise)."""
        try:
            checked_file(self.real_root, self._file(i), MAX_CHUNK_FILE_BYTES)
            return open(self._file(i), "rb")
        except FileNotFoundError:
            raise self._missing(i, f"{self.arr.path}/{self._key(i)}") from None
        except UnsafeFile as e:
            raise self._damaged(i, str(e)) from None

    def _spans(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(chunk id, first row, end row) of the chunks holding rows start..stop-1, their files
        announced to the kernel for reading ahead (disks want several requests in flight)."""
        spans = [
            (i, max(start, i * self.per), min(stop, (i + 1) * self.per))
            for i in range(start // self.per, (stop - 1) // self.per + 1)
        ]
        if hasattr(os, "posix_fadvise"):
            for i, *_ in spans:
                try:
                    checked_file(self.real_root, self._file(i), MAX_CHUNK_FILE_BYTES)  # never a pipe's wait
                    fd = os.open(self._file(i), os.O_RDONLY)
                except (OSError, UnsafeFile):
                    continue  # reported by the read itself
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                os.close(fd)
        return spans

    def _read_into(self, f: BufferedReader, i: int, first: int, out: np.ndarray) -> None:
        """Rows `first`.. of chunk i's plain file `f` into `out` (contiguous); a file too short is damage."""
        f.seek(first * self.row_bytes)
        got = f.readinto(out.reshape(-1).view(np.uint8).data)
        if got != out.nbytes:
            raise self._truncated(i)

    def _chunk(self, i: int) -> np.ndarray:
        """Chunk i decoded whole (zstd), checked for its size."""
        with self._open(i) as f:
            data = f.read()
        try:
            check_zstd(data, str(self._file(i)), self.per * self.row_bytes)
        except UnsafeFile as e:
            raise self._damaged(i, str(e)) from None
        chunk = np.frombuffer(numcodecs.Zstd().decode(data), dtype=self.dtype)
        expected = self.per * self.row_bytes // self.dtype.itemsize
        if chunk.size != expected:
            raise self._damaged(i, f"their chunk holds {chunk.size} values, not {expected}")
        return chunk.reshape(self.per, *self.row_shape)

    def _truncated(self, i: int) -> CacheError:
        return self._damaged(i, "their chunk file is truncated")

    def _damaged(self, i: int, why: str) -> CacheError:
        return CacheError(
            f"cannot read {self.arr.path} rows {i * self.per}..{(i + 1) * self.per - 1} of the cache at "
            f"{self.location}: {why}; the cache is damaged: rerun its build to repair it, or copy it again"
        )


def row_reader(arr: zarr.Array, location: str, every_chunk_stored: bool) -> RowReader:
    """Chunk files where they are plain little-endian bytes, optionally zstd, of a local cache
    whose every chunk has a file (in older caches a missing file is a chunk of zeros); else zarr."""
    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    names = [type(c).__name__ for c in codecs]
    endian = getattr(codecs[0], "endian", None) if codecs else None
    plain = (
        names in (["BytesCodec"], ["BytesCodec", "ZstdCodec"])
        and str(getattr(endian, "value", endian)) == "little"
    )
    if plain and every_chunk_stored and isinstance(arr.store, zarr.storage.LocalStore):
        return ChunkFileRows(arr, location, Path(arr.store.root), compressed=len(names) == 2)
    return ZarrRows(arr, location, every_chunk_stored)
