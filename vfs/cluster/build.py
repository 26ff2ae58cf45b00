"""A cache build on a Ray cluster: Ray Data decodes and extracts, the driver writes the one cache.

The driver lists the dataset once (`open_dataset` checks every path, and the writer records the
candidates table) and cuts it into the single-process build's batches — `batch_size` consecutive
candidates each, from a multiple of `batch_size` — because a model's output for an image can
differ in its last bits with the batch it is computed in: the same batches give the same features,
bitwise. Each batch is one Ray Data row: CPU tasks decode it with the project's safe decoder
(unreadable files become skip reasons, as in a local build), an actor pool extracts its features
(one model per actor, a GPU each where the cluster has GPUs), and the driver consumes the rows in
manifest order and hands them to the one `CacheWriter`. One writer: no two writers ever touch a
zarr chunk, and the writer's resume contract holds unchanged — a killed driver resumes on rerun,
while Ray restarts a killed actor and retries its batches (`WORKER_RETRIES` times, then the build
stops with what it has stored: an image that kills its worker every time would otherwise loop).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ..cache import CacheSpec, CacheWriter
from ..data import DataSpec, ImageDataset, TorchImageDataset, collate_skipping, machine_faults_raised
from ..devices import resolve_device
from ..errors import error_line
from ..fp16 import stored_features
from ..interrupts import between_writes
from ..jobs import (
    BuildJob,
    BuildProgress,
    ModelInputView,
    ProgressMeter,
    first_batch_item,
    thumbnails,
    write_batch,
)
from ..models import Preprocess, load_extractor
from . import OOM_RETRIES, alive_nodes, check_free, check_placeable

WORKER_RETRIES = 3
"""How many times Ray runs a batch again after its worker died on it (a crash, a killed process).
Ray Data's default is forever: a build with an image that crashes the decoder or the model every
time never ended, nor said why. (Ray's memory monitor retries its own kills under its own budget,
`vfs.cluster.OOM_RETRIES`; when that is spent, the build stops as here, saying so.)"""

ACTOR_RESTARTS = 16
"""How many times Ray starts an extractor actor again after its process died (a lost node, a crash):
enough for a long build on preemptible nodes, but not forever — Ray Data's default, under which a
model whose loading crashes the process (not an exception: a segfault, an abort) restarted its
actor without end."""


@dataclass(frozen=True)
class _Decode:
    """CPU task: one batch of candidates → model-input views (uint8), thumbnails and skip reasons."""

    reader: Callable
    preprocess: Preprocess
    thumb: int

    def __call__(self, row: dict) -> dict:
        start, paths = int(row["start"]), list(row["paths"])
        batch = ImageDataset(DataSpec("batch"), pd.DataFrame({"path": paths}), self.reader)
        images = TorchImageDataset(batch, ModelInputView(self.preprocess))
        _, views, good, faults = collate_skipping([images[j] for j in range(len(paths))])
        failures = machine_faults_raised(faults)
        if views is None:  # every image of the batch failed
            size = self.preprocess.input_size
            views = torch.empty((0, 3, size, size), dtype=torch.uint8)
        return {
            "start": start,
            "items": np.arange(start, start + len(paths), dtype=np.int64),
            "good": np.asarray(good, dtype=np.int64) + start,
            "failures": json.dumps([[start + j, reason] for j, reason in failures]),
            "views": views.numpy(),
            "thumbs": thumbnails(views, self.thumb),
        }


class _Extract:
    """Actor: one model, loaded once; a batch's views → its fp16 features as the cache stores them,
    times the cache's `feature_scale` (the local build's arithmetic).

    On a CPU it runs the driver's number of threads, not the few Ray grants it: oneDNN splits a
    convolution's work by thread count, and the last bits of a feature can depend on it (seen at
    batch 8 with 1 vs 2 threads), so only equal counts give a local build's features bitwise."""

    def __init__(
        self, model: str, layer: str, spec: CacheSpec, device: str, threads: int, feature_scale: float
    ):
        self.device = resolve_device(device)
        self.feature_scale = feature_scale  # the writer's: decided once, by the driver, for the cache
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.extractor = load_extractor(model, layer, device=str(self.device), preprocess=spec.preprocess)
        loaded = replace(spec, weights=self.extractor.weights, probe=self.extractor.probe)
        differs = spec.mismatch(loaded)  # another checkpoint there, a timm that builds it otherwise
        if differs:
            raise RuntimeError(
                f"a worker loaded {model!r} other than the cache's ({differs}): give every node the "
                "same checkpoint file and library versions"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = torch.from_numpy(np.ascontiguousarray(batch.pop("views")[0]))
        features = np.empty((0, 0, 0, 0), dtype=np.float16)  # same rank as a batch's: Arrow needs it
        if len(views):
            x = self.extractor.preprocess.normalize(views.to(self.device))
            features = stored_features(self.extractor.features_batch(x), self.feature_scale).cpu().numpy()
        return batch | {"features": features[None]}


@dataclass(frozen=True)
class WorkerPool:
    """The extractor actors: how many, and what each asks of the cluster."""

    size: int
    cpus: float
    gpus: float

    @classmethod
    def plan(cls, workers: int, gpus_per_worker: float | None, nodes: list[dict[str, float]]) -> WorkerPool:
        """One actor per GPU (or `gpus_per_worker` each) where the cluster has GPUs; on CPUs,
        `workers` actors (default: one per node), each asking for a share of a node's CPUs but one,
        which is left to the decoding tasks — an actor pool holding every CPU would starve them and
        stall the pipeline. Asks no actor for more than one node holds (Ray would wait forever)."""
        gpus = [n.get("GPU", 0.0) for n in nodes]
        per_gpu = min(1.0, max(gpus, default=0.0)) if gpus_per_worker is None else gpus_per_worker
        if per_gpu > 0:
            if per_gpu > max(gpus, default=0.0):
                raise ValueError(
                    f"gpus_per_worker={per_gpu:g}, but no node of the cluster has that many GPUs (they have "
                    f"{', '.join(f'{g:g}' for g in gpus) or 'none'}): ask for fewer, or 0 to build on CPUs"
                )
            return cls(workers or max(1, sum(int(g // per_gpu) for g in gpus)), 1.0, per_gpu)
        cpus = [c for c in (n.get("CPU", 0.0) for n in nodes) if c > 0]
        if not cpus:
            raise ValueError("the cluster has no CPUs to build on")
        size = workers or len(cpus)
        per_node = -(-size // len(cpus))
        return cls(size, min(max(c - 1, c / 2) for c in cpus) / per_node, 0.0)


def plan_workers(job: BuildJob) -> WorkerPool:
    """The extractor actors for `job` on the connected cluster, refused (before the cache is
    created) where its nodes cannot hold them all, where other actors hold the resources they need
    now (Ray would wait for those as long as they live), or where `--device cuda` finds no GPU."""
    nodes = alive_nodes()
    if job.device == "cuda" and not any(n.get("GPU", 0.0) > 0 for n in nodes):
        raise ValueError("--device cuda: the Ray cluster has no GPU; build with --device cpu (or auto)")
    pool = WorkerPool.plan(job.workers, job.gpus_per_worker, nodes)
    wanted = [{"CPU": pool.cpus, "GPU": pool.gpus}] * pool.size
    what = f"{pool.size} extractor actors (--workers, --gpus-per-worker)"
    check_placeable(wanted, nodes, what)
    check_free(wanted, what)
    return pool


def run_on_ray(
    job: BuildJob,
    pool: WorkerPool,
    dataset: ImageDataset,
    preprocess: Preprocess,
    writer: CacheWriter,
    thumb: int,
    progress: Callable[[BuildProgress], None] | None,
    cancel: threading.Event | None,
) -> None:
    """Compute and store every candidate from the writer's `next_item` on (see the module's doc), on
    the cluster `build_cache` has connected to, by the actors of `pool` (`plan_workers`)."""
    import ray
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    start, b = writer.next_item, job.batch_size
    paths = dataset.records["path"].astype(str).tolist()
    batches = [
        {"start": a, "paths": paths[a : a + b]} for a in range(first_batch_item(start, b), len(paths), b)
    ]
    if not batches:
        return
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the writer stores in manifest order
    context.enable_progress_bars = False  # VFS reports its own progress …
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # … and Ray Data's periodic log of it is noise
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # as is its "bars disabled"
    # Ray 2.60 names no parameter for retries and restarts: they go as the remote arguments it
    # deprecates (requirements-ray.txt pins it), and its warning is none the user can act on
    # (filtered for the process: `catch_warnings` is not thread-safe, and the app builds in threads)
    warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
    rows = (
        ray.data.from_items(batches, override_num_blocks=len(batches))
        .map(_Decode(dataset.reader, preprocess, thumb), max_retries=WORKER_RETRIES)
        .map_batches(
            _Extract,
            fn_constructor_args=(
                writer.spec.model,  # as recorded: a checkpoint by its absolute path, not the driver's folder
                job.layer,
                writer.spec,
                job.device,
                torch.get_num_threads(),
                writer.feature_scale,
            ),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
            max_task_retries=WORKER_RETRIES,
            max_restarts=ACTOR_RESTARTS,
        )
    )
    meter = ProgressMeter(start, len(paths), writer.rows, len(writer.skipped))
    came_back = False
    try:
        for row in rows.iter_rows():  # leaving the loop (cancel) closes the iterator: the pipeline stops
            came_back = True
            if cancel is not None and cancel.is_set():
                break
            failures = {int(i): reason for i, reason in json.loads(row["failures"])}
            items, good = row["items"].tolist(), row["good"].tolist()
            with between_writes():
                write_batch(writer, items, good, row["features"], row["thumbs"], failures, start)
            if progress is not None:
                progress(meter.report(items, failures))
    except (
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.RayActorError,
        ray.exceptions.OutOfMemoryError,
        ray.exceptions.NodeDiedError,
    ) as error:
        writer.flush()  # between two writes: keep every batch that came back
        if isinstance(error, ray.exceptions.RayActorError) and error.actor_init_failed:
            raise  # the model could not load on a worker (its error says why): no image to blame
        if isinstance(error, ray.exceptions.RayActorError) and not came_back:
            why = error_line(error, "first", named=True)
            raise RuntimeError(
                f"the extractor actors died before any batch came back ({why}): the "
                "model may crash as it loads on the workers, or on the first images (Ray's worker logs, "
                "/tmp/ray/session_latest/logs on each node, say how); nothing of this run was stored, "
                "and a rerun resumes"
            ) from error
        if isinstance(error, ray.exceptions.OutOfMemoryError):
            raise _out_of_memory(error, writer.next_item, paths) from error
        raise _worker_died(error, writer.next_item, paths) from error


def _out_of_memory(error: Exception, stored: int, paths: list[str]) -> RuntimeError:
    """The stop after Ray's memory monitor killed the worker of one task (a batch's decoding, or an
    extractor as it loads or runs) as often as the budget allows: `OOM_RETRIES` + 1 times, unless
    `RAY_task_oom_retries` was set. Ray does not say which batch: the first not stored or a later one."""
    runs = int(os.environ.get("RAY_task_oom_retries", OOM_RETRIES)) + 1
    why = error_line(error, "first", named=True)
    return RuntimeError(
        f"a node ran low on memory: Ray's memory monitor killed a worker of the build {runs} times on one "
        f"task, decoding a batch from item {stored} of the manifest on or extracting its features "
        f"({why}). The cache keeps the {stored} of {len(paths)} items done so far; rerun "
        "to resume, with a smaller --batch-size or fewer --workers per node, or where the nodes have "
        "more memory free"
    )


def _worker_died(error: Exception, stored: int, paths: list[str]) -> RuntimeError:
    """The stop after `WORKER_RETRIES`, in words. Ray does not say which batch: only that it is the
    first one not stored or a later one (the batches run ahead of the writer)."""
    why = error_line(error, "first", named=True)
    if stored >= len(paths):  # every item stored: the workers were lost as the build ended
        return RuntimeError(
            f"a Ray worker died {WORKER_RETRIES + 1} times ({why}) after all {len(paths)} "
            "items were stored: the workers' processes or nodes were lost; rerun to finish the cache"
        )
    return RuntimeError(
        f"a Ray worker died {WORKER_RETRIES + 1} times on one batch of images ({why}): "
        f"an image from item {stored} of the manifest on ({paths[stored]!r} first) crashes the decoder "
        f"or the model, or the workers' processes or nodes were lost. The cache keeps the {stored} of "
        f"{len(paths)} items done so far; rerun to resume, and if it dies there again, build from that "
        "item on alone to find the image, and leave it out of the manifest"
    )
