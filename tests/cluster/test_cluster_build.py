"""Builds on a local Ray cluster equal the single-process build, survive a killed actor, and resume
after a killed driver."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clusterhelpers import assert_same_cache, job

from vfs import ShardedSearch, build_cache, open_cache, search_regions
from vfs.cluster import OOM_RETRIES, check_placeable
from vfs.cluster.build import WorkerPool

ROOT = Path(__file__).resolve().parents[2]


def _extractor_pids() -> list[int]:
    """Processes of the build's extractor actors (Ray titles them after the map_batches class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapBatches(_Extract)" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process in /proc")
def test_two_workers_one_killed_build_the_single_process_cache(cluster, manifest, reference, tmp_path):
    """Equal features (bitwise), skipped files and order; an actor killed mid-build is restarted by Ray
    and its batches recomputed: nothing lost, nothing twice."""
    seen, killed = [], []

    def kill_one(progress) -> None:
        seen.append(progress)
        if not killed:
            pids = _extractor_pids()
            assert len(pids) == 2, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    cache = build_cache(job(manifest, tmp_path / "ray.zarr", engine="ray", workers=2), progress=kill_one)
    assert killed and killed[0] not in _extractor_pids() and seen[0].done < 40
    assert_same_cache(cache, reference)
    assert len(cache.report["skipped"]) == 5 and cache.attrs["job"]["engine"] == "ray"
    assert seen[-1].done == seen[-1].total == 40 and seen[-1].stored == 35 and seen[-1].skipped == 5
    assert [p.done for p in seen] == sorted(p.done for p in seen)


@dataclass(frozen=True)
class _CrashingReader:
    """The dataset's reader, but its process dies on one file, every time (a decoder that crashes)."""

    reader: Callable
    fatal: str

    def __call__(self, path: str):
        if path.endswith(self.fatal):
            os._exit(1)
        return self.reader(path)


def test_an_image_that_kills_its_worker_every_time_stops_the_build_keeping_the_rest(
    cluster, manifest, reference, tmp_path, monkeypatch
):
    """Ray Data retries a dead worker's task forever by default: the build hung without a word."""
    import ray.cloudpickle

    from vfs import jobs
    from vfs.cluster.build import WORKER_RETRIES

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests

    opened = jobs.open_dataset

    def crashing(*args, **kwargs):
        dataset = opened(*args, **kwargs)
        return dataclasses.replace(dataset, reader=_CrashingReader(dataset.reader, "images/30.png"))

    out = tmp_path / "ray.zarr"
    with monkeypatch.context() as patch:
        patch.setattr(jobs, "open_dataset", crashing)
        with pytest.raises(RuntimeError, match=rf"died {WORKER_RETRIES + 1} times") as raised:
            build_cache(job(manifest, out, engine="ray", workers=1))
    stored = open_cache(out, allow_partial=True).attrs["progress"]["next_item"]
    assert 0 < stored <= 28 and f"from item {stored} of the manifest" in str(raised.value)
    assert f"keeps the {stored} of 40 items" in str(raised.value)
    assert_same_cache(build_cache(job(manifest, out, engine="ray", workers=1)), reference)  # resumed


class _ModelMissingHere:
    """The extractor actor of a node where the model cannot load."""

    def __init__(self, *args):
        raise RuntimeError("no such checkpoint on this node")

    def __call__(self, batch):
        return batch


def test_a_model_that_cannot_load_on_the_workers_stops_the_build_with_that_error(
    cluster, manifest, tmp_path, monkeypatch
):
    """Not as an image that crashed its worker: no image is to blame."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr("vfs.cluster.build._Extract", _ModelMissingHere)
    with pytest.raises(Exception, match="no such checkpoint on this node|creation task") as raised:
        build_cache(job(manifest, tmp_path / "ray.zarr", engine="ray", workers=1))
    assert "an image from item" not in str(raised.value)


class _ModelCrashesAsItLoads:
    """The extractor actor of a node where loading the model kills the process (a segfault, say)."""

    def __init__(self, *args):
        os._exit(1)

    def __call__(self, batch):
        return batch


def test_a_model_that_kills_its_process_as_it_loads_stops_the_build(cluster, manifest, tmp_path, monkeypatch):
    """Ray Data restarted such an actor without end: the build hung without a word."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr("vfs.cluster.build._Extract", _ModelCrashesAsItLoads)
    monkeypatch.setattr("vfs.cluster.build.ACTOR_RESTARTS", 2)  # not 16 starts of a few seconds each
    with pytest.raises(RuntimeError, match="the extractor actors died before any batch came back"):
        build_cache(job(manifest, tmp_path / "ray.zarr", engine="ray", workers=1))


