"""Image datasets: where images come from (decoding each one safely is `vfs.images`').

A dataset is a table of records (``path`` first, then labels and metadata) plus a
*reader* that turns a record's ``path`` into an RGB image.  Sources:

* a folder of images (recursive; label = the first sub-folder below the folders all images share),
* a ``.csv`` / ``.parquet`` manifest with a ``path`` column (other columns kept),
* ``embedded:skimage`` - an offline demo built from scikit-image's bundled images,
* ``torchvision:<Dataset>[?root=DIR&split=S&...]`` - downloaded by torchvision.

Every image a reader gives is decoded by :func:`vfs.images.load_image`, which treats each file as
hostile.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd
import skimage.data
import torch
from PIL import Image
from torch.utils.data import default_collate

from .images import IMAGE_EXTENSIONS, ImageError, load_image, to_rgb

EMBEDDED_DATASET = "embedded:skimage"
TORCHVISION_PREFIX = "torchvision:"
MANIFEST_EXTENSIONS = frozenset({".csv", ".parquet"})

TORCHVISION_ROOT = Path("~/.cache/vfs/datasets")

# scikit-image sample photos that ship inside the wheel (no pooch download needed).
_SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip
_LFW_FACES = 100  # skimage.data.lfw_subset(): first 100 images are faces, last 100 are not


class DatasetUnavailable(RuntimeError):
    """A dataset source cannot be reached (typically: a download without internet)."""


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DataSpec:
    """What to open: enough to reopen the same dataset later (saved with a cache)."""

    source: str
    label_col: str | None = None
    domain_col: str | None = None

    def __post_init__(self) -> None:  # a cache's attributes come from strangers: checked as read
        if not isinstance(self.source, str):
            raise TypeError(f"a dataset source is text (a folder, a manifest, …), not {self.source!r}")
        for role, column in (("label", self.label_col), ("domain", self.domain_col)):
            if column is not None and not isinstance(column, str):
                raise TypeError(f"the {role} column is named by text, not {column!r}")

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """The one way back from `to_dict`; unknown keys are ignored so older/newer saved specs still load."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Records plus a reader; ``spec`` holds the resolved label/domain columns."""

    spec: DataSpec
    records: pd.DataFrame
    reader: Callable[[str], Image.Image]  # record path -> RGB image; picklable for DataLoader workers

    def __post_init__(self) -> None:
        if list(self.records.columns[:1]) != ["path"]:
            raise ValueError("records must have 'path' as their first column")
        for role, column in (("label", self.label_col), ("domain", self.domain_col)):
            if column is not None and column not in self.records.columns:
                available = ", ".join(map(str, self.records.columns))
                raise ValueError(f"{role} column {column!r} not found; available columns: {available}")

    @property
    def label_col(self) -> str | None:
        return self.spec.label_col

    @property
    def domain_col(self) -> str | None:
        return self.spec.domain_col

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> Image.Image:
        """RGB image of record ``i``; raises :class:`ImageError` for an unusable image."""
        return self.reader(str(self.records["path"].iat[i]))

    def limit(self, n: int) -> ImageDataset:
        """The first ``n`` records (quick runs, ``--limit``)."""
        if n < 0:
            raise ValueError(f"limit must be >= 0, got {n}")
        return replace(self, records=self.records.iloc[:n].reset_index(drop=True))


