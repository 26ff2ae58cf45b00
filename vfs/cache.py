"""Feature cache format v1: a zarr v3 group holding one layer's feature maps for a dataset.

Layout (see docs/cache-format.md): `features` float16 (N, h, w, C), `sqnorm` float32 (N, h, w),
`thumbs` uint8 (N, S, S, 3), `manifest/<column>` strings (N,), and JSON attributes describing
what the cache is of (`CacheSpec`), its build report and progress. A build appends chunk by
chunk and records progress only after the chunk's data is stored, so a killed build resumes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import numcodecs
import numpy as np
import pandas as pd
import torch
import zarr
from zarr.core.sync import sync

from .sources import even_slices

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to a pid file
    fcntl = None

FORMAT = "vfs-feature-cache"
FORMAT_VERSION = 1
CHUNK_BYTES = 16 << 20  # features per chunk: large enough to stream well, small enough to resume often
CHUNK_MAX_IMAGES = 256
THUMB_CHUNK = 16  # thumbnails are read a page of results at a time: small chunks, few wasted decodes
DEFAULT_MEMORY_BUDGET = 4 << 30
MAX_CHUNK_BYTES = 1 << 30
"""Largest chunk a cache may declare (VFS writes ≤ 16 MB of features, ≤ 40 MB of thumbnails): a chunk is
decoded whole, so a hostile cache declaring huge chunks would otherwise make each read allocate that much."""
FSYNC = os.environ.get("VFS_FSYNC", "1") != "0"
"""Flush each chunk's files to disk before its progress is recorded (power-loss safety; `VFS_FSYNC=0` skips it)."""
# Codecs a cache's arrays may use. Caches come from strangers (URLs, shared folders): anything
# else (a plugin codec, an object codec) is refused before a byte of data is decoded.
SAFE_CODECS = frozenset({"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose", "vlen-utf8", "vlen-bytes",
                         "sharding_indexed"})
_ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's LocalStore writes `<key>.<uuid4 hex>.partial`, then renames


