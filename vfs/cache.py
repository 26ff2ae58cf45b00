"""Feature cache format v1: a zarr v3 group holding one layer's feature maps for a dataset.

Layout (see docs/cache-format.md): `features` float16 (N, h, w, C), `sqnorm` float32 (N, h, w),
`thumbs` uint8 (N, S, S, 3), `manifest/<column>` strings (N,), and JSON attributes describing
what the cache is of (`CacheSpec`), its build report and progress. A build appends chunk by
chunk and records progress only after the chunk's data is stored, so a killed build resumes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import zarr

FORMAT = "vfs-feature-cache"
FORMAT_VERSION = 1
CHUNK_BYTES = 4 << 20  # features per chunk: large enough to stream well, small enough to resume often
CHUNK_MAX_IMAGES = 256
DEFAULT_MEMORY_BUDGET = 4 << 30


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
    """A cache opened for reading: arrays, spec, manifest, and search access (see vfs.search)."""

    def __init__(self, group: zarr.Group, location: str):
        self.group, self.location = group, location
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{location} is not a VFS feature cache (no '{FORMAT}' attribute)")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{location} has format version {attrs.get('format_version')}; this VFS reads version {FORMAT_VERSION}")
        self.attrs = attrs
        self.spec = CacheSpec.from_dict(attrs["spec"])
        try:
            self.features, self.sqnorm, self.thumbs = group["features"], group["sqnorm"], group["thumbs"]
        except KeyError as e:
            raise CacheError(f"{location} is missing the array {e}") from e
        h, w = self.spec.grid
        self.n = int(attrs["n"])
        expect = (self.features.shape[0], h, w, self.spec.channels)
        if self.features.shape != expect or self.sqnorm.shape != expect[:3] or self.features.shape[0] < self.n:
            raise CacheError(f"{location}: array shapes {self.features.shape}/{self.sqnorm.shape} do not match the spec {expect}")
        self._resident: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._manifest: pd.DataFrame | None = None

    # --- what it is -------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def report(self) -> dict:
        return self.attrs.get("report", {})

    @property
    def shape(self) -> tuple[int, int, int, int]:
        h, w = self.spec.grid
        return self.n, h, w, self.spec.channels

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

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
            if "manifest" not in self.group:
                raise CacheError(f"{self.location} has no manifest: the build did not finish")
            self._manifest = _read_table(self.group, "manifest", self.n)
        return self._manifest

    @property
    def domains(self) -> np.ndarray | None:
        return None if not self.domain_col else self.manifest[self.domain_col].to_numpy()

    def info(self) -> dict:
        """A JSON-able summary (the CLI's `info --json`)."""
        return {
            "location": self.location, "format_version": FORMAT_VERSION, "complete": self.complete,
            "n": self.n, "spec": self.spec.to_dict(), "chunk": self.features.chunks[0],
            "nbytes_features": self.nbytes, "report": self.report,
            "created": self.attrs.get("created"), "versions": self.attrs.get("versions", {}),
        }

    def check_extractor(self, description: dict) -> None:
        """Refuse an extractor that is not the one the cache was built with."""
        for key in ("spec", "layer", "input_size"):
            mine = {"spec": self.spec.model, "layer": self.spec.layer, "input_size": self.spec.input_size}[key]
            if description.get(key) != mine:
                raise CacheError(f"the cache was built with {key} {mine!r}, not {description.get(key)!r}")

    # --- reading ----------------------------------------------------------------------------
    def thumb(self, index: int) -> np.ndarray:
        return self.thumbs[int(index)]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        cpu = self._resident.get(torch.device("cpu"))
        if cpu is not None:
            return cpu[0][torch.from_numpy(idx)].numpy()
        return self.features.get_orthogonal_selection((idx, slice(None), slice(None), slice(None)))

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
        return self.features[start:stop], self.sqnorm[start:stop]

    def _chunk_ranges(self, rows_per_chunk: int) -> list[tuple[int, int]]:
        return [(a, min(a + rows_per_chunk, self.n)) for a in range(0, self.n, rows_per_chunk)]

    def resident(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as fp16 / fp32 tensors on `device`, loaded once, chunk by chunk."""
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
        rows = max(self.features.chunks[0], (64 << 20) // max(1, int(np.prod(self.shape[1:])) * 2))
        if device in self._resident or self.fits(device, memory_budget):
            x, s = self.resident(device)
            for a, b in self._chunk_ranges(rows):
                yield a, x[a:b], s[a:b]
            return
        if memory_budget is not None:  # two chunks in flight must fit the budget
            per_row = int(np.prod(self.shape[1:])) * 2 * 2
            rows = max(1, min(rows, memory_budget // 4 // per_row))
        with ThreadPoolExecutor(1, thread_name_prefix="vfs-prefetch") as pool:
            ranges = self._chunk_ranges(rows)
            pending = pool.submit(self._read, *ranges[0]) if ranges else None
            for i, (a, _) in enumerate(ranges):
                f, q = pending.result()
                pending = pool.submit(self._read, *ranges[i + 1]) if i + 1 < len(ranges) else None
                x, s = torch.from_numpy(f), torch.from_numpy(q)
                if device.type != "cpu":
                    x, s = x.pin_memory().to(device, non_blocking=True), s.to(device, non_blocking=True)
                yield a, x, s
                del f, q, x, s


def open_cache(location: str | Path) -> FeatureCache:
    """Open a cache read-only from a local path or a URL (http(s)://, s3://, … through fsspec)."""
    location = str(location)
    try:
        if _is_url(location):
            store = zarr.storage.FsspecStore.from_url(location, read_only=True)
        else:
            if not Path(location).exists():
                raise CacheError(f"no cache at {location}")
            store = zarr.storage.LocalStore(location, read_only=True)
        group = zarr.open_group(store, mode="r")
    except CacheError:
        raise
    except Exception as e:  # zarr / fsspec raise many kinds; the user needs the reason
        raise CacheError(f"cannot open the cache at {location}: {e}") from e
    return FeatureCache(group, location)


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
                        "size_bytes": size, "error": None})
        except CacheError as e:
            out.append({"name": p.stem, "path": str(p), "complete": False, "error": str(e)})
    return out


# --- writing ---------------------------------------------------------------------------------
class BuildLock:
    """One build per output: a lock file holding the owner's pid, ignored once that process is dead."""

    def __init__(self, out: str | Path):
        self.path = Path(f"{out}.lock")  # beside the cache, so it can be taken before the cache exists

    def __enter__(self) -> "BuildLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    raise CacheError(f"another build is writing {self.path.with_suffix('')} (lock {self.path}: {self.path.read_text().strip()})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
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
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class _Pending:
    item: int
    features: np.ndarray | None = None  # (h, w, C) fp16
    thumb: np.ndarray | None = None
    reason: str | None = None


@dataclass
class CacheWriter:
    """Appends images' features to a cache in whole chunks; progress is written after the data."""

    path: Path
    group: zarr.Group
    spec: CacheSpec
    rows: int = 0  # images stored
    next_item: int = 0  # every candidate before this one is stored or skipped
    skipped: list[dict] = field(default_factory=list)
    _pending: list[_Pending] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, spec: CacheSpec, candidates: pd.DataFrame, thumb_size: int,
             resume: bool = True) -> "CacheWriter":
        """Create the cache, or continue a partial one of the same spec (refused with the reason otherwise)."""
        path = Path(path)
        if path.exists() and resume:
            return cls._resume(path, spec, candidates)
        if path.exists():
            raise CacheError(f"{path} exists; remove it or resume the build")
        h, w = spec.grid
        n = len(candidates)
        per = max(1, min(n, CHUNK_MAX_IMAGES, CHUNK_BYTES // (h * w * spec.channels * 2)))
        g = zarr.open_group(zarr.storage.LocalStore(path), mode="w-")
        g.create_array("features", shape=(n, h, w, spec.channels), chunks=(per, h, w, spec.channels),
                       dtype="float16", compressors=None, fill_value=0)
        g.create_array("sqnorm", shape=(n, h, w), chunks=(per, h, w), dtype="float32", fill_value=0)
        g.create_array("thumbs", shape=(n, thumb_size, thumb_size, 3), chunks=(per, thumb_size, thumb_size, 3),
                       dtype="uint8", fill_value=0)
        g.create_array("source_index", shape=(n,), chunks=(per,), dtype="int64", fill_value=-1)
        _write_table(g, "candidates", candidates)
        g.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "n": 0,
            "complete": False, "progress": {"rows": 0, "next_item": 0, "skipped": []},
            "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        return cls(path, g, spec)

    @classmethod
    def _resume(cls, path: Path, spec: CacheSpec, candidates: pd.DataFrame) -> "CacheWriter":
        g = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
        attrs = dict(g.attrs)
        if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path} is not a VFS cache of format version {FORMAT_VERSION}")
        reason = CacheSpec.from_dict(attrs["spec"]).mismatch(spec)
        if reason:
            raise CacheError(f"{path} was built with another setting ({reason}); choose another output")
        if attrs.get("complete"):
            raise CacheError(f"{path} is already complete")
        if "candidates" in g and len(_read_table(g, "candidates")) != len(candidates):
            raise CacheError(f"{path} was started on a dataset of another size; choose another output")
        p = attrs["progress"]
        return cls(path, g, spec, rows=p["rows"], next_item=p["next_item"], skipped=list(p["skipped"]))

    @property
    def chunk(self) -> int:
        return self.group["features"].chunks[0]

    def add(self, item: int, features: np.ndarray, thumb: np.ndarray) -> None:
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
            self.group["features"][a:b] = x
            self.group["sqnorm"][a:b] = np.square(x, dtype=np.float32).sum(-1)
            self.group["thumbs"][a:b] = np.stack([p.thumb for p in good])
            self.group["source_index"][a:b] = np.array([p.item for p in good], dtype=np.int64)
        self.rows, self.next_item = b, batch[-1].item + 1
        self.skipped += [{"item": p.item, "reason": p.reason} for p in batch if p.reason is not None]
        # Progress only after the data: a kill before this line redoes the chunk.
        self.group.attrs["progress"] = {"rows": self.rows, "next_item": self.next_item, "skipped": self.skipped}

    def finish(self, candidates: pd.DataFrame, extra_report: dict | None = None) -> None:
        """Store what is left, write the manifest of the stored images, and mark the cache complete."""
        self._flush(whole_chunks_only=False)
        index = self.group["source_index"][: self.rows]
        manifest = candidates.iloc[index].reset_index(drop=True)
        _write_table(self.group, "manifest", manifest)
        for name in ("features", "sqnorm", "thumbs", "source_index"):
            arr = self.group[name]
            arr.resize((self.rows, *arr.shape[1:]))
        paths = candidates["path"].astype(str).to_numpy()
        report = {"candidates": len(candidates), "stored": self.rows,
                  "skipped": [{"path": paths[s["item"]], "reason": s["reason"]} for s in self.skipped]}
        self.group.attrs.update({"n": self.rows, "report": report | (extra_report or {}), "complete": True})
        if "candidates" in self.group:
            del self.group["candidates"]


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


def _read_table(group: zarr.Group, name: str, n: int | None = None) -> pd.DataFrame:
    """Back to a DataFrame, numbers and booleans restored from their stored kind."""
    g = group[name]
    kinds = g.attrs.get("kinds", {})
    out = {}
    for c in g.attrs["columns"]:
        col = pd.Series(g[c][:n], dtype=object).replace("\x00", None)
        if kinds.get(c) in ("i", "u", "f"):
            col = pd.to_numeric(col)
        elif kinds.get(c) == "b":
            col = col.map({"True": True, "False": False})
        out[c] = col
    return pd.DataFrame(out)