def open_dataset(source: str, label_col: str | None = None, domain_col: str | None = None) -> ImageDataset:
    """Open a dataset source (folder, manifest, ``embedded:skimage`` or ``torchvision:...``).

    Without explicit columns (None), ``label`` is the label column when present and the domain
    column is ``domain`` (``source`` for the embedded demo) when present; ``""`` means none.
    """
    default_domain = "domain"
    reader: Callable[[str], Image.Image]
    if source == EMBEDDED_DATASET:
        records, reader = _skimage_records(), SkimageReader()
        default_domain = "source"
    elif source.startswith(TORCHVISION_PREFIX):
        records, reader = _torchvision_records(source[len(TORCHVISION_PREFIX) :])
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            records, reader = _folder_records(path), FileReader(path.resolve())
        elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
            records, reader = _manifest_records(path)
        else:
            kinds = (
                f"an image folder, a .csv/.parquet manifest, {EMBEDDED_DATASET!r} or "
                "'torchvision:<Dataset>[?split=...]'"
            )
            if path.exists():
                raise ValueError(
                    f"the dataset {source!r} is not a folder or a .csv/.parquet file: give {kinds}"
                )
            where = "" if path.is_absolute() else f" (from {Path.cwd()}: {path.resolve()})"
            raise ValueError(f"no such folder or file: {source!r}{where}; a dataset is {kinds}")
    if label_col is None:
        label_col = "label" if "label" in records.columns else None
    if domain_col is None:
        domain_col = default_domain if default_domain in records.columns else None
    if not (source == EMBEDDED_DATASET or source.startswith(TORCHVISION_PREFIX)):
        source = str(Path(source).expanduser().resolve())  # one name from any folder: resumes, Compare
    return ImageDataset(DataSpec(source, label_col or None, domain_col or None), records, reader)


@dataclass(frozen=True)
class FileReader:
    """Reads record paths relative to ``root``; refuses any path that leaves it."""

    root: Path

    def resolve(self, path: str) -> Path:
        """Lexical check (no symlink resolution): ``..`` and outside absolute paths are refused,
        while symlinks placed inside the root by the data's owner keep working."""
        full = Path(os.path.normpath(self.root / path))
        if not full.is_relative_to(self.root):
            raise ValueError(
                f"image path {path!r} resolves outside the dataset root {str(self.root)!r}: a manifest's "
                "paths are relative to its folder and may not leave it (absolute paths and '..' are "
                "refused, docs/security.md) — write them relative to a manifest placed above the images, "
                "or link the image folder inside the manifest's"
            )
        return full

    def __call__(self, path: str) -> Image.Image:
        return load_image(self.resolve(path))


def _image_files(root: Path) -> Iterator[str]:
    """The image files under `root`, relative to it, through linked folders too (datasets are often
    assembled from links; once each folder: a loop of links ends); hidden files and folders left
    out. A link to a file gone is listed: the build reports it skipped. A folder that cannot be
    listed, or a file name that is not UTF-8 (a cache's paths are text), stops the listing with a
    ValueError naming it: the dataset would be another than its owner's (`Path.rglob` left out
    linked and unreadable folders without a word)."""
    seen: set[tuple[int, int]] = set()
    unlisted: list[OSError] = []
    inside = root.resolve()
    for folder, subfolders, files in os.walk(root, onerror=unlisted.append, followlinks=True):
        if unlisted:
            break
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:  # reached again through a link
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        # in order, a link into the dataset itself left out: its folder is listed where it is (a link
        # met first in the listing's order took its images, named and labelled by the link: review)
        subfolders[:] = sorted(
            d
            for d in subfolders
            if not d.startswith(".")
            and not (
                os.path.islink(link := os.path.join(folder, d))
                and Path(link).resolve().is_relative_to(inside)
            )
        )
        relative = Path(folder).relative_to(root)
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = (relative / name).as_posix()
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                raise ValueError(
                    f"{shown!r} in {str(root)!r}: its name is not UTF-8 (e.g. Latin-1 from an old "
                    "archive), which a cache's paths must be; rename it (convmv -f latin1 -t utf8) or "
                    "move it out of the folder"
                ) from None
            yield path
    if unlisted:
        e = unlisted[0]
        raise ValueError(
            f"cannot list {e.filename!r} in the dataset folder ({e.strerror}): its images would be left "
            "out; make it readable, or move it out of the folder"
        )


