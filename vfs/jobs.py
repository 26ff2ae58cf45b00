"""Building a cache: dataset → model → cache, resumable, with progress and cancel.

Decoding and resizing run in DataLoader workers; the model sees uint8 views moved to the
device (pinned, non-blocking) and normalised there; chunk writes run on a writer thread while
the next batch is computed. Nothing holds an fp32 copy of the whole cache.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cache import AlreadyComplete, BuildLock, CacheError, CacheSpec, CacheWriter, FeatureCache, open_cache
from .data import ImageDataset, TorchImageDataset, collate_skipping, machine_faults_raised, open_dataset
from .devices import resolve_device
from .errors import error_line, out_of_memory
from .fp16 import cache_feature_scale, stored_features
from .interrupts import sigterm_kept
from .models import DEFAULT_MODEL, Extractor, Preprocess, absolute_spec, load_extractor
from .settings import is_url

THUMB_MAX = 224
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class BuildJob:
    """Everything a build needs; a job file (TOML, table [build]) holds the same fields. `data` and
    `out` are strings (a `Path` is taken too, and kept as its string)."""

    layer: str
    data: str
    out: str
    model: str = DEFAULT_MODEL
    label_col: str | None = None
    domain_col: str | None = None
    image_size: int | None = None
    batch_size: int = 32
    device: str = "auto"
    workers: int = 0  # local: DataLoader decoding processes; ray: extractor actors (0: one per GPU, or 1)
    limit: int | None = None
    chunk_images: int | None = None  # images per stored chunk (default ≤ 16 MB of features); set at creation
    engine: str = "local"  # "local": this process; "ray": a Ray cluster (vfs.cluster.build)
    address: str | None = None  # ray: the cluster ("auto", "HOST:6379"); None: this machine's, or new
    gpus_per_worker: float | None = (
        None  # ray: GPUs per extractor actor (default 1 where the cluster has GPUs)
    )

    def __post_init__(self) -> None:
        """Refuse a bad value here, before anything is created on disk (a job file's values arrive
        untyped). A path given as a `Path` is kept as its string."""
        for name in ("data", "out"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        for name in ("layer", "data", "out", "model", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string; got {getattr(self, name)!r}")
        if is_url(self.out):  # the writer takes it for a folder: a tree named "http:" after the whole build
            raise ValueError(
                f"out must be a folder on this machine, not a URL ({self.out}): build the cache here, then "
                "copy it where it is served (a bucket, a web server); searches open it by its URL"
            )
        for name in ("label_col", "domain_col", "address"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string; got {getattr(self, name)!r}")
        for name, least, optional in (
            ("batch_size", 1, False),
            ("workers", 0, False),
            ("image_size", 1, True),
            ("limit", 1, True),
            ("chunk_images", 1, True),
        ):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be a whole number ≥ {least}; got {value!r}")
        gpus = self.gpus_per_worker
        number = isinstance(gpus, (int, float)) and not isinstance(gpus, bool)
        if gpus is not None and not (number and gpus >= 0):
            raise ValueError(f"gpus_per_worker must be a number ≥ 0; got {gpus!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown build engine {self.engine!r}: use {' or '.join(ENGINES)}")
        if self.engine != "ray" and (self.address is not None or gpus is not None):
            raise ValueError("address and gpus_per_worker are for a build on a Ray cluster: add --engine ray")
        if self.engine == "ray" and (self.address or "").startswith("ray://"):
            raise ValueError(
                f"a build cannot run through Ray Client ({self.address}): Ray Data's pipeline needs its "
                "driver on the cluster. Run the build on one of its nodes with --address auto"
            )

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> BuildJob:
        """The job of a file's [build] table; `overrides` that are not None (the CLI's flags) replace
        or complete its keys."""
        if Path(path).is_dir():
            raise ValueError(f"{path}: a folder, not a job file (a dataset is given with --data)")
        if not Path(path).exists():
            raise ValueError(
                f"{path}: no such job file (a build is described by a TOML job file, or by --layer, --data "
                "and --out without one)"
            )
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f).get("build")
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a valid TOML file ({e})") from e
        if not isinstance(table, dict):
            raise ValueError(f"{path}: a job file needs a [build] table")
        unknown = set(table) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        table = table | {k: v for k, v in overrides.items() if v is not None}
        missing = [k for k in ("layer", "data", "out") if k not in table]
        if missing:
            keys, flags = ", ".join(missing), ", ".join(f"--{k}" for k in missing)
            them = "them" if len(missing) > 1 else "it"
            raise ValueError(f"{path}: the job needs {keys}: set {them} in its [build] table or by {flags}")
        try:
            return cls(**table)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def duration(seconds: float) -> str:
    """A time as a person reads it: "45 s", "12 min"."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class BuildProgress:
    done: int  # candidates handled (stored or skipped), this run and before
    total: int
    stored: int
    skipped: int
    images_per_s: float
    eta_s: float | None

    def summary(self) -> str:
        """The progress as the app and the CLI both word it: "64 / 213 images · 21.3 images/s · ETA 7 s"."""
        eta = "…" if self.eta_s is None else duration(self.eta_s)
        return f"{self.done} / {self.total} images · {self.images_per_s:.1f} images/s · ETA {eta}"


