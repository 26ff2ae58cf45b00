"""The cache format, versions 1 and 2 (docs/cache-format.md): what a cache is of, its limits, and its tables.

A zarr v3 group: `features` float16 (N, h, w, C), `sqnorm` float32 (N, h, w), `thumbs` uint8
(N, S, S, 3), `manifest/<column>` strings (N,; a name zarr cannot take under its key, version 2),
and JSON attributes: the `CacheSpec`, the build
report and progress.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

from ..data import DataSpec
from ..models import PROBE_TOLERANCE, Preprocess, probe_difference
from ..stats import is_missing

FORMAT = "vfs-feature-cache"
FORMAT_VERSION = 2
"""The newest format version this VFS reads and writes (`FORMAT_VERSIONS`): 2 (since 2026-12-01)
stores a table's columns whose names zarr cannot take under its `keys`. A cache is written as the
oldest version that holds it (`format_version`): 1, which every VFS reads, unless it has such a
column — then an older VFS says the version is not one it reads, where it called the cache damaged."""
FORMAT_VERSIONS = (1, 2)
CHUNK_BYTES = 16 << 20  # features per chunk: large enough to stream well, small enough to resume often
CHUNK_MAX_IMAGES = 256
THUMB_CHUNK = 16  # thumbnails are read a page of results at a time: small chunks, few wasted decodes
MAX_CHUNK_BYTES = 1 << 30
"""Largest chunk a cache may declare (VFS writes ≤ 16 MB of features, ≤ 40 MB of thumbnails): a chunk
is decoded whole, so a hostile cache declaring huge chunks would otherwise make each read allocate that
much."""
# Codecs a cache's arrays may use. Caches come from strangers (URLs, shared folders): anything
# else (a plugin codec, an object codec) is refused before a byte of data is decoded — gzip and
# blosc too, whose decoded size no header bounds as zstd's does (`files.check_zstd`), and sharding,
# whose inner chunks are read by byte range; no VFS version wrote any of them.
SAFE_CODECS = frozenset({"bytes", "zstd", "crc32c", "transpose", "vlen-utf8", "vlen-bytes"})
COMPRESSOR = ZstdCodec(level=0, checksum=True)
"""zarr's default zstd, with each frame's checksum: without it a chunk garbled on disk decodes
without a word into other pixels, indices or labels (the features, stored plain, are checked
against their norms instead: `rows_disagreeing`)."""
CHUNK_KEYS = {"name": "default", "configuration": {"separator": "/"}}
"""The chunk keys every VFS version wrote (`<array>/c/0/0`), which the stores' checks read."""
_MISSING = ""  # how a table stores a missing value (an empty value is one: statistics group it so)
_READ_AS_MISSING = ("", "\x00")  # "\0" too: the format's first description named it
_WRITTEN_AS_TEXT = ("<NA>", "NaT", "nan")
"""How caches written before `is_missing` stored pandas' own missing values (pd.NA of a nullable
column, NaT): missing where the column's kind says numbers, booleans or times, text elsewhere."""
_TYPED_KINDS = ("i", "u", "f", "b", "M", "m")


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
    preprocess: Preprocess
    data: DataSpec
    weights: str | None = None  # `vfs.models.weights_digest` of the model (None: built before VFS kept it)
    probe: tuple[float, ...] | None = None
    """The layer's `probe_sketch` (None: built before VFS kept it): what the model computes, which
    the weights alone do not say. Compared within `PROBE_TOLERANCE`, as floats differ by machine."""

    def __post_init__(self) -> None:  # a cache's attributes come from strangers: checked as read
        for name in ("model", "layer") + (("weights",) if self.weights is not None else ()):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is text, not {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "model": self.model,
                "layer": self.layer,
                "input_size": self.input_size,
                "grid": list(self.grid),
                "channels": self.channels,
                "preprocess": self.preprocess.to_dict(),
                "data": self.data.to_dict(),
            }
            | ({} if self.weights is None else {"weights": self.weights})
            | ({} if self.probe is None else {"probe": list(self.probe)})
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        h, w = d["grid"]
        return cls(
            model=d["model"],
            layer=d["layer"],
            input_size=int(d["input_size"]),
            grid=(int(h), int(w)),
            channels=int(d["channels"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            data=DataSpec.from_dict(d["data"]),
            weights=d.get("weights"),
            probe=None if d.get("probe") is None else tuple(float(v) for v in d["probe"]),
        )

    def mismatch(self, other: CacheSpec) -> str | None:
        """Why two specs do not describe the same cache (None when they do); the weights and the
        probe count where both know them, the probe within `PROBE_TOLERANCE`."""
        a, b = ({**s.to_dict(), "preprocess": asdict(s.preprocess)} for s in (self, other))  # every field
        a.pop("probe", None), b.pop("probe", None)
        diffs = []
        if self.probe is not None and other.probe is not None:
            apart = probe_difference(self.probe, other.probe)
            if apart > PROBE_TOLERANCE:
                diffs.append(f"probe: the layer's output on the probe image {apart:.2g} apart (relative)")
        for k in (k for k in a if k in b and a[k] != b[k]):
            x, y = a[k], b[k]
            if isinstance(x, dict) and isinstance(y, dict):  # data, preprocess: the settings that differ
                diffs += [f"{k}.{s}: {x.get(s)!r} ≠ {y.get(s)!r}" for s in x | y if x.get(s) != y.get(s)]
            else:
                diffs.append(f"{k}: {x!r} ≠ {y!r}")
        return "; ".join(diffs) or None


def library_versions() -> dict[str, str]:
    """The versions a cache was written with (recorded in its attributes)."""
    from .. import __version__

    out = {"vfs": __version__}
    for name in ("torch", "torchvision", "timm", "zarr", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def codec_names(codecs: list[Any]) -> list[str]:
    """Every codec's name in a zarr 3 codec list, those nested in a sharding codec included."""
    names: list[str] = []
    for codec in codecs:
        d = codec if isinstance(codec, dict) else codec.to_dict()
        names.append(str(d.get("name")))
        inner = d.get("configuration") or {}
        names += codec_names(inner.get("codecs", [])) + codec_names(inner.get("index_codecs", []))
    return names


def location_of(group: zarr.Group) -> str:
    """Where a cache's group is, as a user named it: a local folder, or the store's URL."""
    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return str(Path(store.root) / group.path)
    return str(getattr(store, "path", store))


def member_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of a group; missing, or a group in its place, is damage."""
    try:
        arr = group[name]
    except KeyError:
        raise CacheError(
            f"the cache at {location_of(group)} is damaged: its array {name!r} is missing; build it anew "
            "(remove it, or build into another output)"
        ) from None
    if not isinstance(arr, zarr.Array):
        raise CacheError(f"{group.store_path}: {name!r} is a group, not an array")
    return arr


def check_array(arr: zarr.Array, location: str, dtype: str | None = None) -> None:
    """Refuse an array this VFS would not write: another zarr format, an unknown codec, another dtype,
    chunks beyond MAX_CHUNK_BYTES."""
    meta = arr.metadata
    if meta.zarr_format != 3:
        raise CacheError(
            f"{location}: array {arr.path!r} is zarr format {meta.zarr_format}; VFS reads zarr 3 only"
        )
    codecs: list[Any] = list(meta.to_dict().get("codecs", []))  # type: ignore[arg-type]  # zarr 3: a list
    unsafe = sorted({c for c in codec_names(codecs) if c not in SAFE_CODECS})
    if unsafe:
        raise CacheError(
            f"{location}: array {arr.path!r} uses codec(s) {', '.join(unsafe)}, which VFS does not read "
            f"(allowed: {', '.join(sorted(SAFE_CODECS))})"
        )
    keys = meta.to_dict().get("chunk_key_encoding")
    if keys != CHUNK_KEYS:
        raise CacheError(
            f"{location}: array {arr.path!r} names its chunks otherwise than VFS writes them: {keys}"
        )
    if dtype is not None and str(arr.dtype) != dtype:
        raise CacheError(f"{location}: array {arr.path!r} holds {arr.dtype}, not {dtype}")


def check_chunk_size(arr: zarr.Array, location: str) -> None:
    if int(np.prod(arr.chunks)) * arr.dtype.itemsize > MAX_CHUNK_BYTES:
        raise CacheError(
            f"{location}: array {arr.path!r} declares chunks {arr.chunks} of more than "
            f"{MAX_CHUNK_BYTES >> 20} MiB each; VFS does not read such caches"
        )


def _is_node_name(name: str) -> bool:
    """Whether zarr stores an array under `name` in a group as it is, a folder of that name: no `/`
    or NUL, not only dots, no `__` prefix (zarr's own), not `zarr.json` (the group's metadata), at
    most 200 bytes (file systems take 255)."""
    return (
        bool(name)
        and not set(name) & {"/", "\0"}
        and name.strip(".") != ""
        and not name.startswith("__")
        and name != "zarr.json"
        and len(name.encode("utf-8", "surrogatepass")) <= 200
    )


def _column_keys(columns: Sequence[str]) -> dict[str, str]:
    """The array names of a table's columns whose names zarr cannot store as they are (`a/b`,
    `..`: a manifest's column names are anyone's text; they failed the build with zarr's words, and
    `g` beside `g/h` with 'a parent … is an array'): `column 3` for the fourth, kept in the table's
    `keys` attribute. Other columns are stored under their names, as before `keys` existed."""
    keys: dict[str, str] = {}
    for i, c in enumerate(columns):
        if not _is_node_name(c):
            key = f"column {i}"
            while key in columns or key in keys.values():
                key += "_"
            keys[c] = key
    return keys


def known_version(value: object) -> bool:
    """Whether a cache's `format_version` attribute is one this VFS reads (`True` is no 1)."""
    return value in FORMAT_VERSIONS and not isinstance(value, bool)


def format_version(columns: Sequence[str]) -> int:
    """The format version a cache of a table with these columns is written as (`FORMAT_VERSION`)."""
    return FORMAT_VERSION if _column_keys(columns) else 1


def column_key(attrs: dict[str, Any], column: str, location: str) -> str:
    """The array name a table's `column` is stored under (`_column_keys`), checked: a cache's
    attributes are anyone's text."""
    keys = attrs.get("keys", {})
    key = keys.get(column, column) if isinstance(keys, dict) else None
    if not isinstance(key, str) or not _is_node_name(key):
        raise CacheError(
            f"{location}: a table's column {column!r} is stored under {key!r}, not a column's name"
        )
    return key


def write_table(group: zarr.Group, name: str, table: pd.DataFrame) -> None:
    """A DataFrame as one string array per column (missing values stored as empty strings), each
    column's chunk stored even where every value is missing: a missing file is then damage."""
    g = group.require_group(name)
    columns = [str(c) for c in table.columns]
    keys = _column_keys(columns)
    for col, column in zip(table.columns, columns):
        values = table[col].map(lambda v: _MISSING if is_missing(v) else str(v))
        arr = g.create_array(
            keys.get(column, column),
            shape=(len(table),),
            chunks=(max(1, len(table)),),
            dtype=str,
            compressors=COMPRESSOR,
            overwrite=True,
            config={"write_empty_chunks": True},
        )
        if len(table):
            arr[:] = values.to_numpy(dtype=str)
    g.attrs.update(
        {
            "columns": columns,
            "kinds": {str(c): table[c].dtype.kind for c in table.columns},
            "all_chunks_stored": True,
            **({"keys": keys} if keys else {}),
        }
    )


def lost_columns(group: zarr.Group, name: str) -> list[str]:
    """The columns of a local cache's table whose data is gone from disk (a disk fault, a copy cut
    short): zarr would read them as all missing. None are told lost where that cannot be told: a
    remote store (many HTTP servers list no folders), or a table written before every chunk was
    stored (an all-missing column had no file)."""
    g = group[name]
    attrs: dict[str, Any] = dict(g.attrs)
    local = isinstance(group.store, zarr.storage.LocalStore)
    if not local or not isinstance(g, zarr.Group) or not attrs.get("all_chunks_stored"):
        return []
    lost = []
    for c in map(str, attrs.get("columns", [])):
        try:
            arr = g.get(column_key(attrs, c, location_of(group)))
        except CacheError:  # its key damaged: the column is as good as gone
            arr = None
        if not isinstance(arr, zarr.Array) or (arr.shape[0] and arr.nchunks_initialized < arr.nchunks):
            lost.append(c)  # its folder gone, or its chunk
    return lost


def paths_digest(paths: Iterable[str]) -> str:
    """The stored images' paths, in order, as one sha256: what a rerun of a finished build checks
    its images against where the manifest's own paths are lost."""
    return "sha256:" + hashlib.sha256("\0".join(paths).encode()).hexdigest()


def read_table(
    group: zarr.Group, name: str, n: int | None = None, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Back to a DataFrame (all its columns, or `columns`), numbers and booleans restored from
    their stored kind; a column lost on disk, or of another length than `n` (without it, than the
    others), is refused: pandas would fill a short one's rows with missing values."""
    g = group[name]
    attrs: dict[str, Any] = dict(g.attrs)
    kinds = attrs.get("kinds", {})
    wanted = attrs["columns"] if columns is None else list(columns)
    lost = [c for c in lost_columns(group, name) if c in wanted]
    if lost:
        raise CacheError(
            f"the cache at {location_of(group)} is damaged: its {name} table's column(s) "
            f"{', '.join(map(repr, lost))} are missing on disk; rerun the build that made it "
            "(the same command writes them again) or build it anew"
        )
    out = {}
    for c in wanted:
        arr = g.get(column_key(attrs, c, location_of(group))) if isinstance(g, zarr.Group) else None
        if not isinstance(arr, zarr.Array):
            raise CacheError(f"{group.store_path}: table {name!r} column {c!r} is not an array")
        check_array(arr, str(group.store_path))
        if arr.dtype.kind not in "TUO":  # VFS writes variable-length strings
            raise CacheError(f"{group.store_path}: table {name!r} column {c!r} holds {arr.dtype}, not text")
        check_chunk_size(arr, str(group.store_path))
        n = arr.shape[0] if n is None else n  # without `n`, the first column's length is every one's
        if arr.shape[0] != n:
            raise CacheError(
                f"the cache at {location_of(group)} is damaged: its {name} table's column {c!r} holds "
                f"{arr.shape[0]} rows, not {n}; rerun the build that made it (the same command writes "
                "it again) or build it anew"
            )
        col = pd.Series(arr[:], dtype=object)
        kind = kinds.get(c)
        missing = _READ_AS_MISSING + (_WRITTEN_AS_TEXT if kind in _TYPED_KINDS else ())
        col = col.where(~col.isin(missing), None)
        if kind in ("i", "u", "f"):
            try:  # whole numbers with gaps as pandas' nullable integers, as a manifest reads them
                nullable = kind != "f" and bool(col.isna().any())
                col = pd.to_numeric(col, dtype_backend="numpy_nullable") if nullable else pd.to_numeric(col)
            except (TypeError, ValueError) as e:
                raise CacheError(
                    f"{group.store_path}: table {name!r} column {c!r} is not numbers ({e})"
                ) from e
        elif kind == "b":
            col = col.map({"True": True, "False": False})
        out[c] = col
    return pd.DataFrame(out)


ROW_ARRAYS = ("features", "sqnorm", "thumbs", "source_index")  # the arrays with one row per stored image