def _cli_build(cluster, spec, folder: Path) -> list[str]:
    """The command line of `spec`'s build on the session's cluster, from a job file in `folder`."""
    (folder / "job.toml").write_text(
        "[build]\n"
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in spec.__dict__.items() if v is not None)
    )
    address = cluster.get_runtime_context().gcs_address
    build = ["build", str(folder / "job.toml"), "--engine", "ray", "--address", address, "--workers", "1"]
    return [sys.executable, "-m", "vfs", *build]


def test_ctrl_c_keeps_every_image_computed(cluster, manifest, reference, tmp_path):
    """Before its first chunk is full (32 images) the build is interrupted: the images it reported
    done are stored, as a local build's are, and a rerun resumes after them. What the build printed
    until then holds none of Ray Data's deprecation warnings or Ray's INFO lines (trial)."""
    out = tmp_path / "ray.zarr"
    cmd = _cli_build(cluster, job(manifest, out, chunk_images=32), tmp_path)
    env = os.environ | {"VFS_PROGRESS_EVERY_S": "0"}  # a line per batch
    driver = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines = []
    try:
        assert driver.stderr is not None
        for line in driver.stderr:
            lines.append(line)
            if " / 40 images" in line and int(line.split(": ")[-1].split(" / ")[0]) >= 8:
                break
        done = int(lines[-1].split(": ")[-1].split(" / ")[0])
        assert done < 32, lines
        noise = ("deprecated", "Progress bars disabled", " INFO ")  # Ray's, none the user can act on
        assert not [line for line in lines if any(n in line for n in noise)], lines
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 130 and "interrupted: rerun the same command to resume" in err, err[-2000:]
    partial = open_cache(out, allow_partial=True)
    assert partial.attrs["progress"]["next_item"] >= done and not partial.complete
    mask = np.ones(partial.spec.grid)
    with ShardedSearch(partial, shards=1) as sharded:  # refused: "open it with allow_partial=True" (review)
        found = sharded.search(0, mask, k=3)
    assert found.top_indices.tolist() == search_regions(partial, 0, mask, k=3).top_indices.tolist()
    seen = []
    cache = build_cache(job(manifest, out, chunk_images=32, engine="ray", workers=1), progress=seen.append)
    assert seen[0].done > done  # resumed after them
    assert_same_cache(cache, reference)


def test_a_killed_driver_resumes_on_rerun(cluster, manifest, reference, tmp_path):
    """`python -m vfs build JOB --engine ray --address …` killed once a chunk is stored; a rerun finishes."""
    out = tmp_path / "ray.zarr"
    cmd = _cli_build(cluster, job(manifest, out, chunk_images=8), tmp_path)
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while driver.poll() is None and not (out.exists() and open_cache(out).stored >= 8):
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        _, err = driver.communicate()
    partial = open_cache(out)
    assert driver.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not partial.complete and 8 <= partial.stored < 35
    seen = []
    cache = build_cache(job(manifest, out, chunk_images=8, engine="ray", workers=1), progress=seen.append)
    assert seen[0].done > 8  # resumed, not restarted
    assert_same_cache(cache, reference)