class ProgressMeter:
    """A build's `BuildProgress`, batch by batch: images/s and ETA over this run's candidates (those
    before `start` were handled before it). The local and the Ray build both report through it."""

    def __init__(self, start: int, total: int, stored: int, skipped: int):
        self.start, self.total, self.stored, self.skipped = start, total, stored, skipped
        self.t0, self.done, self.failed = time.perf_counter(), 0, 0

    def report(self, items: Sequence[int], failures: Mapping[int, str]) -> BuildProgress:
        self.done += sum(1 for i in items if i >= self.start)
        self.failed += sum(1 for i in failures if i >= self.start)
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        left = self.total - self.start - self.done
        return BuildProgress(
            self.start + self.done,
            self.total,
            self.stored + self.done - self.failed,
            self.skipped + self.failed,
            rate,
            left / rate if rate > 0 else None,
        )


def first_batch_item(start: int, batch_size: int) -> int:
    """Where a build that resumes at candidate `start` begins computing: at the batch boundary an
    uninterrupted build would have used, recomputing the few images of that batch already stored
    (`write_batch` leaves them out). A model's output for an image can differ in its last bits with
    the batch it is computed in, and a resumed cache must equal an uninterrupted one — on the Ray
    cluster as locally."""
    return start - start % batch_size


class ModelInputView:
    """Worker-side transform: the exact model-input view as a uint8 (3, S, S) tensor."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF  # where it runs: see vfs.models.specs

        return TF.pil_to_tensor(self.preprocess.view(image))


def thumbnails(views: torch.Tensor, size: int) -> np.ndarray:
    """(B, size, size, 3) uint8 thumbnails of (B, 3, S, S) model-input views."""
    if views.shape[-1] != size:
        from torchvision.transforms.v2 import functional as TF

        views = TF.resize(views, [size, size], antialias=True)
    return views.permute(0, 2, 3, 1).contiguous().numpy()


def view_thumbnail(view: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the thumbnail of one view (`Preprocess.view`, e.g. an uploaded query's)
    made as a build makes its images' (`thumbnails`), so that it looks as theirs do."""
    return thumbnails(torch.from_numpy(np.array(view.convert("RGB"))).permute(2, 0, 1)[None], size)[0]


def cache_spec(extractor: Extractor, dataset: ImageDataset) -> CacheSpec:
    d = extractor.describe()
    h, w = d["grid"]
    return CacheSpec(
        model=d["spec"],
        layer=d["layer"],
        input_size=d["input_size"],
        grid=(h, w),
        channels=d["channels"],
        preprocess=extractor.preprocess,
        data=dataset.spec,
        weights=extractor.weights,
        probe=extractor.probe,
    )