class CacheError(ValueError):
    """A cache that cannot be used, with the reason."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache is of: travels through a build and is written into the cache's attributes."""

    model: str
    layer: str
    input_size: int
    grid: tuple[int, int]
    channels: int
    preprocess: dict
    data: dict  # vfs.data.DataSpec.to_dict()

    def to_dict(self) -> dict:
        return asdict(self) | {"grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSpec":
        return cls(**{**d, "grid": tuple(d["grid"])})

    def mismatch(self, other: "CacheSpec") -> str | None:
        """Why two specs do not describe the same cache (None when they do)."""
        a, b = self.to_dict(), other.to_dict()
        diffs = [f"{k}: {a[k]!r} ≠ {b[k]!r}" for k in a if a[k] != b[k]]
        return "; ".join(diffs) or None


def library_versions() -> dict[str, str]:
    from . import __version__

    out = {"vfs": __version__}
    for name in ("torch", "torchvision", "timm", "zarr", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _is_url(path: str | Path) -> bool:
    return "://" in str(path)


class FeatureCache:
    """A cache opened for reading: arrays, spec, manifest, and search access (see vfs.search).

    Reads that fail (a chunk file deleted or truncated, a remote store that stops answering)
    raise `CacheError` naming the cache and the rows, never a raw zarr / codec error; a chunk
    file that is missing is an error too (zarr alone would read it as zeros). An incomplete cache
    (its build is running or was interrupted) opens, for its description and a resume, but is
    searched only when opened with `allow_partial=True`: then it holds the images stored so far.
    """

    def __init__(self, group: zarr.Group, location: str, allow_partial: bool = False):
        self.group, self.location = group, location
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{location} is not a VFS feature cache (no '{FORMAT}' attribute)")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{location} has format version {attrs.get('format_version')}; this VFS reads version {FORMAT_VERSION}")
        self.attrs = attrs
        self.allow_partial = allow_partial
        try:
            self.spec = CacheSpec.from_dict(attrs["spec"])
            self.n = int(attrs["n"])
            if not self.complete and allow_partial:
                self.n = int(attrs["progress"]["rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{location}: its attributes are damaged ({type(e).__name__}: {e})") from e
        try:
            self.features, self.sqnorm, self.thumbs = group["features"], group["sqnorm"], group["thumbs"]
        except KeyError as e:
            raise CacheError(f"{location} is missing the array {e}") from e
        except Exception as e:  # noqa: BLE001 - metadata zarr cannot parse (unknown codec, data type, ...)
            raise CacheError(f"{location}: an array's metadata cannot be read ({type(e).__name__}: {e})") from e
        for arr, dtype in ((self.features, "float16"), (self.sqnorm, "float32"), (self.thumbs, "uint8")):
            _check_array(arr, location, dtype)
            if int(np.prod(arr.chunks)) * arr.dtype.itemsize > MAX_CHUNK_BYTES:
                raise CacheError(f"{location}: array {arr.path!r} declares chunks {arr.chunks} of more than "
                                 f"{MAX_CHUNK_BYTES >> 20} MiB each; VFS does not read such caches")
        h, w = self.spec.grid
        expect = (self.features.shape[0], h, w, self.spec.channels)
        if self.features.shape != expect or self.sqnorm.shape != expect[:3] or self.features.shape[0] < self.n:
            raise CacheError(f"{location}: array shapes {self.features.shape}/{self.sqnorm.shape} do not match the spec {expect}")
        self._resident: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._manifest: pd.DataFrame | None = None
        every_chunk_stored = bool(attrs.get("all_chunks_stored"))
        self._plain_roots = {a.path: _plain_chunk_root(a, every_chunk_stored) for a in (self.features, self.sqnorm)}
        # Uncompressed feature chunk files are read (or mapped) directly, without zarr.
        self._raw_features = self._plain_roots["features"] is not None and len(self.features.metadata.codecs) == 1

    # --- what it is -------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def stored(self) -> int:
        """Images stored so far: all of them once complete, the build's progress before."""
        return self.n if self.complete else int(self.attrs.get("progress", {}).get("rows", 0))

    @property
    def nonnegative(self) -> bool:
        """Every stored feature is ≥ 0 (as recorded by the build; caches written before say nothing)."""
        recorded = self.attrs if self.complete else self.attrs.get("progress", {})
        return recorded.get("nonnegative") is True

    @property
    def report(self) -> dict:
        return self.attrs.get("report", {})

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, h, w, C) of what can be searched: refused (CacheError) for an incomplete cache not
        opened with allow_partial, so that a search says why rather than finding no images."""
        self.check_searchable()
        h, w = self.spec.grid
        return self.n, h, w, self.spec.channels

    @property
    def nbytes(self) -> int:
        h, w = self.spec.grid
        return self.n * h * w * self.spec.channels * 2

    @property
    def label_col(self) -> str | None:
        return self.spec.data.get("label_col")

    @property
    def domain_col(self) -> str | None:
        return self.spec.data.get("domain_col")

    @property
    def manifest(self) -> pd.DataFrame:
        """Relative path and every label / domain / metadata column, one row per image."""
        if self._manifest is None:
            with self._reading("the manifest"):
                if self.complete:
                    if "manifest" not in self.group:
                        raise CacheError(f"{self.location} has no manifest although it is marked complete")
                    self._manifest = _read_table(self.group, "manifest", self.n)
                elif self.allow_partial and "candidates" in self.group:
                    _check_array(self.group["source_index"], self.location, "int64")
                    index = self.group["source_index"][: self.n]
                    self._manifest = _read_table(self.group, "candidates").iloc[index].reset_index(drop=True)
                else:
                    raise CacheError(f"{self.location} has no manifest: the build did not finish")
        return self._manifest

    @property
    def domains(self) -> np.ndarray | None:
        return None if not self.domain_col else self.manifest[self.domain_col].to_numpy()

    def info(self) -> dict:
        """A JSON-able summary (the CLI's `info --json`)."""
        return {
            "location": self.location, "format_version": FORMAT_VERSION, "complete": self.complete,
            "n": self.n, "stored": self.stored, "spec": self.spec.to_dict(), "chunk": self.features.chunks[0],
            "nbytes_features": self.nbytes, "report": self.report,
            "created": self.attrs.get("created"), "versions": self.attrs.get("versions", {}),
        }

    def check_extractor(self, description: dict) -> None:
        """Refuse an extractor that is not the one the cache was built with (model, layer, input size, grid)."""
        mine = {"spec": self.spec.model, "layer": self.spec.layer, "input_size": self.spec.input_size,
                "grid": list(self.spec.grid), "channels": self.spec.channels}
        for key, value in mine.items():
            theirs = description.get(key)
            if key == "grid" and theirs is not None:
                theirs = list(theirs)
            if key in ("spec", "layer", "input_size") or theirs is not None:
                if theirs != value:
                    raise CacheError(f"the cache {self.location} was built with {key} {value!r}, "
                                     f"not {theirs!r}: its features cannot be compared with this extractor's")

    def check_searchable(self) -> None:
        """Refuse to search an incomplete cache unless it was opened with `allow_partial=True`."""
        if not self.complete and not self.allow_partial:
            total = self.features.shape[0]
            raise CacheError(
                f"{self.location} is incomplete: its build is running or was interrupted ({self.stored} of "
                f"{total} images stored). Finish the build (rerun the same build to resume it), or open it "
                f"with allow_partial=True to search the images stored so far.")

    # --- reading ----------------------------------------------------------------------------
    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn whatever zarr, a codec or a store raises into a CacheError saying where and what."""
        try:
            yield
        except CacheError:
            raise
        except Exception as e:  # zarr, numcodecs, fsspec and OSError all surface here
            raise CacheError(f"cannot read {what} of the cache at {self.location} ({type(e).__name__}: {e}); "
                             f"the cache is damaged or unreachable: rebuild or re-download it") from e

    def _check_chunks(self, rows: np.ndarray | range, arrays: tuple[str, ...] = ("features", "sqnorm")) -> None:
        """A chunk file that is missing reads as zeros in zarr: refuse it instead, naming the rows.

        Only for caches whose writer stored every chunk (`all_chunks_stored`); older ones may
        legitimately lack all-zero chunks."""
        if not self.attrs.get("all_chunks_stored"):
            return
        for name in arrays:
            arr = self.group[name]
            per = arr.chunks[0]
            ids = sorted({int(r) // per for r in rows})
            tail = (0,) * (arr.ndim - 1)
            keys = [f"{arr.path}/{arr.metadata.encode_chunk_key((i, *tail))}" for i in ids]
            store = arr.store
            if isinstance(store, zarr.storage.LocalStore):
                present = [(Path(store.root) / k).is_file() for k in keys]
            else:
                async def _exists(ks=keys, st=store):
                    import asyncio
                    return await asyncio.gather(*(st.exists(k) for k in ks))
                present = sync(_exists())
            missing = [i for i, ok in zip(ids, present) if not ok]
            if missing:
                i = missing[0]
                raise CacheError(
                    f"the cache at {self.location} is damaged: {name} rows {i * per}..{min((i + 1) * per, self.n) - 1} "
                    f"are missing (chunk {keys[ids.index(i)]!r}; {len(missing)} chunk(s) missing); rebuild it")

    def thumb(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"image {index} is outside 0..{self.n - 1}")
        self._check_chunks([index], ("thumbs",))
        with self._reading(f"the thumbnail of row {index}"):
            return self.thumbs[index]

    def thumbs_at(self, indices) -> np.ndarray:
        """(m, S, S, 3) thumbnails of some images in one read (each chunk decoded once), with the
        same checks as `thumb` (missing chunk → CacheError, read errors → CacheError)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"images outside 0..{self.n - 1}")
        self._check_chunks(idx, ("thumbs",))
        with self._reading(f"the thumbnails of rows {_describe_rows(idx)}"):
            return self.thumbs.get_orthogonal_selection((idx, slice(None), slice(None), slice(None)))

    def resident_on(self, device: torch.device) -> torch.Tensor | None:
        """The fp16 features if loaded whole on `device` (see `resident`), else None."""
        held = self._resident.get(device)
        return None if held is None else held[0]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        self.check_searchable()
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"rows outside 0..{self.n - 1}")
        held = self.resident_on(torch.device("cpu"))
        if held is not None:
            return held.index_select(0, torch.from_numpy(idx)).numpy()  # 3× faster than [idx]
        self._check_chunks(idx, ("features",))
        with self._reading(f"the features of rows {_describe_rows(idx)}"):
            if not self._raw_features:
                return self.features.get_orthogonal_selection((idx, slice(None), slice(None), slice(None)))
            return self._read_raw_rows(idx)

    def _read_raw_rows(self, idx: np.ndarray) -> np.ndarray:
        """Scattered rows read from their uncompressed chunk files, each on its own: re-scoring a few
        images must not read (or decode) their whole chunks."""
        out = np.empty((len(idx), *self.features.shape[1:]), dtype=np.float16)
        per = self.features.chunks[0]
        for j, r in enumerate(idx):
            self._read_chunk_rows(int(r) // per, int(r) % per, out[j:j + 1])
        return out

    def _read_chunk_rows(self, i: int, first: int, out: np.ndarray) -> None:
        """Rows `first`.. of feature chunk i's uncompressed file into `out` (fp16, contiguous);
        a file too short for them is damage."""
        with open(self._chunk_file(self.features, i), "rb") as f:
            f.seek(first * out[0].nbytes)
            got = f.readinto(memoryview(out.reshape(-1)).cast("B"))
        if got != out.nbytes:
            raise self._truncated(i)

    def describe_rows(self, indices: np.ndarray, grid_boxes: list[tuple[int, int, int, int]]) -> pd.DataFrame:
        """Path, label, domain and the pixel box (in the model-input view) of some images."""
        m = self.manifest.iloc[np.asarray(indices, dtype=np.int64)]
        h, w = self.spec.grid
        s = self.spec.input_size
        out = pd.DataFrame({
            "path": m["path"].to_numpy(),
            "pixel_box": [(round(y0 * s / h), round(x0 * s / w), round(y1 * s / h), round(x1 * s / w))
                          for y0, x0, y1, x1 in grid_boxes],
        })
        out["label"] = m[self.label_col].to_numpy() if self.label_col else None
        out["domain"] = m[self.domain_col].to_numpy() if self.domain_col else None
        return out

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self._read_features(start, stop), self._read_sqnorm(start, stop)

    def _read_features(self, start: int, stop: int) -> np.ndarray:
        self._check_chunks(range(start, stop))
        with self._reading(f"rows {start}..{stop - 1}"):
            if self._raw_features:
                return self._read_raw_features(start, stop)
            return self.features[start:stop]

    def _chunk_file(self, arr: zarr.Array, i: int) -> Path:
        return self._plain_roots[arr.path] / arr.path / arr.metadata.encode_chunk_key((i, *(0,) * (arr.ndim - 1)))

    def _read_raw_features(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.features.shape[1:]), dtype=np.float16)
        for i, a, b, _ in self._chunk_files(start, stop, announce=True):
            self._read_chunk_rows(i, a - i * self.features.chunks[0], out[a - start:b - start])
        return out

    def _map_features(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows start..stop-1 as fp16 tensors over their chunk files mapped into memory (one per
        file, consecutive): no copy — a warm cache is scored straight from the page cache, and the
        pages are released when the tensors are."""
        per, row_bytes = self.features.chunks[0], int(np.prod(self.features.shape[1:])) * 2
        out = []
        with self._reading(f"rows {start}..{stop - 1}"):
            for i, a, b, path in self._chunk_files(start, stop, announce=True):
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    self._check_chunks(range(a, b), ("features",))  # names the missing rows
                    raise
                with f:
                    if os.fstat(f.fileno()).st_size < (b - i * per) * row_bytes:
                        raise self._truncated(i)
                    # Copy-on-write: pages are the page cache's until written (never, here), and a
                    # consumer that writes changes its own copy, not the cache.
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                rows = np.frombuffer(mapped, dtype="<f2", count=(b - a) * row_bytes // 2, offset=(a - i * per) * row_bytes)
                out.append(torch.from_numpy(rows).view(b - a, *self.features.shape[1:]))
        return out

    def _chunk_files(self, start: int, stop: int, announce: bool = False) -> list[tuple[int, int, int, Path]]:
        """(chunk id, first row, end row, file) of the feature chunks holding rows start..stop-1; `announce`
        asks the kernel to read them all ahead (disks want several requests in flight)."""
        per = self.features.chunks[0]
        out = [(i, max(start, i * per), min(stop, (i + 1) * per), self._chunk_file(self.features, i))
               for i in range(start // per, (stop - 1) // per + 1)]
        if announce and hasattr(os, "posix_fadvise"):
            for *_, path in out:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # reported by the read itself
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                os.close(fd)
        return out

    def _truncated(self, i: int) -> CacheError:
        per = self.features.chunks[0]
        return CacheError(f"cannot read rows {i * per}..{(i + 1) * per - 1} of the cache at {self.location}: "
                          "their chunk file is truncated; the cache is damaged: rebuild or re-download it")

    def _read_sqnorm(self, start: int, stop: int) -> np.ndarray:
        """Squared norms, checked: a NaN / inf feature shows up in its cell's norm."""
        with self._reading(f"sqnorm rows {start}..{stop - 1}"):
            q = self._read_plain(self.sqnorm, start, stop) if self._plain_roots["sqnorm"] else self.sqnorm[start:stop]
        if not np.isfinite(q).all():
            bad = start + int(np.flatnonzero(~np.isfinite(q).reshape(len(q), -1).all(1))[0])
            raise CacheError(f"the cache at {self.location} holds NaN or inf features (first at row {bad}); rebuild it")
        return q

    def _read_plain(self, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        """Rows of an array with plain (optionally zstd) chunk files, read and decoded here: zarr's
        per-chunk overhead costs more than these small files take to read."""
        per, shape = arr.chunks[0], arr.chunks[1:]
        zstd = len(arr.metadata.codecs) == 2
        parts = []
        for i in range(start // per, (stop - 1) // per + 1):
            try:
                data = self._chunk_file(arr, i).read_bytes()
            except FileNotFoundError:
                self._check_chunks(range(i * per, min((i + 1) * per, self.n)), (arr.path,))
                raise
            chunk = np.frombuffer(numcodecs.Zstd().decode(data) if zstd else data, dtype=arr.dtype.newbyteorder("<"))
            if chunk.size != per * int(np.prod(shape)):
                raise CacheError(f"cannot read {arr.path} rows {i * per}..{(i + 1) * per - 1} of the cache at {self.location}: "
                                 f"their chunk holds {chunk.size} values, not {per * int(np.prod(shape))}; "
                                 "the cache is damaged: rebuild or re-download it")
            parts.append(chunk.reshape(per, *shape)[max(start - i * per, 0):min(stop - i * per, per)])
        return np.concatenate(parts)

    def _chunk_ranges(self, rows_per_chunk: int) -> list[tuple[int, int]]:
        return [(a, min(a + rows_per_chunk, self.n)) for a in range(0, self.n, rows_per_chunk)]

    def resident(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as fp16 / fp32 tensors on `device`, loaded once, chunk by chunk."""
        self.check_searchable()
        with self._lock:
            if device not in self._resident:
                x = torch.empty(self.shape, dtype=torch.float16, device=device)
                s = torch.empty(self.shape[:3], dtype=torch.float32, device=device)
                for a, b in self._chunk_ranges(self.features.chunks[0]):
                    f, q = self._read(a, b)
                    x[a:b].copy_(torch.from_numpy(f))
                    s[a:b].copy_(torch.from_numpy(q))
                self._resident[device] = (x, s)
            return self._resident[device]

    def fits(self, device: torch.device, memory_budget: int | None) -> bool:
        if memory_budget is not None:
            return self.nbytes * 1.1 <= memory_budget
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return self.nbytes * 1.1 <= 0.6 * free
        return self.nbytes <= DEFAULT_MEMORY_BUDGET

    def chunks(self, device: torch.device, memory_budget: int | None = None
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Resident when it fits the budget; otherwise streamed from storage with one chunk prefetched."""
        self.check_searchable()
        row_bytes = int(np.prod(self.shape[1:])) * 2
        if device in self._resident or self.fits(device, memory_budget):
            x, s = self.resident(device)
            for a, b in even_slices(self.n, row_bytes):
                yield a, x[a:b], s[a:b]
            return
        rows = ((1 << 30) if device.type == "cuda" else (256 << 20)) // row_bytes  # a streamed range, before the limits below
        if memory_budget is not None:  # two chunks in flight must fit the budget
            rows = max(1, min(rows, memory_budget // 4 // (2 * row_bytes)))
        per = self.features.chunks[0]
        # Whole stored chunks (none decoded twice), at most 32 files a range: each mapped file holds a descriptor.
        rows = max(per, min(rows, 32 * per) // per * per)
        fetch = self._map_features if device.type == "cpu" and self._raw_features else self._read_features
        with ThreadPoolExecutor(1, thread_name_prefix="vfs-prefetch") as pool:
            ranges = self._chunk_ranges(rows)
            pending = pool.submit(self._fetch, fetch, *ranges[0]) if ranges else None
            for i, (a, b) in enumerate(ranges):
                x, sq = pending.result()
                pending = pool.submit(self._fetch, fetch, *ranges[i + 1]) if i + 1 < len(ranges) else None
                if device.type != "cpu":
                    x = torch.from_numpy(x).pin_memory().to(device, non_blocking=True)
                elif isinstance(x, np.ndarray):
                    x = torch.from_numpy(x)
                yield a, x, torch.from_numpy(sq).to(device)
                del x, sq

    def _fetch(self, fetch, start: int, stop: int) -> tuple[np.ndarray | list[torch.Tensor], np.ndarray]:
        return fetch(start, stop), self._read_sqnorm(start, stop)


def open_cache(location: str | Path, allow_partial: bool = False) -> FeatureCache:
    """Open a cache read-only from a local path or a URL (http(s)://, s3://, … through fsspec).

    An incomplete cache opens too (`.complete` is False) but refuses to be searched unless
    `allow_partial=True`, which searches the images its build has stored so far.
    """
    location = str(location)
    try:
        if _is_url(location):
            store = zarr.storage.FsspecStore.from_url(location, read_only=True)
        else:
            if not Path(location).exists():
                raise CacheError(f"no cache at {location}")
            store = zarr.storage.LocalStore(location, read_only=True)
        group = zarr.open_group(store, mode="r", zarr_format=3)  # never zarr 2 (its codecs include pickle)
    except CacheError:
        raise
    except Exception as e:  # zarr / fsspec raise many kinds; the user needs the reason
        raise CacheError(f"cannot open the cache at {location} (a VFS cache is a zarr 3 group): "
                         f"{type(e).__name__}: {e}") from e
    return FeatureCache(group, location, allow_partial=allow_partial)


def list_caches(root: str | Path) -> list[dict]:
    """Every cache under a folder, complete or partial, with a summary for the cache list."""
    out = []
    for p in sorted(Path(root).glob("*.zarr")):
        try:
            c = open_cache(p)
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            out.append({"name": p.stem, "path": str(p), "model": c.spec.model, "layer": c.spec.layer,
                        "grid": "×".join(map(str, c.spec.grid)), "channels": c.spec.channels, "n": c.n,
                        "labels": c.label_col, "domains": c.domain_col, "complete": c.complete,
                        "stored": c.stored, "size_bytes": size, "error": None})
        except CacheError as e:
            out.append({"name": p.stem, "path": str(p), "complete": False, "error": str(e)})
    return out


# --- writing ---------------------------------------------------------------------------------
class BuildLock:
    """One build per output. `<out>.lock` is locked with flock(2), which the kernel releases when
    the owner exits or is killed, so a dead build never blocks the next one (and a reused pid
    cannot fake an owner); the file names the owner (pid, host) for the refusal message.
    Without fcntl (Windows) the file's existence is the lock and a dead owner's pid is ignored."""

    def __init__(self, out: str | Path):
        self.path = Path(f"{out}.lock")  # beside the cache, so it can be taken before the cache exists
        self._fd: int | None = None

    def _refuse(self, owner: str) -> CacheError:
        return CacheError(f"another build is writing {self.path.with_suffix('')} (lock {self.path}: "
                          f"{owner.strip() or 'owner unknown'}); wait for it to finish or stop it first")

    def __enter__(self) -> "BuildLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        if fcntl is None:
            return self._enter_pidfile(owner)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: held by a live process
                text = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise self._refuse(text) from None
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

    def _enter_pidfile(self, owner: bytes) -> "BuildLock":
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

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _Pending:
    item: int
    features: np.ndarray | None = None  # (h, w, C) fp16
    thumb: np.ndarray | None = None
    reason: str | None = None


@dataclass
class CacheWriter:
    """Appends images' features to a cache in whole chunks; progress is written after the data.

    Crash safety: the cache is created in `<out>.creating` and renamed into place once it is
    whole, so a build killed while creating leaves nothing that blocks the rerun. A chunk counts
    as written only once its files are on disk (written by zarr through a temporary file and a
    rename, then fsync'ed with their folders, unless `VFS_FSYNC=0`); only then is the progress
    attribute rewritten (zarr.json, also by rename, then fsync'ed). A kill at any moment leaves
    the last recorded progress true, and a resume redoes at most the chunk in flight.
    """

    path: Path
    group: zarr.Group
    spec: CacheSpec
    rows: int = 0  # images stored
    next_item: int = 0  # every candidate before this one is stored or skipped
    skipped: list[dict] = field(default_factory=list)
    nonnegative: bool = True  # every stored feature ≥ 0 (post-ReLU): search can use a relative bound
    _pending: list[_Pending] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, spec: CacheSpec, candidates: pd.DataFrame, thumb_size: int,
             resume: bool = True, chunk_images: int | None = None, job: dict | None = None) -> "CacheWriter":
        """Create the cache, or continue a partial one of the same spec (refused with the reason otherwise).

        `chunk_images` fixes the images per chunk (default: about CHUNK_BYTES of features, at most
        CHUNK_MAX_IMAGES); it applies when the cache is created, a resume keeps the cache's own.
        `job` (the build's settings) is recorded so that the app can resume the build as it was asked.
        """
        path = Path(path)
        if path.exists() and resume:
            return cls._resume(path, spec, candidates)
        if path.exists():
            raise CacheError(f"{path} exists; remove it or resume the build")
        h, w = spec.grid
        n = len(candidates)
        if chunk_images is not None and chunk_images < 1:
            raise ValueError(f"chunk_images must be at least 1, not {chunk_images}")
        if chunk_images is None:
            chunk_images = min(CHUNK_MAX_IMAGES, CHUNK_BYTES // (h * w * spec.channels * 2))
            chunk_images -= chunk_images % THUMB_CHUNK if chunk_images > THUMB_CHUNK else 0
        per = max(1, min(n, chunk_images))
        thumb_per = math.gcd(per, THUMB_CHUNK)  # divides the feature chunk: a chunk's writes stay whole
        staging = path.with_name(path.name + ".creating")
        if staging.exists():  # a creation killed half-way: nothing in it was ever progress
            shutil.rmtree(staging)
        g = zarr.open_group(zarr.storage.LocalStore(staging), mode="w-")
        g.create_array("features", shape=(n, h, w, spec.channels), chunks=(per, h, w, spec.channels),
                       dtype="float16", compressors=None, fill_value=0)
        g.create_array("sqnorm", shape=(n, h, w), chunks=(per, h, w), dtype="float32", fill_value=0)
        g.create_array("thumbs", shape=(n, thumb_size, thumb_size, 3), chunks=(thumb_per, thumb_size, thumb_size, 3),
                       dtype="uint8", fill_value=0)
        g.create_array("source_index", shape=(n,), chunks=(per,), dtype="int64", fill_value=-1)
        _write_table(g, "candidates", candidates)
        g.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "n": 0,
            "complete": False, "progress": {"rows": 0, "next_item": 0, "skipped": [], "nonnegative": True},
            "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "all_chunks_stored": True,  # even all-zero chunks: a missing chunk file means damage
            **({"job": job} if job is not None else {}),
        })
        if FSYNC:
            _fsync([*(p for p in staging.rglob("*") if p.is_file()), *(p for p in staging.rglob("*") if p.is_dir()), staging])
        staging.rename(path)
        if FSYNC:
            _fsync([path.parent])
        return cls(path, zarr.open_group(zarr.storage.LocalStore(path), mode="r+"), spec)

    @classmethod
    def _resume(cls, path: Path, spec: CacheSpec, candidates: pd.DataFrame) -> "CacheWriter":
        try:
            g = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
            attrs = dict(g.attrs)
        except Exception as e:  # noqa: BLE001 - not a zarr group, unreadable metadata, ...
            raise CacheError(f"{path} exists and is not a VFS cache ({type(e).__name__}: {e}); choose another output") from e
        if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path} is not a VFS cache of format version {FORMAT_VERSION}")
        reason = CacheSpec.from_dict(attrs["spec"]).mismatch(spec)
        if reason:
            raise CacheError(f"{path} was built with another setting ({reason}); choose another output")
        if attrs.get("complete"):
            raise CacheError(f"{path} is already complete")
        if "candidates" in g and len(_read_table(g, "candidates")) != len(candidates):
            raise CacheError(f"{path} was started on a dataset of another size; choose another output")
        for leftover in path.rglob("*.partial"):  # zarr's temporary files from writes a kill interrupted
            if _ZARR_TEMP.search(leftover.name):
                leftover.unlink(missing_ok=True)
        p = attrs["progress"]
        return cls(path, g, spec, rows=p["rows"], next_item=p["next_item"], skipped=list(p["skipped"]),
                   nonnegative=bool(p.get("nonnegative", False)))

    @property
    def chunk(self) -> int:
        return self.group["features"].chunks[0]

    def add(self, item: int, features: np.ndarray, thumb: np.ndarray) -> None:
        if not np.isfinite(features).all():  # fp16 overflows to inf beyond ±65504: unsearchable
            self.skip(item, "its features contain NaN or inf (activations beyond the float16 range?)")
            return
        self._pending.append(_Pending(item, features, thumb))
        self._flush(whole_chunks_only=True)

    def skip(self, item: int, reason: str) -> None:
        self._pending.append(_Pending(item, reason=reason))

    def _flush(self, whole_chunks_only: bool) -> None:
        while True:
            stored = [i for i, p in enumerate(self._pending) if p.features is not None]
            take = self.chunk - self.rows % self.chunk
            if len(stored) >= take:
                upto = stored[take - 1] + 1
            elif not whole_chunks_only and self._pending:
                upto = len(self._pending)
            else:
                return
            batch, self._pending = self._pending[:upto], self._pending[upto:]
            self._store(batch)

    def _store(self, batch: list[_Pending]) -> None:
        good = [p for p in batch if p.features is not None]
        a, b = self.rows, self.rows + len(good)
        if good:
            x = np.stack([p.features for p in good]).astype(np.float16)
            self.nonnegative = self.nonnegative and bool((x >= 0).all())
            self._array("features")[a:b] = x
            self._array("sqnorm")[a:b] = np.square(x, dtype=np.float32).sum(-1)
            self._array("thumbs")[a:b] = np.stack([p.thumb for p in good])
            self._array("source_index")[a:b] = np.array([p.item for p in good], dtype=np.int64)
            self._sync_rows(a, b)
        self.rows, self.next_item = b, batch[-1].item + 1
        self.skipped += [{"item": p.item, "reason": p.reason} for p in batch if p.reason is not None]
        # Progress only after the data is on disk: a kill before this line redoes the chunk.
        self.group.attrs["progress"] = {"rows": self.rows, "next_item": self.next_item, "skipped": self.skipped,
                                        "nonnegative": self.nonnegative}
        self._sync_attrs()

    def _array(self, name: str) -> zarr.Array:
        """An array that stores every chunk, even one equal to the fill value (zarr skips those by
        default), so that a reader can tell a missing chunk file from a chunk of zeros."""
        return self.group[name].with_config({"write_empty_chunks": True})

    def _sync_rows(self, a: int, b: int) -> None:
        """fsync the chunk files holding rows a..b-1 of every array, and the folders naming them."""
        if not FSYNC:
            return
        files, folders = [], set()
        for name in ("features", "sqnorm", "thumbs", "source_index"):
            arr = self.group[name]
            per, tail = arr.chunks[0], (0,) * (arr.ndim - 1)
            for i in range(a // per, (b - 1) // per + 1):
                f = self.path / name / arr.metadata.encode_chunk_key((i, *tail))
                files.append(f)
                folders.update(d for d in f.parents if d.is_relative_to(self.path / name))
        _fsync(files + sorted(folders, key=lambda d: -len(d.parts)))

    def _sync_attrs(self) -> None:
        if FSYNC:
            _fsync([self.path / "zarr.json", self.path])

    def finish(self, candidates: pd.DataFrame, extra_report: dict | None = None) -> None:
        """Store what is left, write the manifest of the stored images, and mark the cache complete.

        Every step can be redone: a build killed here resumes with nothing left to compute and
        finishes again; `complete` is set last, in one write with `n` and the report.
        """
        self._flush(whole_chunks_only=False)
        index = self.group["source_index"][: self.rows]
        manifest = candidates.iloc[index].reset_index(drop=True)
        _write_table(self.group, "manifest", manifest)
        for name in ("features", "sqnorm", "thumbs", "source_index"):
            arr = self.group[name]
            arr.resize((self.rows, *arr.shape[1:]))
        if "candidates" in self.group:
            del self.group["candidates"]
        paths = candidates["path"].astype(str).to_numpy()
        report = {"candidates": len(candidates), "stored": self.rows,
                  "skipped": [{"path": paths[s["item"]], "reason": s["reason"]} for s in self.skipped]}
        if FSYNC:
            _fsync([p for p in (self.path / "manifest").rglob("*") if p.is_file()]
                   + [self.path / name / "zarr.json" for name in ("features", "sqnorm", "thumbs", "source_index")])
        self.group.attrs.update({"n": self.rows, "report": report | (extra_report or {}),
                                 "nonnegative": self.nonnegative, "complete": True})
        self._sync_attrs()


def _fsync(paths) -> None:
    """Flush files (and folders: their entries) to disk; a folder that cannot be opened is skipped (Windows)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except (IsADirectoryError, PermissionError, FileNotFoundError):
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems refuse fsync on folders
        finally:
            os.close(fd)


def _plain_chunk_root(arr: zarr.Array, every_chunk_stored: bool) -> Path | None:
    """Where an array's chunk files are plain little-endian C-order bytes, possibly zstd-compressed
    (a local cache as VFS writes it): streaming reads those files itself, 4× faster than through zarr.
    Only where every chunk has a file: in older caches a missing file is a chunk of zeros."""
    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    names = [type(c).__name__ for c in codecs]
    plain = (names in (["BytesCodec"], ["BytesCodec", "ZstdCodec"])
             and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little")
    local = isinstance(arr.store, zarr.storage.LocalStore) and every_chunk_stored
    return Path(arr.store.root) if plain and local else None


def _describe_rows(idx: np.ndarray) -> str:
    if len(idx) == 0:
        return "(none)"
    shown = ", ".join(map(str, idx[:5].tolist()))
    return shown + (f", … ({len(idx)} rows)" if len(idx) > 5 else "")


def _write_table(group: zarr.Group, name: str, table: pd.DataFrame) -> None:
    """A DataFrame as one string array per column (missing values stored as NUL)."""
    g = group.require_group(name)
    for col in table.columns:
        values = table[col].map(lambda v: "\x00" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        arr = g.create_array(str(col), shape=(len(table),), chunks=(max(1, len(table)),), dtype=str, overwrite=True)
        if len(table):
            arr[:] = values.to_numpy(dtype=str)
    g.attrs["columns"] = [str(c) for c in table.columns]
    g.attrs["kinds"] = {str(c): table[c].dtype.kind for c in table.columns}


def _codec_names(codecs: list) -> list[str]:
    names = []
    for codec in codecs:
        d = codec if isinstance(codec, dict) else codec.to_dict()
        names.append(d.get("name"))
        inner = d.get("configuration") or {}
        names += _codec_names(inner.get("codecs", [])) + _codec_names(inner.get("index_codecs", []))
    return names


def _check_array(arr: zarr.Array, location: str, dtype: str | None = None) -> None:
    """Refuse an array this VFS would not write: another zarr format, an unknown codec, another dtype."""
    meta = arr.metadata
    if meta.zarr_format != 3:
        raise CacheError(f"{location}: array {arr.path!r} is zarr format {meta.zarr_format}; VFS reads zarr 3 only")
    unsafe = sorted({str(c) for c in _codec_names(list(meta.to_dict().get("codecs", []))) if c not in SAFE_CODECS})
    if unsafe:
        raise CacheError(f"{location}: array {arr.path!r} uses codec(s) {', '.join(unsafe)}, which VFS does not read "
                         f"(allowed: {', '.join(sorted(SAFE_CODECS))})")
    if dtype is not None and str(arr.dtype) != dtype:
        raise CacheError(f"{location}: array {arr.path!r} holds {arr.dtype}, not {dtype}")


def _read_table(group: zarr.Group, name: str, n: int | None = None) -> pd.DataFrame:
    """Back to a DataFrame, numbers and booleans restored from their stored kind."""
    g = group[name]
    kinds = g.attrs.get("kinds", {})
    out = {}
    for c in g.attrs["columns"]:
        _check_array(g[c], str(group.store_path))
        col = pd.Series(g[c][:n], dtype=object).replace("\x00", None)
        if kinds.get(c) in ("i", "u", "f"):
            col = pd.to_numeric(col)
        elif kinds.get(c) == "b":
            col = col.map({"True": True, "False": False})
        out[c] = col
    return pd.DataFrame(out)
