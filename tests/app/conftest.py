"""Small real caches for the app's tests, built once per session (EfficientNet-Lite0, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from apphelpers import SMALL, start_app
from PIL import Image
from streamlit.testing.v1 import AppTest

from vfs.data import EMBEDDED_DATASET
from vfs.jobs import BuildJob, build_cache


def write_findings(folder: Path) -> Path:
    """A tiny manifest dataset with NIH-style '|'-joined findings, for grouping and for 'another dataset'."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    labels = [
        "Cardiomegaly|Effusion",
        "No Finding",
        "Cardiomegaly",
        "Effusion",
        "No Finding",
        "Cardiomegaly|Edema",
    ]
    for i in range(len(labels)):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png"
        )
    manifest = folder / "manifest.csv"
    pd.DataFrame(
        {"path": [f"images/{i}.png" for i in range(len(labels))], "label": labels, "view": ["PA", "AP"] * 3}
    ).to_csv(manifest, index=False)
    return manifest


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