def build_cache(
    job: BuildJob,
    progress: Callable[[BuildProgress], None] | None = None,
    cancel: threading.Event | None = None,
    extractor: Extractor | None = None,
) -> FeatureCache | None:
    """Build (or resume) the cache `job.out`; returns it opened, or None when cancelled."""
    BuildLock(job.out).refuse_if_held()  # before the model loads: a second build of one output
    dataset = open_dataset(job.data, job.label_col, job.domain_col)
    if job.limit is not None:
        dataset = dataset.limit(job.limit)
    device = resolve_device("cpu" if job.engine == "ray" else job.device)  # ray: here only for the spec
    extractor = extractor or load_extractor(
        absolute_spec(job.model),  # recorded: found from any folder
        job.layer,
        job.image_size,
        device=str(device),
        preprocess=_resumed_preprocess(job.out, job.image_size),
    )
    spec = cache_spec(extractor, dataset)
    thumb = min(THUMB_MAX, spec.input_size)
    if job.engine == "ray":  # before the cache is created: a cluster that cannot build leaves nothing
        from .cluster import connect
        from .cluster.build import plan_workers

        with sigterm_kept():  # ray.init's own SIGTERM handler would exit on the spot
            connect(job.address)
        pool = plan_workers(job)
    with BuildLock(job.out, read_only_ok=True) as lock, _faults_in_words(job.out):
        if lock.unwritable is None and _resumable(job.out):  # before a resume's first write (its clean-up)
            lock.refuse_unwritable_cache()
        try:
            writer = CacheWriter.open(
                job.out,
                spec,
                dataset.records,
                thumb,
                chunk_images=job.chunk_images,
                job=asdict(replace(job, data=dataset.spec.source, model=spec.model)),  # found from any folder
                feature_scale=cache_feature_scale(extractor.probe_peak),
            )
        except AlreadyComplete:  # a rerun of a finished build (also where its folder is read-only)
            return open_cache(job.out)
        except OSError as e:  # on read-only media, the first write of a resume
            if lock.unwritable is None:
                raise
            raise lock.refusal() from e
        if lock.unwritable is not None:  # a build to resume on read-only media
            raise lock.refusal()
        try:
            if job.engine == "ray":
                from .cluster.build import run_on_ray

                run_on_ray(job, pool, dataset, extractor.preprocess, writer, thumb, progress, cancel)
            else:
                local = (job, dataset, extractor, writer, device, thumb, progress, cancel)
                _retrying_dead_loaders(writer, partial(_run_from_next, *local))
        except KeyboardInterrupt:  # Ctrl-C: keep what was computed, as a cancel does. No write is cut
            writer.flush()  # short: the local build's writer thread ends its batch first; Ray's holds it
            raise
        if cancel is not None and cancel.is_set():
            writer.flush()  # keep every image computed: a resume goes on from the last one
            return None
        writer.flush()  # every image handed over stored or skipped: the counts below are final
        if writer.rows == 0 and writer.skipped:  # a cache of nothing would be 'complete' for good
            first = writer.skipped[0]
            shutil.rmtree(job.out)
            raise ValueError(
                f"none of the {len(dataset)} images could be read (the first, "
                f"{dataset.records['path'].iloc[first['item']]}: {first['reason']}): nothing was stored, "
                f"and no cache is left at {job.out}"
            )
        repeated = int(dataset.records["path"].duplicated().sum())  # stored as images of their own
        writer.finish(dataset.records, {"repeated_paths": repeated} if repeated else None)
    return open_cache(job.out)


def _resumed_preprocess(out: str, image_size: int | None) -> Preprocess | None:
    """The preprocessing the cache at `out` was started with, where this build resumes (or reruns) it:
    its images must go on being made alike, whatever this version of VFS or timm would choose now.
    None for a new cache, or another image size, which the writer refuses with the reason."""
    try:
        cache = open_cache(out, allow_partial=True)
    except (CacheError, FileNotFoundError, ValueError):  # nothing there, or not a cache: the writer says
        return None
    recorded = cache.spec.preprocess
    return recorded if image_size in (None, recorded.input_size) else None


@contextmanager
def _faults_in_words(out: str) -> Iterator[None]:
    """What stops a build through no fault of its images — a full disk, memory run out, a file or
    folder it may not write, too many files open — as the user can act on it, in one line: what,
    and that a rerun resumes (a bare errno, or PyTorch's allocator's words taken for the model's)."""
    resume = "rerun the same build to resume it (every image recorded as stored is kept)"
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise
        if error.errno == errno.ENOSPC:
            raise OSError(
                error.errno, f"no space left on the disk holding {out}: free some and {resume}"
            ) from error
        where = f": {error.filename}" if error.filename else ""
        raise OSError(
            error.errno, f"{error.strerror or error}{where} — put that right, then {resume}"
        ) from error
    except Exception as error:
        if not out_of_memory(error):
            raise
        raise RuntimeError(
            f"out of memory building {out} ({error_line(error)}): lower the batch size (--batch-size) or the "
            f"decoding workers (--workers), then {resume}"
        ) from error