def test_a_tiny_layer_is_scaled_alike_on_ray(cluster, manifest, tmp_path):
    """A layer of values below fp16's subnormals (SqueezeNet's first convolution × 2⁻⁴⁰): the driver
    decides the cache's `feature_scale` once and the actors store their features times it, so the
    cache is the single-process build's, bit for bit, and its features are not zeros."""
    torch.manual_seed(0)
    state = torchvision.models.get_model("squeezenet1_1", weights=None).state_dict()
    state["features.0.weight"] *= 2.0**-40
    torch.save(state, tmp_path / "tiny.pt")
    tiny = {"model": f"file:{tmp_path / 'tiny.pt'}?arch=torchvision:squeezenet1_1", "layer": "features.12"}
    local = build_cache(job(manifest, tmp_path / "local.zarr", **tiny))
    assert local.feature_scale > 2.0**30 and local.features[:].max() > 1
    cache = build_cache(job(manifest, tmp_path / "ray.zarr", engine="ray", workers=1, **tiny))
    assert cache.feature_scale == local.feature_scale
    assert_same_cache(cache, local)


def test_a_worker_with_other_weights_than_the_cache_refuses_to_start(tmp_path):
    """A node whose checkpoint file differs (or whose torch draws a random init otherwise) would mix
    weights in one cache, silently: its actor stops with the reason."""
    from dataclasses import replace

    from cachehelpers import synthetic_spec

    from vfs.cluster.build import _Extract
    from vfs.models import load_extractor

    spec = replace(
        synthetic_spec((7, 7), 192),
        preprocess=load_extractor("embedded:efficientnet_lite0", "blocks.5").preprocess,
    )
    _Extract(
        "embedded:efficientnet_lite0", "blocks.5", replace(spec, weights=None), "cpu", 1, 1.0
    )  # before digests
    with pytest.raises(
        RuntimeError,
        match="a worker loaded 'embedded:efficientnet_lite0' other than the cache's \\(weights: ",
    ):
        _Extract(
            "embedded:efficientnet_lite0", "blocks.5", replace(spec, weights="sha256:other"), "cpu", 1, 1.0
        )
    with pytest.raises(RuntimeError, match="other than the cache's \\(probe: the layer's output"):
        _Extract(  # the same weights built otherwise, e.g. by another timm version on that node
            "embedded:efficientnet_lite0", "blocks.5", replace(spec, probe=(1.0,) * 64), "cpu", 1, 1.0
        )


def test_worker_pool_plans():
    one = [{"CPU": 2.0}]
    assert WorkerPool.plan(0, None, one) == WorkerPool(1, 1.0, 0.0)
    assert WorkerPool.plan(2, None, one) == WorkerPool(2, 0.5, 0.0)  # one CPU left to the decoders
    gpus = [{"CPU": 64.0, "GPU": 8.0}]
    assert WorkerPool.plan(0, None, gpus) == WorkerPool(8, 1.0, 1.0)
    assert WorkerPool.plan(0, 0.5, gpus) == WorkerPool(16, 1.0, 0.5)
    assert WorkerPool.plan(3, 0.0, gpus) == WorkerPool(3, 21.0, 0.0)  # CPUs only, as asked
    # Several nodes: one actor per node by default, none asking for more than a node holds (a share of
    # the whole cluster's CPUs, 3 of 2 + 2, could never be placed: the build waited forever).
    assert WorkerPool.plan(0, None, [{"CPU": 2.0}, {"CPU": 2.0}]) == WorkerPool(2, 1.0, 0.0)
    assert WorkerPool.plan(2, None, [{"CPU": 16.0}] * 4) == WorkerPool(2, 15.0, 0.0)
    assert WorkerPool.plan(6, None, [{"CPU": 16.0}, {"CPU": 8.0}]) == WorkerPool(6, 7.0 / 3, 0.0)
    assert WorkerPool.plan(0, None, [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]) == WorkerPool(
        3, 1.0, 1.0
    )
    with pytest.raises(
        ValueError, match="gpus_per_worker=0.5, but no node of the cluster has that many GPUs"
    ):
        WorkerPool.plan(0, 0.5, [{"CPU": 2.0}, {"CPU": 2.0}])


