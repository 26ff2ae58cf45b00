"""What a cache lost or has garbled since it was written, found by reading it.

Chunk files gone (a disk fault, a copy cut short), zero-filled in place by a crash, overwritten or
garbled: a search spot-checks the rows it reads (`rows_disagreeing`), a build's rerun and
`python -m vfs check` read every chunk (`damaged_rows`), and `info` looks for missing files
(`first_lost_row`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .format import ROW_ARRAYS, CacheError, column_key, location_of, member_array
from .rows import ZarrRows

NORMS_AGREE = 1e-3
"""How far (relative) a cell's squared norm summed again in fp32 may lie from the stored one: the
writer summed the same fp16 values in fp32, in another order (≈ C · 2⁻²⁴ at worst)."""


def rows_disagreeing(
    features: np.ndarray | torch.Tensor, sqnorm: np.ndarray, every_cell: bool = False
) -> np.ndarray:
    """The rows (indices into these) whose fp16 features are not what their stored squared norms
    were summed from: a chunk file zero-filled by a crash, overwritten, or garbled since it was
    written, which a search would otherwise score as it reads (a zero-filled chunk scored 0, the
    results wrong without a word). Each image's cell of largest norm — a spot check a search pays
    next to nothing for — or, `every_cell`, all of them (a build's rerun, which reads every chunk)."""
    x = torch.as_tensor(features)
    m = x.shape[0]
    x, q = x.reshape(m, -1, x.shape[-1]), torch.as_tensor(sqnorm).reshape(m, -1)
    if not every_cell:
        rows, cells = torch.arange(m), q.argmax(1)
        x, q = x[rows, cells][:, None], q[rows, cells][:, None]
    again = x.float().square().sum(-1)
    agree = ((again - q).abs() <= NORMS_AGREE * q) & q.isfinite()  # NaN and inf disagree
    return torch.nonzero(~agree.all(1)).flatten().numpy()


@dataclass(frozen=True)
class Damage:
    """A chunk's worth of stored rows found damaged (`damaged_rows`): `first` is the first of them
    that is wrong, `stop` the end of the chunk, which a build's rerun computes again from its start."""

    first: int
    stop: int
    what: str
    missing: bool = False  # a chunk not there (which `first_lost_row` finds in a local cache too)


_ARRAY_WORDS = {
    "features": "features",
    "sqnorm": "norms",
    "thumbs": "thumbnails",
    "source_index": "source indices",
}


def damaged_rows(
    group: zarr.Group,
    rows: int,
    progress: Callable[[int, int], None] | None = None,
    raised: tuple[type[BaseException], ...] = (),
) -> Iterator[Damage]:
    """Each features chunk's range among the first `rows` stored images where a chunk is missing
    (where the writer stored every chunk, on any store: zarr reads a missing one as zeros), does not
    decode, or holds features that are not those of their stored norms (`rows_disagreeing`, every
    cell): every chunk read once, in order, `progress(rows done, rows)` after each. What
    `python -m vfs check` and a build's rerun read. The machine's faults (memory, a read that
    failed) and `raised` (a remote store's server failing) are raised: no damage of the cache's."""
    stored = bool(group.attrs.get("all_chunks_stored"))
    location = location_of(group)
    readers = {
        words: ZarrRows(member_array(group, name), location, stored) for name, words in _ARRAY_WORDS.items()
    }
    per = readers["features"].per
    for start in range(0, rows, per):
        stop = min(start + per, rows)
        damage = _chunk_damage(readers, start, stop, raised)
        if damage is not None:
            yield damage
        if progress is not None:
            progress(stop, rows)


def _chunk_damage(
    readers: dict[str, ZarrRows], start: int, stop: int, raised: tuple[type[BaseException], ...]
) -> Damage | None:
    """`damaged_rows`'s look at one features chunk's rows."""
    read = {}
    for words, reader in readers.items():
        fault, read[words] = _stored_read(partial(reader.read, start, stop), raised)
        if fault is not None:
            missing = fault == "missing"
            return Damage(
                start,
                stop,
                f"a chunk of its {words} {'is missing' if missing else 'does not decode'}",
                missing,
            )
    bad = rows_disagreeing(read["features"], read["norms"], True)
    if not len(bad):
        return None
    first = start + int(bad[0])
    some = f"{len(bad)} image{'s' if len(bad) > 1 else ''}"
    return Damage(
        first,
        stop,
        f"the features of {some} are not those their norms were summed from (zero-filled, "
        f"overwritten or garbled since written; first: image {first})",
    )


def _stored_read(read: Callable[[], Any], raised: tuple[type[BaseException], ...]) -> tuple[str | None, Any]:
    """`read()`'s rows, or what kept them: "missing" (a chunk the writer stored is not there:
    `ZarrRows`'s CacheError, or a column that names no array) or "garbled" (zarr's and the codecs'
    many errors). The machine's faults (memory, a read that failed: an OSError with an errno) and
    `raised` (a remote store's server failing) are raised: no damage of the cache's."""
    try:
        return None, read()
    except raised:
        raise
    except CacheError:
        return "missing", None
    except (MemoryError, OSError) as e:
        if isinstance(e, MemoryError) or e.errno is not None:
            raise
        return "garbled", None  # a codec's error
    except Exception:  # noqa: BLE001 - zarr's and the codecs' many kinds: a chunk that does not decode
        return "garbled", None


def missing_columns(
    group: zarr.Group, name: str, raised: tuple[type[BaseException], ...] = (), rows: int | None = None
) -> list[str]:
    """The columns of a cache's table (`manifest`, `candidates`) whose data is gone from the store,
    local or remote, where the writer stored every chunk (zarr reads a gone one as all missing),
    does not decode (a chunk garbled on disk: it escaped `check` as a codec's error, and a rerun
    of the build, which looked for files only, left it — CLI review), or has another length than
    `rows` (a finished cache's manifest: its images) or, without it, than the table's longest
    column (pandas would read the rows a short one lacks as missing values — code review)."""
    table = group[name]
    attrs: dict[str, Any] = dict(table.attrs)
    if not isinstance(table, zarr.Group) or not attrs.get("all_chunks_stored"):
        return []
    location = location_of(group)
    columns = list(map(str, attrs.get("columns", [])))

    def array(column: str) -> zarr.Array:
        arr = table.get(column_key(attrs, column, location))  # a crafted key: a CacheError, the column lost
        if not isinstance(arr, zarr.Array):
            raise CacheError(f"column {column!r} is gone")
        return arr

    def length(column: str) -> int:
        return int(array(column).shape[0])

    if rows is None:  # the longest column's (a lost one's is None)
        rows = max(
            (n for c in columns if (n := _stored_read(partial(length, c), raised)[1]) is not None), default=0
        )

    def read(column: str) -> np.ndarray:
        arr = array(column)
        if arr.shape[0] != rows:
            raise CacheError(f"column {column!r} holds {arr.shape[0]} rows, not {rows}")
        return ZarrRows(arr, location, True).read(0, rows)

    return [c for c in columns if _stored_read(partial(read, c), raised)[0]]


def without_checksum(group: zarr.Group) -> list[str]:
    """The arrays of thumbnails, source indices and manifest columns stored without `COMPRESSOR`'s
    checksum (caches written before it): a chunk of them garbled on disk decodes unnoticed."""
    arrays = {name: group.get(name) for name in ("thumbs", "source_index")}
    table = group.get("manifest") or group.get("candidates")
    if isinstance(table, zarr.Group):
        attrs: dict[str, Any] = dict(table.attrs)
        for c in map(str, attrs.get("columns", [])):
            try:
                arrays[f"{table.basename}/{c}"] = table.get(column_key(attrs, c, location_of(group)))
            except CacheError:  # its key damaged: a lost column (`missing_columns`)
                continue
    found = []
    for name, arr in arrays.items():
        codecs = getattr(arr.metadata, "codecs", ()) if isinstance(arr, zarr.Array) else ()
        if any(getattr(c, "checksum", None) is False for c in codecs):
            found.append(name)
    return found


def first_lost_row(path: Path, group: zarr.Group, rows: int) -> int | None:
    """The first of a local cache's `rows` (stored, as its writer recorded them) whose chunk file
    is missing (or, for the uncompressed features, short), in any row array; None when all are
    there. A builder redoes them; `info` says so."""
    lost = []
    for name in ROW_ARRAYS:
        arr = member_array(group, name)
        per, tail = arr.chunks[0], (0,) * (arr.ndim - 1)
        size = per * math.prod(arr.chunks[1:]) * arr.dtype.itemsize if name == "features" else 0
        for i in range(-(-rows // per)):
            f = path / name / arr.metadata.encode_chunk_key((i, *tail))
            if not f.is_file() or f.stat().st_size < size:
                lost.append(i * per)
                break
    return min(lost, default=None)
