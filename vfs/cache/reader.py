"""A cache opened for reading: its description, manifest, thumbnails, and the search's access to
its features (resident on a device, or streamed from storage with one range prefetched)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL.Image
import torch
import zarr

from ..devices import cuda_free_bytes
from ..masks import grid_box_to_pixels
from ..models import (
    PROBE_TOLERANCE,
    CheckpointNotFound,
    Extractor,
    Preprocess,
    is_module_spec,
    load_extractor,
    probe_difference,
)
from ..settings import CACHE_SUFFIX, is_url
from ..sources import Columns, converted, copy_converted, gather_rows, resident_slices, some_images
from ..stats import column_summary
from .damage import (
    Damage,
    damaged_rows,
    first_lost_row,
    missing_columns,
    rows_disagreeing,
    without_checksum,
)
from .files import CacheStore, RemoteCacheStore
from .format import (
    FORMAT,
    FORMAT_VERSIONS,
    CacheError,
    CacheSpec,
    check_array,
    check_chunk_size,
    known_version,
    lost_columns,
    member_array,
    read_table,
)
from .rows import RowReader, ZarrRows, row_reader

DEFAULT_MEMORY_BUDGET = 4 << 30
"""A cache up to this size is held resident in RAM by a CPU search; a larger one is streamed."""
REMOTE_SILENCE_S = 60
"""Seconds a remote store may send nothing (or take to connect) before a read fails."""
REMOTE_READ_S = 600
"""Seconds one read from a remote store may take in all (a chunk VFS writes is ≤ 40 MB)."""
RESIDENT_HEADROOM = 1.1
"""Resident features take their size plus the squared norms (C × smaller) and slack."""
CUDA_FREE_SHARE = 0.6
"""Of a GPU's free memory, what resident features may take: the rest is for the products' outputs."""
STREAM_RANGE_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
"""Features per streamed range: large enough for the products to run at speed, small enough that two
ranges in flight (one scored, one prefetched) stay well within memory."""
RECENT_THUMBS = 256
"""Thumbnails kept decoded per opened cache: a few pages of results (each ≤ 150 KB at 224 px)."""
MAX_MAPPED_CHUNKS = 32
"""Chunk files per streamed range at most: each mapped file holds a descriptor while it is scored."""


def cache_name(location: str) -> str:
    """What a cache is called in lists: its folder's name without `.zarr`."""
    return Path(str(location).rstrip("/")).name.removesuffix(CACHE_SUFFIX)


def _check_build_records(attrs: dict[str, Any]) -> None:
    """The build's records as its writer keeps them: `complete` true or false (the text "false" was
    taken for true), `n` a whole number, progress and report mappings (read by `stored`, `info` and
    the pages' lists of skipped images), the report's skipped images each a path and a reason."""
    if not isinstance(attrs.get("complete", False), bool):
        raise TypeError(f"complete is true or false, not {attrs['complete']!r}")
    if isinstance(attrs.get("n"), bool) or not isinstance(attrs.get("n", 0), int):
        raise TypeError(f"n is a whole number of images, not {attrs['n']!r}")
    for name in ("progress", "report"):
        record = attrs.get(name, {})
        if not isinstance(record, dict) or not isinstance(record.get("skipped", []), list):
            raise TypeError(f"{name} is no mapping with a list of skipped images: {str(record)[:60]!r}")
    for skipped in attrs.get("report", {}).get("skipped", []):
        said = isinstance(skipped, dict) and all(isinstance(skipped.get(k), str) for k in ("path", "reason"))
        if not said:
            raise TypeError(f"a skipped image in the report is no path and reason: {str(skipped)[:60]!r}")
    # the provenance every page shows (a published cache's: an int crashed the Home page for everyone)
    if not isinstance(attrs.get("created", ""), str):
        raise TypeError(f"created is a time as text, not {attrs['created']!r}")
    versions = attrs.get("versions", {})
    if not (isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())):
        raise TypeError(f"versions is a mapping of library names to versions, not {str(versions)[:60]!r}")


def _array(group: zarr.Group, name: str, location: str) -> zarr.Array:
    """One of a cache's arrays, or a CacheError naming it: missing, or metadata zarr cannot parse."""
    try:
        return member_array(group, name)
    except CacheError:
        raise
    except Exception as e:  # metadata zarr cannot parse (an empty zarr.json, unknown codec, ...)
        raise CacheError(
            f"{location}: the metadata of its {name!r} array cannot be read ({type(e).__name__}: {e})"
        ) from e