def _folder_records(root: Path) -> pd.DataFrame:
    """Images under ``root`` in sorted order; hidden files (e.g. macOS ``._x.jpg``) skipped.

    ``label`` is the first sub-folder below the folders that *all* images share, so that
    ``root/dataset/cat/1.jpg`` (an unzipped archive) still gives "cat".  Images directly
    in that shared folder get a missing label (None) rather than "" so they never form a
    class of their own; with no sub-folders at all there is no ``label`` column.
    """
    paths = sorted(_image_files(root))
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {str(root)!r}")
    records = pd.DataFrame({"path": paths})
    shared = os.path.commonpath([os.path.dirname(p) for p in paths])
    below = [p[len(shared) + 1 :] if shared else p for p in paths]
    if any("/" in p for p in below):
        records["label"] = [p.split("/", 1)[0] if "/" in p else None for p in below]
    return records


_LEADING_ZERO = re.compile(r"^\s*[+-]?0\d")
_WHOLE_NUMBER = re.compile(r"[+-]?\d+")
_NUMBERS_MISSING = ("NA", "N/A", "n/a", "NaN", "nan", "-nan", "NULL", "null", "None", "#N/A", "<NA>")
"""How R, numpy, spreadsheets and databases write a missing number: missing in a column of numbers."""


def _read_csv(manifest: Path) -> pd.DataFrame:
    """A CSV manifest with its values as written: in a text column only an empty cell is missing
    (pandas also took "NA" — North America —, "None", "null" for missing); in a column of numbers
    "NA", "nan" and the like are missing too (R writes NA); a column with a number written with a
    leading zero ("0012": an ID) stays text."""
    text = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    ids, numbers, whole = [], [], {}
    for column in text.columns:
        values = text[column].str.strip()
        written = values[(values != "") & ~values.isin(_NUMBERS_MISSING)]
        if values.str.match(_LEADING_ZERO).any():
            ids.append(column)
        elif len(written) and pd.to_numeric(written, errors="coerce").notna().all():
            numbers.append(column)
            parsed = pd.to_numeric(written) if written.str.fullmatch(_WHOLE_NUMBER).all() else None
            if len(written) < len(values) and parsed is not None and parsed.dtype == np.int64:
                # whole numbers with gaps: pandas read them as floats ("2.0"); none past int64
                whole[column] = pd.Series(parsed, index=values.index, dtype="Int64")
    missing = {c: ["", *(_NUMBERS_MISSING if c in numbers else ())] for c in text.columns}
    records = pd.read_csv(manifest, keep_default_na=False, na_values=missing, dtype=dict.fromkeys(ids, str))
    return records.assign(**whole)


def _manifest_records(manifest: Path) -> tuple[pd.DataFrame, FileReader]:
    """Read a manifest; every path is checked up front so a hostile one fails at open time."""
    try:
        parquet = manifest.suffix.lower() == ".parquet"
        records = pd.read_parquet(manifest) if parquet else _read_csv(manifest)
    except ValueError as e:  # pandas' parser errors, an empty file, bad text encoding, pyarrow's
        raise ValueError(f"manifest {str(manifest)!r} cannot be read as a table ({e})") from e
    if "path" not in records.columns:
        found = ", ".join(map(str, records.columns))
        other = next((sep for sep in ";\t|" if any(sep in str(c) for c in records.columns)), None)
        hint = f"; its header reads as {other!r}-separated: VFS reads comma-separated CSV" if other else ""
        raise ValueError(f"manifest {str(manifest)!r} has no 'path' column (columns: {found}){hint}")
    if records.empty:  # as an empty folder is: a cache of no images could only be refused later
        raise ValueError(f"manifest {str(manifest)!r} lists no images")
    missing = records.index[records["path"].isna()].tolist()
    if missing:
        raise ValueError(
            f"manifest {str(manifest)!r} has rows without a path (rows {missing[:5]}); "
            "fill them in or drop them"
        )
    reader = FileReader(manifest.parent.resolve())
    records["path"] = [_as_on_disk(reader, str(p)) for p in records["path"]]
    for path in records["path"]:
        reader.resolve(path)
    columns = ["path", *(c for c in records.columns if c != "path")]
    return records[columns].reset_index(drop=True), reader