def test_actors_the_nodes_cannot_hold_are_refused():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]
    check_placeable([{"CPU": 1.0, "GPU": 0.0}] * 4, nodes, "4 shards")
    check_placeable([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.0}], nodes, "2 actors")
    with pytest.raises(
        ValueError, match=r"cannot hold 5 shards \(5 asking for 1 CPU each\); its nodes have: "
    ):
        check_placeable([{"CPU": 1.0, "GPU": 0.0}] * 5, nodes, "5 shards")
    with pytest.raises(ValueError, match="cannot hold 2 actors"):
        check_placeable([{"CPU": 1.0, "GPU": 1.0}] * 2, nodes, "2 actors")
    with pytest.raises(ValueError, match="cannot hold 1 actor"):
        check_placeable([{"CPU": 3.0}], nodes, "1 actor")


def test_cluster_options_without_the_ray_engine_and_ray_client_builds_are_refused(manifest, tmp_path):
    with pytest.raises(ValueError, match="address and gpus_per_worker are for a build on a Ray cluster"):
        job(manifest, tmp_path / "x.zarr", engine="local", address="auto")
    with pytest.raises(ValueError, match="address and gpus_per_worker are for a build on a Ray cluster"):
        job(manifest, tmp_path / "x.zarr", engine="local", gpus_per_worker=0.5)
    with pytest.raises(ValueError, match="cannot run through Ray Client"):
        job(manifest, tmp_path / "x.zarr", engine="ray", address="ray://head:10001")
    assert not (tmp_path / "x.zarr").exists()


def test_an_unknown_engine_is_refused(manifest, tmp_path):
    with pytest.raises(ValueError, match="unknown build engine 'spark'"):
        job(manifest, tmp_path / "x.zarr", engine="spark")


_OOM_TASK = """
import numpy as np, ray, time
from vfs.cluster import connect
connect(num_cpus=1)

@ray.remote
def hold():
    block = np.ones(1 << 27)  # 1 GiB, above the cluster's threshold with the node's own use
    time.sleep(30)

t0 = time.perf_counter()
try:
    ray.get(hold.remote())
except ray.exceptions.OutOfMemoryError:
    print(f"stopped after {time.perf_counter() - t0:.0f} s")
"""


def test_a_task_the_memory_monitor_kills_runs_again_a_bounded_number_of_times(tmp_path):
    """Ray's memory monitor kills the newest workers while a node's memory is above its threshold,
    and by default runs their tasks again forever: a cluster build with a batch too large for its
    node stalled without a word. A fresh process (a cluster of its own, a threshold every node is
    above) that joins through `connect` gets the OutOfMemoryError the build then reports, after
    `OOM_RETRIES` runs (Ray's delays between them shortened here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}
    env |= {"RAY_task_oom_retry_delay_base_ms": "100", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _OOM_TASK], capture_output=True, text=True, timeout=200, cwd=tmp_path, env=env
    )
    assert done.returncode == 0 and "stopped after" in done.stdout, done.stderr[-2000:]
    said = done.stdout + done.stderr  # Ray's own log of each kill, as its driver shows it
    assert f"There are {OOM_RETRIES} oom retries remaining" in said and "infinite" not in said


def test_the_driver_bounds_the_memory_monitors_retries_unless_told_otherwise(monkeypatch):
    """`connect` sets Ray's budget (read as Ray starts in this process, which decides the retries of
    the tasks it submits, on any cluster) and leaves a budget set by the user as it is."""
    import ray

    from vfs.cluster import connect

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.delenv("RAY_task_oom_retries", raising=False)
    connect()
    assert os.environ["RAY_task_oom_retries"] == str(OOM_RETRIES)
    monkeypatch.setenv("RAY_task_oom_retries", "-1")
    connect()
    assert os.environ["RAY_task_oom_retries"] == "-1"


def test_a_worker_lost_after_every_item_was_stored_is_said_so():
    """`_worker_died` named the first item not stored: past the last one, an IndexError instead."""
    from vfs.cluster.build import _worker_died

    said = str(_worker_died(RuntimeError("node lost"), 3, ["a", "b", "c"]))
    assert "after all 3 items were stored" in said and "rerun to finish" in said
    assert "item 1 of the manifest on ('b' first)" in str(_worker_died(RuntimeError("x"), 1, ["a", "b", "c"]))
