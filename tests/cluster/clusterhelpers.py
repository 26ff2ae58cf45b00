"""Helpers of the cluster tests: the test build job, and what "the same cache" means."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from vfs import BuildJob
from vfs.cache import FeatureCache


def job(manifest: Path, out: Path, **changes) -> BuildJob:
    """The test build: batches of 4, chunks of 16 images, 128-px input (a 4×4 grid of 192 channels)."""
    base = BuildJob(
        layer="blocks.5",
        data=str(manifest),
        out=str(out),
        image_size=128,
        batch_size=4,
        chunk_images=16,
        label_col="label",
        domain_col="domain",
    )
    return replace(base, **changes)


def assert_same_cache(a: FeatureCache, b: FeatureCache) -> None:
    """Same images in the same order, the same features (bitwise), thumbnails and build report."""
    assert a.complete and b.complete and a.n == b.n
    for name in ("features", "sqnorm", "thumbs", "source_index"):
        x, y = a.group[name][:], b.group[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"{name} differs"
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    assert a.report == b.report and a.nonnegative == b.nonnegative
