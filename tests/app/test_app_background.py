"""vfs.background: a real build in a background thread: progress, cancel, resume, failure, one per output."""

import numpy as np
import pytest
from apphelpers import wait_until

from vfs.background import BackgroundBuild, BuildRegistry, resume_job
from vfs.cache import open_cache
from vfs.data import EMBEDDED_DATASET
from vfs.jobs import BuildJob


def job(out, **kw):
    return BuildJob(
        **{"layer": "blocks.5", "data": EMBEDDED_DATASET, "out": str(out), "limit": 24, "batch_size": 2} | kw
    )


def test_progress_cancel_and_resume(tmp_path):
    registry = BuildRegistry()
    out = tmp_path / "bg.zarr"
    build = registry.start(job(out))
    wait_until(lambda: (p := build.status().progress) is not None and p.done >= 4)
    with pytest.raises(ValueError, match="already being built"):
        registry.start(job(out))
    seen = build.status().progress
    assert seen.total == 24 and seen.images_per_s > 0 and seen.eta_s is not None and build.status().running
    assert not build.cancelling
    build.cancel()
    assert build.cancelling or not build.status().running  # said at once (the page: "cancelling")
    status = build.wait(60)
    assert status.state == "cancelled" and status.finished is not None and status.progress.done < 24
    assert not build.cancelling
    partial = open_cache(out)
    # every image computed is kept, though far short of a chunk (24 images fit one)
    assert not partial.complete and partial.stored == status.stored == status.progress.stored > 0
    resumed = registry.start(resume_job(partial))
    assert resumed.wait(120).state == "done", resumed.status().error
    assert registry.builds() == [resumed] and resumed.status().fraction == 1.0
    done = open_cache(out)
    assert (
        done.complete
        and done.n == 24
        and list(done.manifest["path"][:2]) == ["samples/astronaut", "samples/brick"]
    )
    reference = registry.start(job(tmp_path / "ref.zarr"))  # the same build, never cancelled
    assert reference.wait(120).state == "done"
    ref = open_cache(tmp_path / "ref.zarr")
    assert np.array_equal(done.features[:], ref.features[:]) and np.array_equal(done.thumbs[:], ref.thumbs[:])


def test_a_failed_build_reports_why(tmp_path):
    build = BackgroundBuild(job(tmp_path / "bad.zarr", layer="no_such_layer")).start()
    status = build.wait(120)
    assert status.state == "failed" and "no_such_layer" in status.error and not status.running


def test_forget_keeps_running_builds(tmp_path):
    registry = BuildRegistry()
    build = registry.start(job(tmp_path / "f.zarr", limit=4))
    registry.forget(tmp_path / "f.zarr")
    assert registry.get(tmp_path / "f.zarr") is build
    build.wait(120)
    registry.forget(tmp_path / "f.zarr")
    assert registry.get(tmp_path / "f.zarr") is None and not registry.running()