def _as_on_disk(reader: FileReader, path: str) -> str:
    """A manifest's path as its file is named: one written on Windows (`images\\a.jpg`) or with
    spaces around it (a spreadsheet's) names no file here, and every image was "No such file or
    directory" (data review) — where the path as written names none, the one with `/` and without
    the spaces is taken if it names a file."""
    cleaned = path.strip().replace("\\", "/")
    if cleaned == path or os.path.lexists(reader.resolve(path)):
        return path
    try:
        return cleaned if os.path.lexists(reader.resolve(cleaned)) else path
    except ValueError:  # it leaves the root: the path as written is refused, in its own words
        return path


@cache
def _lfw_subset() -> np.ndarray:
    """LFW subset as uint8 (skimage gives floats in [0, 1]); cached per process."""
    return np.round(skimage.data.lfw_subset() * 255).astype(np.uint8)


def _skimage_records() -> pd.DataFrame:
    lfw = [("face", i) for i in range(_LFW_FACES)] + [("nonface", i) for i in range(_LFW_FACES)]
    rows = [(f"samples/{name}", "photo", "samples", name) for name in _SKIMAGE_PHOTOS] + [
        (f"lfw/{kind}_{i:03d}", "face" if kind == "face" else "not face", "lfw", f"{kind}_{i:03d}")
        for kind, i in lfw
    ]
    return pd.DataFrame(rows, columns=["path", "label", "source", "name"])


@dataclass(frozen=True)
class SkimageReader:
    """Reader for ``embedded:skimage`` virtual paths (``samples/<name>``, ``lfw/<kind>_<i>``)."""

    def __call__(self, path: str) -> Image.Image:
        group, _, name = path.partition("/")
        if group == "samples" and name in _SKIMAGE_PHOTOS:
            return to_rgb(Image.fromarray(getattr(skimage.data, name)()))
        kind, _, number = name.partition("_")
        if group == "lfw" and kind in ("face", "nonface") and number.isdecimal() and int(number) < _LFW_FACES:
            row = int(number) + (_LFW_FACES if kind == "nonface" else 0)
            return to_rgb(Image.fromarray(_lfw_subset()[row]))
        raise ImageError(f"no embedded image {path!r}")


@dataclass(frozen=True)
class TorchvisionReader:
    """Reader for ``<Dataset>/<split>/<index>`` paths of a constructed torchvision dataset."""

    dataset: torch.utils.data.Dataset

    def __call__(self, path: str) -> Image.Image:
        image = self.dataset[int(path.rsplit("/", 1)[1])][0]
        if not isinstance(image, Image.Image):
            raise ImageError(f"torchvision returned {type(image).__name__}, not an image")
        return to_rgb(image)


