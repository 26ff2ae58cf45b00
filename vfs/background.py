"""Cache builds in a background thread, so a web page stays responsive and outlives its reruns.

Streamlit-free: the app keeps one `BuildRegistry` for the whole server, so every session and
every rerun sees the same builds, and at most one build writes an output at a time. A cancelled
or crashed build leaves a partial cache that `resume_job` turns back into the job continuing it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .cache import CacheError, FeatureCache, open_cache
from .data import EMBEDDED_DATASET, TORCHVISION_PREFIX
from .jobs import BuildJob, BuildProgress, build_cache

State = Literal["running", "done", "cancelled", "failed"]


@dataclass(frozen=True)
class BuildStatus:
    """A consistent snapshot of one build, safe to read from any thread."""

    job: BuildJob
    state: State
    progress: BuildProgress | None  # None until the first batch is stored (model loading, dataset opening)
    error: str | None
    started: float  # time.time()
    finished: float | None
    stored: int | None = None  # once it has ended: the images its cache holds (read from the cache)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        p = self.progress
        return 1.0 if self.state == "done" else (p.done / p.total if p and p.total else 0.0)


class BackgroundBuild:
    """`vfs.jobs.build_cache` of one job in a daemon thread, with cancel and a status snapshot."""

    def __init__(self, job: BuildJob) -> None:
        self.job = job
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status = BuildStatus(job, "running", None, None, time.time(), None)
        self._thread = threading.Thread(target=self._run, name=f"vfs-build-{Path(job.out).name}", daemon=True)

    def start(self) -> BackgroundBuild:
        self._thread.start()
        return self

    def _update(self, **changes) -> None:
        with self._lock:
            self._status = BuildStatus(**{**self._status.__dict__, **changes})

    def _run(self) -> None:
        try:
            cache = build_cache(self.job, progress=lambda p: self._update(progress=p), cancel=self._cancel)
        except Exception as e:  # noqa: BLE001 - the user needs the reason, whatever failed (data, model, disk)
            error = str(e) or type(e).__name__
            self._update(state="failed", error=error, finished=time.time(), stored=_stored(self.job.out))
        else:
            state = "done" if cache is not None else "cancelled"
            self._update(state=state, finished=time.time(), stored=_stored(self.job.out))

    def cancel(self) -> None:
        """Ask the build to stop after the batch in flight; what is stored stays for a resume."""
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        """Cancel was asked and the build has not stopped yet (the model may still be loading)."""
        return self._cancel.is_set() and self.status().running

    def status(self) -> BuildStatus:
        with self._lock:
            return self._status

    def wait(self, timeout: float | None = None) -> BuildStatus:
        self._thread.join(timeout)
        return self.status()


def _stored(out: str) -> int | None:
    """The images a build's cache holds once it has ended, or None where it made none (a refusal)."""
    try:
        return open_cache(out).stored
    except CacheError:
        return None


class BuildRegistry:
    """The server's background builds, one per output path, in the order they were started."""

    def __init__(self) -> None:
        self._builds: dict[Path, BackgroundBuild] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(out: str | Path) -> Path:
        return Path(out).resolve()

    def start(self, job: BuildJob) -> BackgroundBuild:
        """Start (or resume: the engine continues a partial cache) a build; refused while one writes
        `job.out`."""
        key = self._key(job.out)
        with self._lock:
            current = self._builds.get(key)
            if current is not None and current.status().running:
                raise ValueError(f"{job.out} is already being built")
            self._builds.pop(key, None)  # re-inserted last: the newest build is listed last
            build = self._builds[key] = BackgroundBuild(job).start()
            return build

    def get(self, out: str | Path) -> BackgroundBuild | None:
        with self._lock:
            return self._builds.get(self._key(out))

    def builds(self) -> list[BackgroundBuild]:
        with self._lock:
            return list(self._builds.values())

    def running(self) -> bool:
        return any(b.status().running for b in self.builds())

    def forget(self, out: str | Path) -> None:
        """Drop a finished build's record (its cache was deleted); a running build is kept."""
        with self._lock:
            build = self._builds.get(self._key(out))
            if build is not None and not build.status().running:
                del self._builds[self._key(out)]


def resume_job(cache: FeatureCache, moved_to: str | None = None) -> BuildJob:
    """The job that continues a partial local cache, as it was first asked (recorded in the cache);
    where its dataset is no longer where it was recorded, read from `moved_to` when given (the
    writer checks that the images are the same)."""
    job = cache.attrs.get("job")
    if job is None:
        raise CacheError(
            f"{cache.location} does not record the job that built it; rerun that build to resume it"
        )
    resumed = replace(BuildJob(**job), out=cache.location)
    if moved_to is not None and not _dataset_there(resumed.data):
        resumed = replace(resumed, data=moved_to)
    return resumed


def _dataset_there(source: str) -> bool:
    """Whether a dataset source still names something: the embedded and torchvision ones always do."""
    return source == EMBEDDED_DATASET or source.startswith(TORCHVISION_PREFIX) or Path(source).exists()