LOADER_RETRIES = 3
"""Times a build starts its decoding workers again after one died (the system's out-of-memory
killer, a decoder crash), from the first image not yet stored."""


def _retrying_dead_loaders(writer: CacheWriter, run_from_next: Callable[[], None]) -> None:
    """`run_from_next` (the build from the writer's next item on) again where a decoding worker
    died — killed for memory, most often — up to `LOADER_RETRIES` times, keeping what was stored."""
    for retry in range(LOADER_RETRIES + 1):
        try:
            return run_from_next()
        except RuntimeError as died:
            if isinstance(died.__context__, KeyboardInterrupt):  # a worker's end reported while Ctrl-C or
                raise died.__context__ from None  # SIGTERM unwound: the build was stopped, none died
            if "DataLoader worker (pid" not in str(died):
                raise
            if retry == LOADER_RETRIES:
                raise RuntimeError(
                    f"{died} (its decoding workers died {retry + 1} times: out of memory? fewer --workers "
                    "use less); rerun the same command to resume"
                ) from died
            writer.flush()  # what the dead loader's batches gave is kept; the next starts after it
            warnings.warn(
                f"a decoding worker died ({died}); the build goes on from image {writer.next_item}",
                stacklevel=2,
            )


def _resumable(out: str) -> bool:
    """Whether `out` holds a cache that a build would go on with, writing to it (not one finished,
    nor a folder of something else: the writer says what that is)."""
    if not os.path.isdir(out):
        return False
    try:
        return not open_cache(out, allow_partial=True).complete
    except CacheError:
        return False


def _stop_quietly_on_sigterm(worker_id: int) -> None:
    """A decoding worker ends on SIGTERM as on Ctrl-C: quietly (torch's worker loop returns on
    KeyboardInterrupt). A signal to the build's whole process group (`timeout`, systemd, `kill --
    -PGID`) is then the main process's to report; killed by it, the workers were reported dead by
    torch — 20 lines of traceback, and a build that went on, retrying them (review)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _run_from_next(
    job: BuildJob,
    dataset: ImageDataset,
    extractor: Extractor,
    writer: CacheWriter,
    device: torch.device,
    thumb: int,
    progress: Callable[[BuildProgress], None] | None,
    cancel: threading.Event | None,
) -> None:
    start = writer.next_item
    first = first_batch_item(start, job.batch_size)
    remaining = torch.utils.data.Subset(
        TorchImageDataset(dataset, ModelInputView(extractor.preprocess)), range(first, len(dataset))
    )
    loader = torch.utils.data.DataLoader(
        remaining,
        batch_size=job.batch_size,
        num_workers=job.workers,
        collate_fn=collate_skipping,
        worker_init_fn=_stop_quietly_on_sigterm,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    meter = ProgressMeter(start, len(dataset), writer.rows, len(writer.skipped))
    with ThreadPoolExecutor(1, thread_name_prefix="vfs-writer") as pool:
        pending: Future | None = None
        for items, views, good, faults in loader:
            if cancel is not None and cancel.is_set():
                break
            failures = machine_faults_raised(faults)
            feats = None
            if views is not None:
                x = extractor.preprocess.normalize(views.to(device, non_blocking=True))
                feats = stored_features(extractor.features_batch(x), writer.feature_scale).cpu().numpy()
                thumbs = thumbnails(views, thumb)
            if pending is not None:
                pending.result()
            pending = pool.submit(
                write_batch,
                writer,
                items,
                good,
                feats,
                thumbs if feats is not None else None,
                dict(failures),
                start,
            )
            report = meter.report(items, dict(failures))
            if progress is not None:
                progress(report)
        if pending is not None:
            pending.result()


def write_batch(
    writer: CacheWriter,
    items: Sequence[int],
    good: Sequence[int],
    feats: np.ndarray | None,
    thumbs: np.ndarray | None,
    failures: dict[int, str],
    start: int = 0,
) -> None:
    """Hand a batch to the writer in candidate order (stored and skipped interleaved); items
    before `start` (the part of a resume's first batch stored before) are left out."""
    row = {item: k for k, item in enumerate(good)}
    for item in items:
        if item < start:
            continue
        if item in failures:
            writer.skip(item, failures[item])
        else:  # a good image: the batch had features (None only where every image failed)
            assert feats is not None and thumbs is not None
            writer.add(item, feats[row[item]], thumbs[row[item]])