def _torchvision_records(spec: str) -> tuple[pd.DataFrame, TorchvisionReader]:
    """Build ``torchvision:<Dataset>?root=&split=&<other constructor args>`` with download=True.

    ``split`` maps to ``train=`` for datasets like CIFAR10 that only take a boolean.
    """
    import torchvision.datasets  # here: its import (1.3 s, torch._dynamo with it) held every search's

    name, _, query = spec.partition("?")
    options = dict(parse_qsl(query))
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset)):
        raise ValueError(f"unknown torchvision dataset {name!r} (e.g. CIFAR10, Imagenette, STL10)")
    root = Path(options.pop("root", TORCHVISION_ROOT)).expanduser()
    params = inspect.signature(cls).parameters
    if "download" not in params:
        raise ValueError(f"torchvision dataset {name} cannot be downloaded; use a folder or manifest instead")
    kwargs: dict[str, Any] = {}
    split = options.pop("split", None)
    if "split" in params:
        split = split or params["split"].default
        if split is inspect.Parameter.empty:
            raise ValueError(f"{name} needs a split, e.g. torchvision:{name}?split=train")
        kwargs["split"] = split
    elif "train" in params:
        split = split or "train"
        if split not in ("train", "test"):
            raise ValueError(f"{name} only has 'train' and 'test' splits, not {split!r}")
        kwargs["train"] = split == "train"
    elif split is not None:
        raise ValueError(f"{name} takes no split; leave out ?split=")
    unknown = set(options) - set(params)
    if unknown:
        raise ValueError(f"{name} has no option(s) {sorted(unknown)}; it takes {sorted(params)}")
    kwargs.update(options)
    try:
        dataset = cls(root=str(root), download=True, **kwargs)
    except Exception as e:  # urllib/HTTP/checksum/extraction errors all mean "not available"
        raise DatasetUnavailable(
            f"could not download torchvision dataset {name} into {str(root)!r} ({type(e).__name__}: {e}). "
            f"No internet? Use an offline source instead: a folder of images, a .csv/.parquet manifest, "
            f"or {EMBEDDED_DATASET!r}."
        ) from e
    split_name = split or "all"
    classes = [c[0] if isinstance(c, tuple) else str(c) for c in getattr(dataset, "classes", [])]
    targets = [int(t) for t in _torchvision_targets(dataset)]
    records = pd.DataFrame(
        {
            "path": [f"{name}/{split_name}/{i}" for i in range(len(targets))],
            "label": [classes[t] if 0 <= t < len(classes) else str(t) for t in targets],
        }
    )
    return records, TorchvisionReader(dataset)


def _torchvision_targets(dataset: torch.utils.data.Dataset) -> list[Any]:
    """Class indices without decoding images; torchvision stores them under varying names."""
    for attr in ("targets", "labels", "_labels"):
        if getattr(dataset, attr, None) is not None:
            return list(np.asarray(getattr(dataset, attr)).ravel())
    for attr in ("samples", "_samples"):
        if hasattr(dataset, attr):
            return [target for _, target in getattr(dataset, attr)]
    return [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- torch adaptor


class TorchImageDataset(torch.utils.data.Dataset):
    """DataLoader view of an :class:`ImageDataset` that reports bad images instead of crashing.

    Items are ``(i, transform(image), None)`` or ``(i, None, reason)``; use
    :func:`collate_skipping` as ``collate_fn``.  Pickles as long as ``transform`` does.
    """

    def __init__(self, dataset: ImageDataset, transform: Callable[[Image.Image], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any, str | BaseException | None]:
        try:
            return i, self.transform(self.dataset.load(i)), None
        except ImageError as e:
            return i, None, e.reason  # the report lists it beside the record's path
        except (OSError, MemoryError) as e:  # the machine's, not the image's: see `machine_faults_raised`
            return i, None, e


def collate_skipping(
    batch: list[tuple[int, Any, str | BaseException | None]],
) -> tuple[list[int], torch.Tensor | None, list[int], list[tuple[int, str | BaseException]]]:
    """Collate a batch, dropping failed items.

    Returns ``(indices, stacked, good_indices, failures)``: all indices in the batch, the
    good items collated (``None`` when none succeeded), their indices in the same order,
    and ``(index, reason)`` for each failure (an exception where the machine failed).
    """
    good = [(i, value) for i, value, error in batch if error is None]
    failures = [(i, error) for i, _, error in batch if error is not None]
    stacked = default_collate([value for _, value in good]) if good else None
    return [i for i, _, _ in batch], stacked, [i for i, _ in good], failures


def machine_faults_raised(failures: list[tuple[int, str | BaseException]]) -> list[tuple[int, str]]:
    """A batch's failures that are its images' own, to report, once a failure of the machine's
    (memory run out, too many files open, a read error: what stops a build) is raised — here, in
    the process that stores the batch: raised in a decoding worker, PyTorch handed it on as a
    traceback's text, its errno lost."""
    for _, error in failures:
        if isinstance(error, BaseException):
            raise error
    return [(i, error) for i, error in failures if isinstance(error, str)]
