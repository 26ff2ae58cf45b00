"""Small real caches for the app's tests, built once per session (EfficientNet-Lite0, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from apphelpers import SMALL, start_app
from cachehelpers import write_findings
from streamlit.testing.v1 import AppTest

from vfs.data import EMBEDDED_DATASET
from vfs.jobs import BuildJob, build_cache


@pytest.fixture(scope="session")
def findings_manifest(tmp_path_factory) -> Path:
    return write_findings(tmp_path_factory.mktemp("findings"))


@pytest.fixture(scope="session")
def caches(tmp_path_factory, findings_manifest) -> Path:
    """small (blocks.5, 7×7) and small_b4 (blocks.4, 14×14) of the same 40 images; findings of another dataset."""
    root = tmp_path_factory.mktemp("caches")
    for name, layer in (("small", "blocks.5"), ("small_b4", "blocks.4")):
        build_cache(BuildJob(layer=layer, data=EMBEDDED_DATASET, out=str(root / f"{name}.zarr"), limit=SMALL))
    build_cache(
        BuildJob(
            layer="blocks.5", data=str(findings_manifest), out=str(root / "findings.zarr"), domain_col="view"
        )
    )
    return root


@pytest.fixture
def app(caches, monkeypatch) -> AppTest:
    """The app at its Home page, over the session's caches."""
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    return start_app()