@dataclass(frozen=True)
class CacheCheck:
    """What `FeatureCache.check` found in a cache: nothing (`ok`), or damage a rerun of its build
    repairs (the same command: it recomputes the images of damaged or missing chunks, writes a lost
    manifest again)."""

    location: str
    images: int
    """The stored images whose rows were read (a partial cache's so far)."""
    complete: bool
    lost_from: int | None
    """`FeatureCache.lost_from`: the first image whose chunk file is missing."""
    lost_columns: list[str] | None
    """The manifest's (a partial cache's candidates') columns whose chunks are missing, do not
    decode or were cut short (`missing_columns`); None: the whole table is missing."""
    damaged: list[Damage]
    manifest_error: str | None
    """Why the manifest (a partial cache's candidates) could not be read, where it could not."""
    unverified: list[str]
    """`without_checksum`: arrays whose garbled chunks would decode unnoticed (no damage found)."""

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """Each problem found, in words."""
        lost = self.lost_from
        found = [] if lost is None else [f"chunk files are missing or cut short on disk from image {lost}"]
        table = "manifest" if self.complete else "candidates table"  # a partial cache's images to build
        if self.lost_columns is None:
            found.append(f"its {table} is missing")
        found += [
            f"its {table}'s column {c!r} is missing, garbled or cut short" for c in self.lost_columns or []
        ]
        if self.manifest_error and self.lost_columns == []:  # a missing column is said above
            found.append(self.manifest_error)
        found += [f"images {d.first}..{d.stop - 1}: {d.what}" for d in self.damaged]
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok, "problems": self.problems()}


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
        attrs: dict[str, Any] = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{location} is not a VFS feature cache (no '{FORMAT}' attribute)")
        if not known_version(attrs.get("format_version")):
            raise CacheError(
                f"{location} has format version {attrs.get('format_version')!r}; this VFS reads versions "
                f"{', '.join(map(str, FORMAT_VERSIONS))} (a newer VFS made it?)"
            )
        self.attrs = attrs
        self.allow_partial = allow_partial
        try:
            self.spec = CacheSpec.from_dict(attrs["spec"])
            _check_build_records(attrs)
            self.n = int(attrs["n"])
            if not self.complete and allow_partial:
                self.n = int(attrs["progress"]["rows"])
            if self.n < 0:
                raise ValueError(f"it counts {self.n} images")
            # What the stored features are the layer's times; caches created before say nothing: 1.
            self.feature_scale = float(attrs.get("feature_scale", 1.0))
            if not 0 < self.feature_scale < math.inf:
                raise ValueError(f"feature_scale {self.feature_scale} is not a positive number")
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{location}: its attributes are damaged ({type(e).__name__}: {e})") from e
        self.features, self.sqnorm, self.thumbs = (
            _array(group, a, location) for a in ("features", "sqnorm", "thumbs")
        )
        for arr, dtype in ((self.features, "float16"), (self.sqnorm, "float32"), (self.thumbs, "uint8")):
            check_array(arr, location, dtype)
            check_chunk_size(arr, location)
        h, w = self.spec.grid
        if self.features.shape[1:] != (h, w, self.spec.channels) or self.sqnorm.shape[1:] != (h, w):
            raise CacheError(
                f"{location}: array shapes {self.features.shape}/{self.sqnorm.shape} "
                f"do not match the spec (images, {h}, {w}, {self.spec.channels})"
            )
        # Rows past n are never read, and their counts may differ: a build that finishes resizes its
        # arrays one after another, which a reader opening the cache meanwhile sees. Once complete
        # (set last, after the resizing) they hold n: an n lowered since hid images without a word.
        held = (self.features.shape[0], self.sqnorm.shape[0])
        if min(held) < self.n or (self.complete and max(held) != self.n):
            other = min(held) if min(held) != self.n else max(held)
            raise CacheError(
                f"{location}: its attributes count {self.n} images, its arrays hold {other}: rerun its "
                "build to repair it"
            )
        every_chunk_stored = bool(attrs.get("all_chunks_stored"))
        self._features: RowReader = row_reader(self.features, location, every_chunk_stored)
        self._sqnorm: RowReader = row_reader(self.sqnorm, location, every_chunk_stored)
        self._thumbs = ZarrRows(self.thumbs, location, every_chunk_stored)  # small, compressed: zarr decodes
        self._resident: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()  # the resident copies: held while the whole cache loads
        self._thumbs_lock = threading.Lock()  # the recent thumbnails: never waits on that load
        self._manifest: pd.DataFrame | None = None
        self._columns: dict[str, np.ndarray] = {}
        self._picks: np.ndarray | None = None  # `_pick_order`
        self._recent_thumbs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._extractors: dict[str, Extractor] = {}  # by model spec: loaded once, checked once

    def __repr__(self) -> str:
        s = self.spec
        images = f"{self.n} images" if self.complete else f"incomplete, {self.stored} images stored so far"
        return (
            f"FeatureCache({self.location!r}: {images}, {s.model} · {s.layer} · "
            f"grid {s.grid[0]}×{s.grid[1]} × {s.channels} channels)"
        )

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
    def report(self) -> dict[str, Any]:
        return self.attrs.get("report", {})

    def __len__(self) -> int:
        """The images stored (`n`), as `len` of an array of their features gives."""
        return self.n

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, h, w, C) of what can be searched: refused (CacheError) for an incomplete cache not
        opened with allow_partial, so that a search says why rather than finding no images."""
        self.check_searchable()
        h, w = self.spec.grid
        return self.n, h, w, self.spec.channels

    @property
    def nbytes(self) -> int:
        """Bytes of the stored images' features (of those stored so far, in a partial cache)."""
        h, w = self.spec.grid
        return self.stored * h * w * self.spec.channels * 2

    @property
    def label_col(self) -> str | None:
        return self.spec.data.label_col

    @property
    def domain_col(self) -> str | None:
        return self.spec.data.domain_col

    @property
    def manifest(self) -> pd.DataFrame:
        """Relative path and every label / domain / metadata column, one row per image."""
        if self._manifest is None:
            with self._reading("the manifest"):
                if self.complete:
                    if "manifest" not in self.group:
                        raise CacheError(
                            f"the cache at {self.location} is damaged: its manifest is missing; rerun the "
                            "build that made it (the same command writes it again) or build it anew"
                        )
                    self._manifest = read_table(self.group, "manifest", self.n)
                elif self.allow_partial and "candidates" in self.group:
                    source_index = member_array(self.group, "source_index")
                    check_array(source_index, self.location, "int64")
                    check_chunk_size(source_index, self.location)
                    index = source_index[: self.n]
                    self._manifest = read_table(self.group, "candidates").iloc[index].reset_index(drop=True)
                elif self.allow_partial and self.replaced_on_disk():  # its candidates became the manifest
                    raise CacheError(
                        f"the cache at {self.location} was finished since it was opened: open it again"
                    )
                else:
                    raise CacheError(f"{self.location} has no manifest: the build did not finish")
        return self._manifest

    @property
    def domains(self) -> np.ndarray | None:
        return None if not self.domain_col else self._column(self.domain_col)

    def _column(self, name: str) -> np.ndarray:
        """A manifest column as numpy, converted once: every search indexes the domains and its
        top rows' paths and labels (an Arrow string column takes ms to convert each time)."""
        if name not in self._columns:
            if name not in self.manifest.columns:  # a typo, a spec edited by hand, a manifest damaged
                raise CacheError(
                    f"the manifest of the cache at {self.location} has no column {name!r} "
                    f"(columns: {', '.join(map(str, self.manifest.columns))})"
                )
            column = self.manifest[name]
            nullable = pd.api.types.is_extension_array_dtype(column.dtype) and column.dtype.kind in "iub"
            # pandas' nullable integers would come back as floats, their gaps NaN ("2.0")
            self._columns[name] = (
                column.to_numpy(dtype=object, na_value=None) if nullable else column.to_numpy()
            )
        return self._columns[name]

    def images_sharing(self, column: str, index: int) -> np.ndarray:
        """(sorted) the other images whose `column` holds image `index`'s value (none where it has
        none): those to leave out with it where one subject has many images — a patient's X-rays
        are alike in ways no finding explains, and statistics assume independent images."""
        values = self._column(column)
        (i,) = self._indices([index], "the query image")
        if pd.isna(values[i]):
            return np.empty(0, dtype=np.int64)
        same = np.flatnonzero(values == values[i])
        return same[same != i].astype(np.int64)

    def repeats(self, column: str, among: np.ndarray | None = None) -> np.ndarray:
        """(sorted) the images whose `column` value another image holds, all but one of each value's
        among the images `among` keeps (a boolean mask; all by default: a subject whose kept image
        was left out counts by another), none without a value (missing or blank): left out, each
        subject counts once — as statistics that take the images as independent need (a patient's
        X-rays are alike in ways no finding explains). The one kept is the image whose path hashes
        lowest (`_pick_order`): the same every time, and not the manifest's first, which followed
        however the manifest was sorted — normal X-rays before abnormal ones kept a patient's normal
        one, and emptied a finding's group (review)."""
        values = pd.Series(self._column(column))
        known = values.notna() & values.astype(str).str.strip().ne("")
        if among is not None:
            known &= np.asarray(among, dtype=bool)
        order = self._pick_order()
        held = values.iloc[order[known.to_numpy()[order]]]  # each value's first here is the one kept
        return np.sort(held.index[held.duplicated()].to_numpy(np.int64))

    def _pick_order(self) -> np.ndarray:
        """The images ordered by a hash of their paths: which of a subject's images `repeats` keeps,
        as if drawn at random, but the same on every machine and whatever the manifest's order."""
        if self._picks is None:
            digests = [hashlib.blake2b(str(p).encode(), digest_size=8).digest() for p in self._column("path")]
            self._picks = np.argsort(np.array(digests, dtype="S8"), kind="stable").astype(np.int64)
        return self._picks

    def counted(self, left_out: Sequence[int] | np.ndarray = (), one_per: str | None = None) -> np.ndarray:
        """(n,) bool: the images a statistic over the cache counts — all but the indices `left_out`
        and, with `one_per` (a column), each value's first image of those left (`repeats`). What the
        Distributions page and the notebook's tables count."""
        keep = np.ones(self.n, dtype=bool)
        keep[np.asarray(left_out, dtype=np.int64)] = False
        if one_per is not None:
            keep[self.repeats(one_per, among=keep)] = False
        return keep

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (the CLI's `info --json`), with what each manifest column offers to
        group by (`vfs.stats.column_summary`) once the manifest can be read."""
        try:
            columns = column_summary(self.manifest, self.label_col, self.domain_col)
        except CacheError:  # a build still running: no manifest yet
            columns = None
        return {
            "location": self.location,
            "format_version": self.attrs["format_version"],
            "complete": self.complete,
            "n": self.n,
            "stored": self.stored,
            "candidates": self.candidates,
            "spec": self.spec.to_dict(),
            "chunk": self.features.chunks[0],
            "nbytes_features": self.nbytes,
            "feature_scale": self.feature_scale,
            "report": self.report,
            "created": self.attrs.get("created"),
            "versions": self.attrs.get("versions", {}),
            "columns": columns,
            "lost_from": self.lost_from(),
            "lost_columns": self.lost_columns(),
        }

    @property
    def built(self) -> tuple[Any, ...]:
        """Which build this is — its creation time, whether it finished, its images' number and
        paths' digest, its spec —: what tells a cache rebuilt at its place from the one opened there before
        (`replaced_on_disk`), and keys what is remembered of it (a server's results and tiles)."""
        return _built(self.attrs)

    def replaced_on_disk(self) -> bool:
        """Whether another cache now stands at this location: rebuilt (another creation time or,
        once complete, other images), or finished since. What long-lived holders of its rows check
        (`ShardedSearch`): the disk's rows would no longer be theirs. A cache that cannot be read
        now (moved away, a store that does not answer) is not taken for replaced: it may be back."""
        unread: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, zarr.errors.BaseZarrError)
        unread += _network_errors()
        try:
            now = dict(zarr.open_group(self.group.store, mode="r", zarr_format=3).attrs)
        except unread:  # an HTTP server's error status too (review: it crashed every page)
            return False
        return _built(now) != self.built

    def check(self, progress: Callable[[int, int], None] | None = None) -> CacheCheck:
        """Every stored chunk read and every cell checked against its norm (`damaged_rows`), missing
        chunks and manifest columns looked for, local or remote, the manifest (a partial cache's
        candidates) read: whether a copied or long-kept cache can be trusted before a search runs
        into its damage (`python -m vfs check`). It reads the whole cache (the real 10,000-image
        Lite0 cache: about 5 s from disk, its thumbnails most of it); `progress(images done,
        images)` after each chunk. A cache rebuilt or finished meanwhile is a CacheError."""
        table = "manifest" if self.complete else "candidates"
        remote = is_url(self.location)
        manifest_error, lost_columns = None, None
        raised = _network_errors() if remote else ()  # a server failing: no damage of the cache's
        with self._reading(f"its {table}") if remote else nullcontext():
            if table in self.group:
                rows = self.n if self.complete else None  # a manifest holds the cache's images
                lost_columns = missing_columns(self.group, table, raised, rows)
                try:
                    with self._reading(f"its {table}"):
                        read_table(self.group, table, rows)
                except CacheError as e:
                    manifest_error = str(e)
            damaged = list(damaged_rows(self.group, self.stored, progress, raised))
        if self.replaced_on_disk():
            raise CacheError(
                f"the cache at {self.location} changed while it was checked (rebuilt, or its build "
                "finished): check it again"
            )
        return CacheCheck(
            self.location,
            self.stored,
            self.complete,
            self.lost_from(),
            lost_columns,
            damaged,
            manifest_error,
            without_checksum(self.group),
        )

    def lost_columns(self) -> list[str] | None:
        """The manifest columns whose files are gone from a local store ([] where none is, or where
        that cannot be told: a remote store, tables written before every chunk was stored); None
        where a complete cache's whole manifest is gone. A rerun of the build writes it again.
        Files only, no chunk read (`info`); `check` also decodes them (`CacheCheck.lost_columns`)."""
        if "manifest" in self.group:
            return lost_columns(self.group, "manifest")
        return None if self.complete else []

    def lost_from(self) -> int | None:
        """The first stored row whose chunk file is gone (a disk fault, a copy cut short) in a local
        cache whose writer stored every chunk; None where all are there, or where that cannot be told
        (a remote store). A rerun of the build computes them again."""
        store = self.group.store
        if not (self.attrs.get("all_chunks_stored") and isinstance(store, zarr.storage.LocalStore)):
            return None
        return first_lost_row(Path(store.root), self.group, self.stored)

    def list_row(self) -> dict[str, Any]:
        """What a list of caches shows of this one (see `cache_row`)."""
        return {
            "model": self.spec.model,
            "layer": self.spec.layer,
            "grid": "×".join(map(str, self.spec.grid)),
            "channels": self.spec.channels,
            "n": self.stored,  # a partial cache: the images stored so far (its n is 0 until complete)
            "labels": self.label_col,
            "domains": self.domain_col,
            "complete": self.complete,
            "stored": self.stored,
        }

    def extractor(self, model: str | None = None) -> Extractor:
        """The cache's model (or `model`: e.g. its checkpoint at another path) at the cache's layer
        and preprocessing, checked against the cache (`check_extractor`): what an outside image is
        queried with. Loaded once per model for this cache object."""
        key = model or self.spec.model
        if key in self._extractors:
            return self._extractors[key]
        try:
            extractor = load_extractor(
                model or self.spec.model, self.spec.layer, preprocess=self.spec.preprocess
            )
        except CheckpointNotFound as error:
            if model is not None:
                raise
            raise CheckpointNotFound(
                f"{error}, where the cache was built with it: name where it is now (the CLI's --model "
                "file:<path>?arch=…, or cache.extractor(model=…))"
            ) from error
        self.check_extractor(extractor.describe())
        self._extractors[key] = extractor
        return extractor

    def check_extractor(self, description: dict[str, Any]) -> None:
        """Refuse an extractor whose features cannot be compared with the cache's (an `Extractor.describe()`).

        Layer, input size, grid, channels and preprocessing must be the cache's (grid, channels and
        preprocessing when described: every `Extractor` describes them). So must the weights, where
        the cache and the extractor both know their digest — then the spec string may differ (the
        same checkpoint at another path); else the model spec must be the cache's. And the layer's
        output on the probe image (`spec.probe`), where both know it: the same weights can be loaded
        into another network. An extractor made from a module (`extractor_from_module`) is exempt
        from the spec, weights and probe: that is its user's statement
        that it is the cache's architecture, e.g. with edited weights, whose features are meant to
        differ.
        """
        architecture = "the model is not the cache's architecture at this layer"
        versions = self.attrs.get("versions", {})
        built_with = ", ".join(
            f"{lib} {versions[lib]}" for lib in ("torch", "timm", "torchvision") if lib in versions
        )
        next_steps = {
            "spec": "load the cache's model (the same weights at another path pass), or make the "
            "extractor from a model object with "
            "vfs.models.extractor_from_module (e.g. an edited copy of the cache's model)",
            "layer": "use the cache's layer (cache.spec.layer)",
            "input_size": "use the cache's input size (cache.spec.input_size; for "
            "extractor_from_module, preprocess=cache.spec.preprocess)",
            "grid": architecture,
            "channels": architecture,
            "preprocess": "make the extractor with the cache's preprocessing (cache.spec.preprocess)",
            "weights": "the model's weights are not those the cache was built with (a checkpoint "
            "rewritten since the build, or a random init another torch version draws?): load the "
            "cache's weights, or rebuild the cache",
            "probe": "the model computes other features at this layer than the cache's did, "
            "although its weights may be the same (a checkpoint loaded into a near relative of its "
            "architecture, e.g. the embedded tf_efficientnet_lite0 loaded with ?arch=efficientnet_lite0; or "
            "a library version that changed the architecture — the cache was built with "
            f"{built_with}): load the cache's model ({self.spec.model}) as it was built",
        }
        mine: dict[str, Any] = {
            "spec": self.spec.model,
            "layer": self.spec.layer,
            "input_size": self.spec.input_size,
            "grid": list(self.spec.grid),
            "channels": self.spec.channels,
            "preprocess": self.spec.preprocess.to_dict(),
            "weights": self.spec.weights,
            "probe": self.spec.probe,
        }
        theirs: dict[str, Any] = {key: description.get(key) for key in mine}
        if theirs["grid"] is not None:
            theirs["grid"] = list(theirs["grid"])
        if theirs["preprocess"] is not None:  # the same values whether from JSON or from a Preprocess
            theirs["preprocess"] = Preprocess.from_dict(theirs["preprocess"]).to_dict()
        skipped = {
            key for key in ("grid", "channels", "preprocess", "weights", "probe") if theirs[key] is None
        }
        skipped |= {key for key in ("weights", "probe") if mine[key] is None}
        if mine["weights"] is not None and mine["weights"] == theirs["weights"]:
            skipped.add("spec")  # the same weights under another name: a checkpoint that moved
        if isinstance(theirs["spec"], str) and is_module_spec(theirs["spec"]):
            skipped |= {"spec", "weights", "probe"}

        def differs(key: str) -> bool:
            if key == "probe":
                return probe_difference(mine[key], theirs[key]) > PROBE_TOLERANCE
            return bool(theirs[key] != mine[key])

        wrong = next((key for key in mine if key not in skipped and differs(key)), None)
        if wrong is None:
            return
        if wrong == "preprocess":
            a, b = mine[wrong], theirs[wrong]
            shown = "; ".join(f"{key} {a[key]!r}, not {b[key]!r}" for key in a if a[key] != b[key])
            built = f"{wrong} {shown}"
        elif wrong == "probe":
            apart = probe_difference(mine[wrong], theirs[wrong])
            built = f"a model whose layer gives the probe image features {apart:.2g} apart (relative)"
        else:
            built = f"{wrong} {mine[wrong]!r}, not {theirs[wrong]!r}"
        raise CacheError(
            f"the cache {self.location} was built with {built}: its features cannot be compared "
            f"with this extractor's; {next_steps[wrong]}"
        )

    @property
    def candidates(self) -> int:
        """The images its build started on (stored, skipped or to come): a finished cache's
        stored images and those its build skipped, a partial one's rows to be."""
        if self.complete:
            recorded = self.report.get("candidates")  # anyone's attribute: a number, or the count
            if isinstance(recorded, int) and not isinstance(recorded, bool):
                return recorded
            return self.n + len(self.report.get("skipped", []))
        return int(self.features.shape[0])

    def check_searchable(self) -> None:
        """Refuse to search an incomplete cache unless it was opened with `allow_partial=True`."""
        if not self.complete and not self.allow_partial:
            raise CacheError(
                f"{self.location} is incomplete: its build is running or was interrupted ({self.stored} of "
                f"{self.candidates} images stored). Finish the build (rerun the same build to resume it), "
                "or open it with allow_partial=True (the CLI's --allow-partial) to search the images stored "
                "so far."
            )

    # --- reading ----------------------------------------------------------------------------
    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn whatever zarr, a codec or a store raises into a CacheError saying where and what."""
        try:
            yield
        except CacheError:
            raise
        except Exception as e:  # zarr, numcodecs, fsspec and OSError all surface here
            if is_url(self.location) and isinstance(e, _network_errors()):
                status = getattr(e, "status", None)  # an HTTP error's
                if isinstance(status, int) and 400 <= status < 500:  # S3 answers 403 for a file not there
                    raise CacheError(
                        f"cannot read {what} of the cache at {self.location}: its server refuses it "
                        f"({type(e).__name__}: {e}): not there (damaged: rerun the build that made it, "
                        "or copy it again), or not allowed to this reader"
                    ) from e
                raise CacheError(  # refused, timed out, a server error: nothing wrong with the cache
                    f"cannot read {what} of the cache at {self.location}: its server did not serve it "
                    f"({type(e).__name__}: {e}); try again later, or ask whoever serves it"
                ) from e
            if not self.complete:  # its build may be writing it: finishing replaces its candidates
                raise CacheError(
                    f"cannot read {what} of the cache at {self.location} ({type(e).__name__}: {e}): a "
                    "cache being built changes as it is read — open it again; if no build of it runs, "
                    "rerun its build to resume it"
                ) from e
            raise CacheError(
                f"cannot read {what} of the cache at {self.location} ({type(e).__name__}: {e}); "
                f"the cache is damaged or unreachable: rerun its build to repair it, or copy it again"
            ) from e

    def _indices(self, indices: Any, what: str) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            if not self.n:
                raise IndexError(
                    f"{what}: the cache at {self.location} holds no images yet (its build has stored "
                    f"{self.stored}; open it with allow_partial=True to read those)"
                )
            raise IndexError(f"{what} outside 0..{self.n - 1}")
        return idx

    def image_size(self, index: int) -> tuple[int, int] | None:
        """(H, W) of an image as a viewer shows it, where its dataset is at hand (a mask file may be
        painted on it); None where it is not (moved, an index out of range: said later) or would
        have to be fetched (a torchvision dataset downloads itself: not for a mask's shape)."""
        from ..data import TORCHVISION_PREFIX, FileReader
        from ..images import upright_size

        if self.spec.data.source.startswith(TORCHVISION_PREFIX):
            return None
        try:
            path = str(self.manifest["path"].iat[index])
            reader = self._image_reader()
            if isinstance(reader, FileReader):
                return upright_size(reader.resolve(path))  # its size as stored, not as decoded (≤ 4,096 px)
            image = reader(path)
        except (LookupError, ValueError, RuntimeError, OSError, PIL.Image.DecompressionBombError):
            # a mask then has to be square, as the view (an image past twice the pixel limit: its header
            # is not read)
            return None
        return image.height, image.width

    def image(self, index: int) -> PIL.Image.Image:
        """Image `index` itself, not its thumbnail: read from the dataset the cache was built from
        (`spec.data.source`) as a build reads it — upright RGB, at its own size up to 4,096 px a
        side (larger ones are shrunk as they are decoded)."""
        (i,) = self._indices(index, "image")
        return self._image_reader()(str(self.manifest["path"].iat[i]))

    def _image_reader(self) -> Callable[[str], PIL.Image.Image]:
        from ..data import open_dataset

        spec = self.spec.data
        return open_dataset(spec.source, spec.label_col, spec.domain_col).reader

    def thumb(self, index: int) -> np.ndarray:
        """(S, S, 3) uint8: image `index` as the model saw it (its square view), at most 224 px."""
        return self.thumbs_at([int(index)])[0]

    def thumbs_at(self, indices: Any) -> np.ndarray:
        """(m, S, S, 3) thumbnails of some images: those not recently shown in one read (each chunk
        decoded once), the rest from memory — result pages show many of the same images again."""
        idx = self._indices(indices, "images")
        if not len(idx):
            return np.empty((0, *self.thumbs.shape[1:]), dtype=np.uint8)
        wanted = idx.tolist()
        with self._thumbs_lock:  # what is held now: another session may evict it during the read
            held = {i: self._recent_thumbs[i] for i in set(wanted) & self._recent_thumbs.keys()}
        missing = np.array(sorted(set(wanted) - held.keys()), dtype=np.int64)
        if len(missing):
            with self._reading(f"the thumbnails of {some_images(missing)}"):
                held.update(zip(missing.tolist(), self._thumbs.gather(missing)))
        with self._thumbs_lock:
            for i in wanted:
                self._recent_thumbs[i] = held[i]
                self._recent_thumbs.move_to_end(i)
            while len(self._recent_thumbs) > RECENT_THUMBS:
                self._recent_thumbs.popitem(last=False)
        return np.stack([held[i] for i in wanted])

    def resident_on(self, device: torch.device) -> torch.Tensor | None:
        """The fp16 features if loaded whole on `device` (see `resident`), else None."""
        held = self._resident.get((device, torch.float16))
        return None if held is None else held[0]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Some images' features as stored, (m, h, w, C) fp16: the layer's × `feature_scale` (a power
        of two, which changes no score)."""
        self.check_searchable()
        idx = self._indices(indices, "rows")
        held = self.resident_on(torch.device("cpu"))
        if held is not None:
            return gather_rows(held, idx).numpy()
        with self._reading(f"the features of {some_images(idx)}"):
            return self._features.gather(idx)

    def describe_rows(self, indices: np.ndarray, grid_boxes: list[tuple[int, int, int, int]]) -> Columns:
        """Path, label, domain and the pixel box (in the model-input view) of some images."""
        idx = np.asarray(indices, dtype=np.int64)
        s = self.spec.input_size
        return {
            "path": self._column("path")[idx],
            "pixel_box": [grid_box_to_pixels(box, self.spec.grid, (s, s)) for box in grid_boxes],
            "label": self._rows_of(self.label_col, idx) if self.label_col else [None] * len(idx),
            "domain": self._rows_of(self.domain_col, idx) if self.domain_col else [None] * len(idx),
        }

    def _rows_of(self, name: str, idx: np.ndarray) -> np.ndarray | pd.api.extensions.ExtensionArray:
        """A manifest column's values at `idx` in the manifest's own type: whole numbers with gaps
        stay pandas' nullable integers in a ranked table (as object ints and None they lost
        `Int64`'s arithmetic; app review)."""
        values = self._column(name)[idx]
        dtype = self.manifest[name].dtype
        return pd.array(values, dtype=dtype) if pd.api.types.is_extension_array_dtype(dtype) else values

    def read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """fp16 features and fp32 squared norms (checked) of the contiguous rows start..stop-1, read
        as a resident search reads them: what one search shard holds."""
        self.check_searchable()
        if not 0 <= start < stop <= self.n:
            raise IndexError(f"rows {start}..{stop - 1} are not within 0..{self.n - 1}")
        features, sqnorm = self._read_features(start, stop), self._read_sqnorm(start, stop)
        self._check_agree(start, features, sqnorm)
        return features, sqnorm

    def _read_features(self, start: int, stop: int) -> np.ndarray:
        with self._reading(f"rows {start}..{stop - 1}"):
            return self._features.read(start, stop)

    def _read_sqnorm(self, start: int, stop: int) -> np.ndarray:
        """Squared norms, checked: a NaN / inf feature shows up in its cell's norm."""
        with self._reading(f"sqnorm rows {start}..{stop - 1}"):
            q = self._sqnorm.read(start, stop)
        if not np.isfinite(q).all():
            bad = start + int(np.flatnonzero(~np.isfinite(q).reshape(len(q), -1).all(1))[0])
            raise CacheError(
                f"the cache at {self.location} holds NaN or inf features (first at row {bad}); "
                "rerun its build to repair it"
            )
        return q

    def _check_agree(self, start: int, features: np.ndarray | list[torch.Tensor], sqnorm: np.ndarray) -> None:
        """Rows read together (mapped files: one part a chunk) whose features disagree with their
        norms (`rows_disagreeing`) are damage, said as such: a rerun of the build repairs them."""
        first = start
        for part in features if isinstance(features, list) else [features]:
            bad = rows_disagreeing(part, sqnorm[first - start : first - start + len(part)])
            if len(bad):
                raise CacheError(
                    f"the cache at {self.location} is damaged: the stored features of image {first + bad[0]} "
                    "are not those its norms were summed from (a chunk file zero-filled, overwritten or "
                    "garbled since it was written): rerun its build to repair it"
                )
            first += len(part)

    def _ranges(self, rows: int) -> list[tuple[int, int]]:
        return [(a, min(a + rows, self.n)) for a in range(0, self.n, rows)]

    def resident(
        self, device: torch.device, dtype: torch.dtype = torch.float16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as features in `dtype` and fp32 squared norms on `device`, loaded once,
        chunk by chunk (converted from fp16 as each chunk arrives), or converted from the fp16
        copy held there."""
        self.check_searchable()
        with self._lock:
            held = self._resident.get((device, torch.float16))
            if (device, dtype) not in self._resident and held is not None:
                self._resident[device, dtype] = (converted(held[0], dtype), held[1])
            if (device, dtype) not in self._resident:
                x = torch.empty(self.shape, dtype=dtype, device=device)
                s = torch.empty(self.shape[:3], dtype=torch.float32, device=device)
                for a, b in self._ranges(self.features.chunks[0]):
                    features, sqnorm = self._read_features(a, b), self._read_sqnorm(a, b)
                    self._check_agree(a, features, sqnorm)
                    copy_converted(x[a:b], torch.from_numpy(features))
                    s[a:b].copy_(torch.from_numpy(sqnorm))
                self._resident[device, dtype] = (x, s)
            return self._resident[device, dtype]

    def fits(self, device: torch.device, memory_budget: int | None, *dtypes: torch.dtype) -> bool:
        """Whether the features fit `device`'s memory (or the budget) held whole in each of `dtypes`
        (fp16 when none is named)."""
        nbytes = sum(self.nbytes // 2 * d.itemsize for d in dtypes or (torch.float16,))
        if memory_budget is not None:
            return nbytes * RESIDENT_HEADROOM <= memory_budget
        if device.type == "cuda":
            return nbytes * RESIDENT_HEADROOM <= CUDA_FREE_SHARE * cuda_free_bytes(device)
        return nbytes <= DEFAULT_MEMORY_BUDGET

    def chunks(
        self, device: torch.device, memory_budget: int | None = None, dtype: torch.dtype = torch.float16
    ) -> Iterator[tuple[int, torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        """Resident in `dtype` when it fits the budget, with the fp16 features as stored beside it
        when both fit (rows to re-score are then gathered in memory, not read again); else resident
        in fp16; otherwise streamed from storage in fp16 with one range prefetched (see
        `vfs.sources.FeatureSource.chunks`)."""
        self.check_searchable()
        row_bytes = int(np.prod(self.shape[1:])) * 2
        fp16 = torch.float16
        for held in dict.fromkeys([(dtype, fp16), (dtype,), (fp16,)]):  # the first that fits
            if all((device, d) in self._resident for d in held) or self.fits(device, memory_budget, *held):
                for d in held[::-1]:  # fp16 first: the other copy is converted from it in memory
                    x, s = self.resident(device, d)
                for a, b in resident_slices(self.n, row_bytes, device):
                    yield a, x[a:b], s[a:b]
                return
        rows = STREAM_RANGE_BYTES["cuda" if device.type == "cuda" else "cpu"] // row_bytes
        if memory_budget is not None:  # two ranges in flight must fit the budget
            rows = max(1, min(rows, memory_budget // 4 // (2 * row_bytes)))
        per = self.features.chunks[0]
        rows = max(per, min(rows, MAX_MAPPED_CHUNKS * per) // per * per)  # whole chunks: none decoded twice
        mapped = device.type == "cpu"  # chunk files are mapped in place where that is how rows are read
        with ThreadPoolExecutor(1, thread_name_prefix="vfs-prefetch") as pool:
            ranges = self._ranges(rows)
            pending = pool.submit(self._fetch, *ranges[0], mapped) if ranges else None
            for i, (a, _) in enumerate(ranges):
                assert pending is not None
                features, sq = pending.result()
                pending = pool.submit(self._fetch, *ranges[i + 1], mapped) if i + 1 < len(ranges) else None
                yield a, _on(device, features), torch.from_numpy(sq).to(device)
                del features, sq

    def _fetch(
        self, start: int, stop: int, mapped: bool
    ) -> tuple[np.ndarray | list[torch.Tensor], np.ndarray]:
        with self._reading(f"rows {start}..{stop - 1}"):
            x = self._features.stream(start, stop) if mapped else self._features.read(start, stop)
        sqnorm = self._read_sqnorm(start, stop)
        self._check_agree(start, x, sqnorm)
        return x, sqnorm


def _on(device: torch.device, features: np.ndarray | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Features read into memory as a tensor on `device` (pinned for the copy to a GPU); mapped
    files, which are only read on the CPU, as they are."""
    if isinstance(features, list):
        return features
    t = torch.from_numpy(features)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _built(attrs: dict[str, Any]) -> tuple[Any, ...]:
    """`FeatureCache.built` of a cache's attributes (a partial cache's `n` is 0, its digest unset;
    its spec as JSON: `created` has whole seconds, in which a small cache of another layer builds)."""
    spec = json.dumps(attrs.get("spec"), sort_keys=True)
    return (*(attrs.get(key) for key in ("created", "complete", "n", "paths_digest")), spec)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a remote store raises where its server fails, not its cache: refused, timed out, an HTTP
    error status (aiohttp's, where fsspec's HTTP is installed)."""
    try:
        from aiohttp import ClientError
    except ImportError:
        return (ConnectionError, TimeoutError)
    return (ConnectionError, TimeoutError, ClientError)


def open_cache(location: str | Path, allow_partial: bool = False) -> FeatureCache:
    """Open a cache read-only from a local path or a URL (http(s)://, s3://, … through fsspec).

    An incomplete cache opens too (`.complete` is False) but refuses to be searched unless
    `allow_partial=True`, which searches the images its build has stored so far.
    """
    location = str(location)
    try:
        store: RemoteCacheStore | CacheStore
        if is_url(location):
            options = _remote_options(location)
            remote = RemoteCacheStore.from_url(location, read_only=True, storage_options=options)
            assert isinstance(remote, RemoteCacheStore)  # from_url makes its own class
            store = remote
        else:
            if not Path(location).exists():
                raise CacheError(f"no cache at {location}")
            folder = Path(location)
            if not (folder / "zarr.json").exists():  # zarr said "No group found in store LocalStore…"
                if (folder / ".zgroup").exists():
                    what = "a zarr 2 group (a VFS cache is a zarr 3 group)"
                elif folder.is_dir() and not any(folder.iterdir()):
                    what = "an empty folder"
                else:
                    what = "no zarr group"
                raise CacheError(
                    f"no cache at {location}: it is {what}; a cache is the folder a build writes, holding "
                    "zarr.json (e.g. caches/demo.zarr)"
                )
            store = CacheStore(location, read_only=True)
        group = zarr.open_group(store, mode="r", zarr_format=3)  # never zarr 2 (its codecs include pickle)
    except CacheError:
        raise
    except Exception as e:  # zarr / fsspec raise many kinds; the user needs the reason
        raise CacheError(
            f"cannot open the cache at {location} (a VFS cache is a zarr 3 group): {type(e).__name__}: {e}"
        ) from e
    return FeatureCache(group, location, allow_partial=allow_partial)


def _remote_options(location: str) -> dict[str, Any]:
    """fsspec's options for a cache at a URL: over HTTP, a read fails that gets no byte for
    `REMOTE_SILENCE_S` (a server that never answered held a reader for aiohttp's five minutes) or
    takes more than `REMOTE_READ_S` in all (one that sends a byte a minute)."""
    if not location.lower().startswith(("http://", "https://")):
        return {}
    import aiohttp

    quiet = REMOTE_SILENCE_S
    limits = aiohttp.ClientTimeout(total=REMOTE_READ_S, connect=quiet, sock_connect=quiet, sock_read=quiet)
    return {"client_kwargs": {"timeout": limits}}


def cache_row(
    location: str, opened: FeatureCache | CacheError, size_bytes: int | None = None
) -> dict[str, Any]:
    """One row of a list of caches (the app's cache lists): what it is, or why it cannot be opened."""
    row = {"name": cache_name(location), "path": location, "complete": False, "size_bytes": size_bytes}
    if isinstance(opened, CacheError):
        return row | {"error": str(opened)}
    return row | opened.list_row() | {"error": None}


def list_caches(root: str | Path) -> list[dict[str, Any]]:
    """Every cache under a folder, complete or partial, with a summary for the cache list."""
    out = []
    for p in sorted(Path(root).glob(f"*{CACHE_SUFFIX}")):
        try:
            opened: FeatureCache | CacheError = open_cache(p)
        except CacheError as e:
            opened = e
        size = _bytes_under(p) if isinstance(opened, FeatureCache) else None
        out.append(cache_row(str(p), opened, size))
    return out


def _bytes_under(folder: Path) -> int:
    """Bytes of the files below a folder. A running build renames files and removes folders as
    it goes: what is gone by the time it is looked at counts nothing (os.walk skips such a folder)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass
    return total
