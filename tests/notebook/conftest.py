"""Small real caches for the notebook widget's tests, built once per session through the engine (CPU)."""

from __future__ import annotations

import pytest
from cachehelpers import write_findings
from nbhelpers import DEMO_IMAGES

from vfs.cache import FeatureCache, open_cache
from vfs.data import EMBEDDED_DATASET
from vfs.jobs import BuildJob, build_cache


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> FeatureCache:
    """The demo job (Lite0 blocks.5, labels face / not face, domains) on its first 40 images."""
    out = tmp_path_factory.mktemp("notebook") / "demo40.zarr"
    build_cache(
        BuildJob(
            layer="blocks.5",
            data=EMBEDDED_DATASET,
            out=str(out),
            label_col="label",
            domain_col="source",
            limit=DEMO_IMAGES,
        )
    )
    return open_cache(out)


@pytest.fixture(scope="session")
def xray_cache(tmp_path_factory) -> FeatureCache:
    folder = tmp_path_factory.mktemp("xrays")
    out = folder / "xrays.zarr"
    build_cache(
        BuildJob(
            layer="blocks.5",
            data=str(write_findings(folder, copies=2, seed=1, finding_column=True)),
            out=str(out),
            label_col="label",
            domain_col="view",
        )
    )
    return open_cache(out)
