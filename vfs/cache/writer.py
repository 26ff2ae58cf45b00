"""Writing a cache: created whole or not at all, appended chunk by chunk, progress recorded only
after the chunk's data is on disk, so that a killed build resumes (see `CacheWriter`)."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from .damage import damaged_rows, first_lost_row, missing_columns
from .format import (
    CHUNK_BYTES,
    CHUNK_MAX_IMAGES,
    COMPRESSOR,
    FORMAT,
    FORMAT_VERSIONS,
    ROW_ARRAYS,
    THUMB_CHUNK,
    CacheError,
    CacheSpec,
    format_version,
    known_version,
    library_versions,
    member_array,
    paths_digest,
    read_table,
    write_table,
)

FSYNC = os.environ.get("VFS_FSYNC", "1") != "0"
"""Flush each chunk's files to disk before its progress is recorded (power-loss safety;
`VFS_FSYNC=0` skips it)."""
_ZARR_TEMP = re.compile(
    r"\.[0-9a-f]{32}\.partial$"
)  # zarr's LocalStore writes `<key>.<uuid4 hex>.partial`, then renames
SAVE_SECONDS = 30.0
"""A partial chunk is stored when nothing was stored for this long: a killed build of a slow model
(a chunk of ViT-L features takes minutes on a CPU) loses at most about this much work."""


@dataclass(frozen=True)
class _Stored:
    item: int
    features: np.ndarray  # (h, w, C) fp16
    thumb: np.ndarray


@dataclass(frozen=True)
class _Skipped:
    item: int
    reason: str


_Pending = _Stored | _Skipped


@dataclass
class CacheWriter:
    """Appends images' features to a cache in whole chunks; progress is written after the data.

    Crash safety: the cache is created in `<out>.creating` and renamed into place once it is
    whole, so a build killed while creating leaves nothing that blocks the rerun. A chunk counts
    as written only once its files are on disk (written by zarr through a temporary file and a
    rename, then fsync'ed with their folders, unless `VFS_FSYNC=0`); only then is the progress
    attribute rewritten (zarr.json, also by rename, then fsync'ed). A kill at any moment leaves
    the last recorded progress true, and a resume redoes at most the chunk in flight, and no more
    than `save_every` seconds of it: a chunk's images computed by then are stored as they are (the
    next write completes the chunk).
    """

    path: Path
    group: zarr.Group
    spec: CacheSpec
    rows: int = 0  # images stored
    next_item: int = 0  # every candidate before this one is stored or skipped
    skipped: list[dict[str, Any]] = field(default_factory=list)
    nonnegative: bool = True  # every stored feature ≥ 0 (post-ReLU): search can use a relative bound
    feature_scale: float = (
        1.0  # the power of two stored features are the layer's times (`vfs.fp16.stored_features`)
    )
    save_every: float = SAVE_SECONDS  # seconds a partial chunk may wait before it is stored
    _pending: list[_Pending] = field(default_factory=list)
    _saved: float = field(default_factory=time.monotonic)  # when the writer last stored

    @classmethod
    def open(
        cls,
        path: str | Path,
        spec: CacheSpec,
        candidates: pd.DataFrame,
        thumb_size: int,
        resume: bool = True,
        chunk_images: int | None = None,
        job: dict[str, Any] | None = None,
        feature_scale: float = 1.0,
    ) -> CacheWriter:
        """Create the cache, or continue a partial one of the same spec (refused with the reason otherwise).

        `chunk_images` fixes the images per chunk (default: about CHUNK_BYTES of features, at most
        CHUNK_MAX_IMAGES); `feature_scale` (a power of two, `vfs.fp16.cache_feature_scale`) is
        what the builds multiply the layer's features by before storing them. Both apply when the
        cache is created; a resume keeps the cache's own, so that all its rows agree.
        `job` (the build's settings) is recorded so that the app can resume the build as it was asked.
        """
        path = Path(path)
        if not path.name or path.resolve() == Path.cwd():  # ".": its staging folder has no name, and
            raise CacheError(  # it could not be renamed onto the folder a process works in (review)
                f"{path} is the current folder: build into a folder of the cache's own, e.g. --out demo.zarr"
            )
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()  # made for it (mkdir, then a build): refused as "not a VFS cache" (CLI review)
        if path.exists() and resume:
            return cls._resume(path, spec, candidates)
        if path.exists():
            raise CacheError(f"{path} exists; remove it or resume the build")
        h, w = spec.grid
        n = len(candidates)
        if chunk_images is not None and chunk_images < 1:
            raise ValueError(f"chunk_images must be at least 1, not {chunk_images}")
        if not (0 < feature_scale < math.inf and math.frexp(feature_scale)[0] == 0.5):
            raise ValueError(f"feature_scale must be a power of two, not {feature_scale}")
        if chunk_images is None:
            chunk_images = min(CHUNK_MAX_IMAGES, CHUNK_BYTES // (h * w * spec.channels * 2))
            chunk_images -= chunk_images % THUMB_CHUNK if chunk_images > THUMB_CHUNK else 0
        per = max(1, min(n, chunk_images))
        thumb_per = math.gcd(per, THUMB_CHUNK)  # divides the feature chunk: a chunk's writes stay whole
        staging = path.with_name(path.name + ".creating")
        if staging.exists():  # a creation killed half-way: nothing in it was ever progress
            shutil.rmtree(staging)
        try:
            cls._create(staging, spec, candidates, (per, thumb_per), thumb_size, feature_scale, job)
        except BaseException:  # an unforeseen failure, an interrupt: nothing of it left on disk
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(path)
        if FSYNC:
            _fsync([path.parent])
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
        return cls(path, group, spec, feature_scale=feature_scale)

    @staticmethod
    def _create(
        staging: Path,
        spec: CacheSpec,
        candidates: pd.DataFrame,
        chunks: tuple[int, int],
        thumb_size: int,
        feature_scale: float,
        job: dict[str, Any] | None,
    ) -> None:
        """A new cache's arrays, tables and attributes, written into `staging`."""
        (h, w), (per, thumb_per), n = spec.grid, chunks, len(candidates)
        g = zarr.open_group(zarr.storage.LocalStore(staging), mode="w-")
        g.create_array(
            "features",
            shape=(n, h, w, spec.channels),
            chunks=(per, h, w, spec.channels),
            dtype="float16",
            compressors=None,
            fill_value=0,
        )
        g.create_array(
            "sqnorm",
            shape=(n, h, w),
            chunks=(per, h, w),
            dtype="float32",
            compressors=COMPRESSOR,
            fill_value=0,
        )
        g.create_array(
            "thumbs",
            shape=(n, thumb_size, thumb_size, 3),
            chunks=(thumb_per, thumb_size, thumb_size, 3),
            dtype="uint8",
            compressors=COMPRESSOR,
            fill_value=0,
        )
        g.create_array(
            "source_index", shape=(n,), chunks=(per,), dtype="int64", compressors=COMPRESSOR, fill_value=-1
        )
        write_table(g, "candidates", candidates)
        g.attrs.update(
            {
                "format": FORMAT,
                "format_version": format_version([str(c) for c in candidates.columns]),
                "spec": spec.to_dict(),
                "n": 0,
                "complete": False,
                "progress": {"rows": 0, "next_item": 0, "skipped": [], "nonnegative": True},
                "versions": library_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "all_chunks_stored": True,  # even all-zero chunks: a missing chunk file means damage
                "feature_scale": feature_scale,
                **({"job": job} if job is not None else {}),
            }
        )
        if FSYNC:
            _fsync(
                [
                    *(p for p in staging.rglob("*") if p.is_file()),
                    *(p for p in staging.rglob("*") if p.is_dir()),
                    staging,
                ]
            )

    @classmethod
    def _resume(cls, path: Path, spec: CacheSpec, candidates: pd.DataFrame) -> CacheWriter:
        try:
            g = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
            attrs: dict[str, Any] = dict(g.attrs)
        except Exception as e:  # not a zarr group, unreadable metadata, ...
            raise CacheError(
                f"{path} exists and is not a VFS cache ({type(e).__name__}: {e}); choose another output"
            ) from e
        if attrs.get("format") != FORMAT:
            raise CacheError(
                f"{path} exists and is no VFS cache (a zarr group of another kind); choose another output"
            )
        if not known_version(attrs.get("format_version")):
            raise CacheError(
                f"{path} is a VFS cache of format version {attrs.get('format_version')!r}, this VFS writes "
                f"versions {', '.join(map(str, FORMAT_VERSIONS))}: build into another output, or resume it "
                "with the VFS that made it"
            )
        recorded = CacheSpec.from_dict(attrs["spec"])
        # Where the dataset or a checkpoint is may change (another folder, another machine; a path
        # recorded relative before VFS made it absolute); what they are may not: the weights' digest says.
        moved = (
            recorded.model != spec.model and recorded.weights is not None and recorded.weights == spec.weights
        )
        model = recorded.model if moved else spec.model
        reason = recorded.mismatch(
            replace(spec, model=model, data=replace(spec.data, source=recorded.data.source))
        )
        if reason:  # other images first: a setting's difference (a domain column) may follow from them
            raise _other_images(path, g, attrs, candidates) or CacheError(
                f"{path} was built with another setting ({reason}); {_elsewhere_or_resume(attrs)}"
            )
        damaged, complete = None, bool(attrs.get("complete"))
        if complete:
            _check_finished_on(path, g, attrs, candidates)
            n = int(attrs["n"])
            lost_manifest = _manifest_lost(g, n)
            damaged = _first_garbled(g, n)
            # arrays of another length than n: its n edited, or a repair killed before its first step
            resized = any(member_array(g, name).shape[0] != n for name in ROW_ARRAYS)
            if (
                _lost_from(path, g, attrs, n) is None
                and damaged is None
                and not lost_manifest
                and not resized
            ):
                raise AlreadyComplete(f"{path} is already complete: nothing to do")
            if lost_manifest:
                warnings.warn(f"{path}: {lost_manifest} on disk; the build writes it again", stacklevel=3)
            _reopen(g, candidates)  # files gone since: the resume below computes and writes them again
            attrs = dict(g.attrs)
        started = _candidates_table(path, g)
        if started is not None:
            _check_same_images(path, started, candidates, _elsewhere_or_resume(attrs))
        elif "manifest" in g:  # killed in `finish` after the candidates went: the stored rows say it
            _check_stored_images(
                path, g, candidates, int(attrs["progress"]["next_item"]), _elsewhere_or_resume(attrs)
            )
        shutil.rmtree(path / _DELETED_CANDIDATES, ignore_errors=True)  # what such a kill left
        if recorded.data.source != spec.data.source or moved:  # a resume reruns where they are now
            now = {"data": spec.data.to_dict()} | ({"model": spec.model} if moved else {})
            job = {"data": spec.data.source} | ({"model": spec.model} if moved else {})
            g.attrs.update(
                {"spec": attrs["spec"] | now}  # the rest stays as recorded
                | ({"job": attrs["job"] | job} if "job" in attrs else {})
            )
        for leftover in path.rglob("*.partial"):  # zarr's temporary files from writes a kill interrupted
            if _ZARR_TEMP.search(leftover.name):
                leftover.unlink(missing_ok=True)
        p = attrs["progress"]
        rows, next_item, skipped = p["rows"], p["next_item"], list(p["skipped"])
        gone = _lost_from(path, g, attrs, rows)
        if not complete:  # a finished cache's rows were checked above
            damaged = _first_garbled(g, rows)
        lost = min((r for r in (gone, damaged) if r is not None), default=None)
        # chunk files gone or damaged (a copy taken mid-build, a disk fault): redo from there
        if lost is not None:
            rows = lost - lost % member_array(g, "features").chunks[0]
            last = np.asarray(member_array(g, "source_index")[max(rows - 1, 0) : rows])  # kept, or none
            next_item = int(last[0]) + 1 if rows else 0
            skipped = [s for s in skipped if s["item"] < next_item]
            what = (
                "missing"
                if lost == gone
                else "damaged (it does not decode, or its features are not its norms')"
            )
            warnings.warn(
                f"{path}: a chunk file of the cache is {what} on disk (its first image: {lost}); the "
                f"build computes images {rows}..{p['rows'] - 1} again, from its chunk on",
                stacklevel=3,
            )
        _full_length(g, len(candidates))
        writer = cls(
            path,
            g,
            spec,
            rows=rows,
            next_item=next_item,
            skipped=skipped,
            nonnegative=bool(p.get("nonnegative", False)),
            feature_scale=float(attrs.get("feature_scale", 1.0)),  # none: created before scales, unscaled
        )
        if lost is not None:  # a reader must not count the lost rows, even if the build stops now
            writer._record_progress()
        return writer

    @property
    def chunk(self) -> int:
        return member_array(self.group, "features").chunks[0]

    def add(self, item: int, features: np.ndarray, thumb: np.ndarray) -> None:
        if not np.isfinite(features).all():  # fp16 overflows to inf beyond ±65504: unsearchable
            self.skip(item, "its features contain NaN or inf (activations beyond the float16 range?)")
            return
        self._pending.append(_Stored(item, features, thumb))
        self._flush(whole_chunks_only=time.monotonic() - self._saved < self.save_every)

    def skip(self, item: int, reason: str) -> None:
        self._pending.append(_Skipped(item, reason))

    def flush(self) -> None:
        """Store every image handed over, a partial last chunk too: a cancelled build keeps all it
        computed (a later write completes the chunk; progress is recorded after each write)."""
        self._flush(whole_chunks_only=False)

    def _flush(self, whole_chunks_only: bool) -> None:
        while True:
            stored = [i for i, p in enumerate(self._pending) if isinstance(p, _Stored)]
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
        good = [p for p in batch if isinstance(p, _Stored)]
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
        self.skipped += [{"item": p.item, "reason": p.reason} for p in batch if isinstance(p, _Skipped)]
        # Progress only after the data is on disk: a kill before this line redoes the chunk.
        self._record_progress()
        self._saved = time.monotonic()

    def _record_progress(self) -> None:
        self.group.attrs["progress"] = {
            "rows": self.rows,
            "next_item": self.next_item,
            "skipped": self.skipped,
            "nonnegative": self.nonnegative,
        }
        self._sync_attrs()

    def _array(self, name: str) -> zarr.Array:
        """An array that stores every chunk, even one equal to the fill value (zarr skips those by
        default), so that a reader can tell a missing chunk file from a chunk of zeros."""
        return member_array(self.group, name).with_config({"write_empty_chunks": True})

    def _sync_rows(self, a: int, b: int) -> None:
        """fsync the chunk files holding rows a..b-1 of every array, and the folders naming them."""
        if not FSYNC:
            return
        files: list[Path] = []
        folders: set[Path] = set()
        for name in ROW_ARRAYS:
            arr = member_array(self.group, name)
            per, tail = arr.chunks[0], (0,) * (arr.ndim - 1)
            for i in range(a // per, (b - 1) // per + 1):
                f = self.path / name / arr.metadata.encode_chunk_key((i, *tail))
                files.append(f)
                folders.update(d for d in f.parents if d.is_relative_to(self.path / name))
        _fsync(files + sorted(folders, key=lambda d: -len(d.parts)))

    def _sync_attrs(self) -> None:
        if FSYNC:
            _fsync([self.path / "zarr.json", self.path])

    def finish(self, candidates: pd.DataFrame, extra_report: dict[str, Any] | None = None) -> None:
        """Store what is left, write the manifest of the stored images, and mark the cache complete.

        Every step can be redone: a build killed here resumes with nothing left to compute and
        finishes again; `complete` is set last, in one write with `n` and the report.
        """
        self.flush()
        index = member_array(self.group, "source_index")[: self.rows]
        manifest = candidates.iloc[index].reset_index(drop=True)
        write_table(self.group, "manifest", manifest)
        digest = paths_digest(manifest["path"].astype(str))
        for name in ROW_ARRAYS:
            arr = member_array(self.group, name)
            arr.resize((self.rows, *arr.shape[1:]))
        if (self.path / "candidates").exists():  # renamed first: whole, or gone from the group at once
            shutil.rmtree(self.path / _DELETED_CANDIDATES, ignore_errors=True)
            (self.path / "candidates").rename(self.path / _DELETED_CANDIDATES)
            shutil.rmtree(self.path / _DELETED_CANDIDATES)
        paths = candidates["path"].astype(str).to_numpy()
        report: dict[str, Any] = {
            "candidates": len(candidates),
            "stored": self.rows,
            "skipped": [{"path": paths[s["item"]], "reason": s["reason"]} for s in self.skipped],
        }
        if FSYNC:
            _fsync(
                [p for p in (self.path / "manifest").rglob("*") if p.is_file()]
                + [self.path / name / "zarr.json" for name in ROW_ARRAYS]
            )
        self.group.attrs.update(
            {
                "n": self.rows,
                "report": report | (extra_report or {}),
                "nonnegative": self.nonnegative,
                "paths_digest": digest,
                "complete": True,
            }
        )
        self._sync_attrs()


class AlreadyComplete(CacheError):
    """A rerun of a build that finished: nothing is left to do."""


_DELETED_CANDIDATES = "candidates.deleted"
"""`finish` renames the candidates table so before it deletes it: a kill while zarr removed it
in place left a group whose columns were partly gone, and every rerun failed reading it."""


def _candidates_table(path: Path, group: zarr.Group) -> pd.DataFrame | None:
    """The images the build started on, or None where `finish` has deleted them — also where a
    kill left them half deleted in place (before `_DELETED_CANDIDATES`), a manifest being written:
    a column gone, or a chunk of one (zarr reads it as missing values; a path never is one)."""
    if "candidates" not in group:
        return None
    try:
        table = read_table(group, "candidates")
    except (KeyError, CacheError):
        table = None
    if table is not None and "path" in table and not table["path"].isna().any():
        return table
    if "manifest" not in group:
        raise CacheError(f"{path}: its table of candidate images is damaged; choose another output")
    shutil.rmtree(path / "candidates", ignore_errors=True)
    return None


_JOB_SETTINGS = ("model", "layer", "data", "image_size", "limit", "label_col", "domain_col")
"""The recorded job's settings a refused resume names (`_elsewhere_or_resume`)."""


def _elsewhere_or_resume(attrs: dict) -> str:
    """What to do when a build's settings do not fit its output: another output, or — for a partial
    cache that records its job — that job again, whose settings the user may have forgotten one of
    (a limit: "choose another output" alone threw the stored images away; review)."""
    job = attrs.get("job")
    if attrs.get("complete") or not job:
        return "choose another output"
    started = ", ".join(f"{key} {job[key]}" for key in _JOB_SETTINGS if job.get(key) not in (None, ""))
    return (
        f"choose another output, or resume it with the settings it was started with ({started}; "
        "the Build page's Resume build does)"
    )


def _check_stored_images(
    path: Path, group: zarr.Group, candidates: pd.DataFrame, handled: int, instead: str
) -> None:
    """Refuse to finish on other images than those stored: as many candidates as the build
    handled (`finish` runs once every one is stored or skipped), and the manifest it wrote equal to
    the candidates at the stored rows' source indices. `instead`: what to do then."""
    if len(candidates) != handled:
        raise CacheError(
            f"{path} was started on a dataset of {handled} images, this one has {len(candidates)}; {instead}"
        )
    stored = read_table(group, "manifest", columns=["path"])["path"].astype(str).to_numpy()
    index = np.asarray(member_array(group, "source_index")[: len(stored)], dtype=np.int64)
    now = candidates["path"].astype(str).to_numpy()
    if len(index) != len(stored) or (len(index) and index.max() >= len(now)) or (now[index] != stored).any():
        raise CacheError(f"{path} was started on other images than these; {instead}")


def _check_same_images(path: Path, started: pd.DataFrame, candidates: pd.DataFrame, instead: str) -> None:
    """Refuse a resume on other images than the build started on (same paths, in order); `instead`:
    what to do then."""
    if len(started) != len(candidates):
        raise CacheError(
            f"{path} was started on a dataset of {len(started)} images, this one has "
            f"{len(candidates)}; {instead}"
        )
    before, now = started["path"].astype(str).to_numpy(), candidates["path"].astype(str).to_numpy()
    differ = np.flatnonzero(before != now)
    if differ.size:
        i = int(differ[0])
        raise CacheError(
            f"{path} was started on other images (image {i}: {before[i]!r} there, {now[i]!r} here); {instead}"
        )


def _first_garbled(group: zarr.Group, rows: int) -> int | None:
    """The first of `rows` stored images whose chunk does not decode or whose features are not
    their norms' (`damaged_rows`); a missing chunk is `_lost_from`'s, and said as missing."""
    return next((d.first for d in damaged_rows(group, rows) if not d.missing), None)


def _lost_from(path: Path, group: zarr.Group, attrs: dict[str, Any], rows: int) -> int | None:
    """`first_lost_row` where the writer stored every chunk; caches written before that skipped
    all-zero chunks (zarr's default), so a missing file there is such a chunk, not damage."""
    return first_lost_row(path, group, rows) if attrs.get("all_chunks_stored") else None


def _manifest_lost(group: zarr.Group, n: int) -> str | None:
    """What a finished cache of `n` images lost of its manifest ("its manifest is missing", "its
    manifest's column(s) 'label' are missing"); None where it is whole."""
    if "manifest" not in group:
        return "its manifest is missing"
    lost = missing_columns(group, "manifest", rows=n)  # every chunk decoded: a garbled one is lost too
    return (
        f"its manifest's column(s) {', '.join(map(repr, lost))} are missing, garbled or cut short"
        if lost
        else None
    )


def _reopen(group: zarr.Group, candidates: pd.DataFrame) -> None:
    """A complete cache whose chunk files went missing (a disk fault, a copy cut short) back to
    the partial build it was when it finished — its candidates, its arrays at their full length,
    the progress `finish` left (every row stored) — so that the resume redoes the lost rows and
    finishes again. A kill at any step leaves it complete and damaged, or partial: a rerun goes on."""
    write_table(group, "candidates", candidates)
    # partial first: a complete cache's arrays hold its n, as its readers check
    group.attrs.update({"complete": False, "n": 0})
    _full_length(group, len(candidates))


def _full_length(group: zarr.Group, candidates: int) -> None:
    """A partial cache's row arrays at the length of its candidates, where the writer stores them
    (a finished one's were shrunk to its images; a kill may come between its reopening's steps)."""
    for name in ROW_ARRAYS:
        arr = member_array(group, name)
        if arr.shape[0] != candidates:
            arr.resize((candidates, *arr.shape[1:]))


def _check_finished_on(
    path: Path, group: zarr.Group, attrs: dict[str, Any], candidates: pd.DataFrame
) -> None:
    """Refuse a rerun of a finished build on other images than it stored (its manifest less the
    skipped ones, or, where the manifest's paths are lost on disk, their digest): only the same
    dataset has nothing left to do, or can repair it."""
    report = attrs.get("report", {})
    built_on = report.get("candidates")
    if built_on != len(candidates):
        raise CacheError(
            f"{path} is complete, built on a dataset of {built_on} images; this one has {len(candidates)}: "
            "build it into another output (a cache holds the images it was built on)"
        )
    skipped = {s["path"] for s in report.get("skipped", [])}
    wanted = [p for p in candidates["path"].astype(str) if p not in skipped]
    if "manifest" not in group or "path" in missing_columns(group, "manifest", rows=int(attrs["n"])):
        if "paths_digest" not in attrs:
            raise CacheError(
                f"{path} is damaged: its manifest's paths are missing on disk, and it was built before VFS "
                "recorded their digest, so its images cannot be checked; build it anew (remove it, or "
                "build into another output)"
            )
        same = attrs["paths_digest"] == paths_digest(wanted)
    else:
        same = read_table(group, "manifest", int(attrs["n"]), ["path"])["path"].astype(str).tolist() == wanted
    if not same:
        raise CacheError(f"{path} is complete, built from other images than these; choose another output")


def _other_images(path: Path, group: zarr.Group, attrs: dict, candidates: pd.DataFrame) -> CacheError | None:
    """Why the cache at `path` holds other images than `candidates`, or None where it holds these
    (or cannot tell): said before another setting, which named a dataset's domain column where the
    dataset itself was another (review)."""
    try:
        if attrs.get("complete"):
            _check_finished_on(path, group, attrs, candidates)
        elif (started := _candidates_table(path, group)) is not None:
            _check_same_images(path, started, candidates, _elsewhere_or_resume(attrs))
    except CacheError as e:
        return e
    return None


def _fsync(paths: Iterable[Path]) -> None:
    """Flush files (and folders: their entries) to disk; a folder that cannot be opened is
    skipped (Windows)."""
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
