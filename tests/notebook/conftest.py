"""Small real caches for the notebook widget's tests, built once per session through the engine (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nbhelpers import DEMO_IMAGES
from PIL import Image

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


def write_xrays(folder: Path) -> Path:
    """A 12-image manifest shaped like the NIH X-ray sample: '|'-joined findings in `label`, a
    true/false column per finding (here only `cardiomegaly`), a view; random pictures."""
    rng = np.random.default_rng(1)
    labels = [
        "Cardiomegaly|Effusion",
        "No Finding",
        "Cardiomegaly",
        "Effusion",
        "No Finding",
        "Cardiomegaly|Edema",
    ] * 2
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png"
        )
    manifest = folder / "manifest.csv"
    pd.DataFrame(
        {
            "path": [f"images/{i}.png" for i in range(len(labels))],
            "label": labels,
            "view": ["PA", "AP"] * 6,
            "cardiomegaly": ["true" if "Cardiomegaly" in v else "false" for v in labels],
        }
    ).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="session")
def xray_cache(tmp_path_factory) -> FeatureCache:
    folder = tmp_path_factory.mktemp("xrays")
    out = folder / "xrays.zarr"
    build_cache(
        BuildJob(
            layer="blocks.5",
            data=str(write_xrays(folder)),
            out=str(out),
            label_col="label",
            domain_col="view",
        )
    )
    return open_cache(out)
