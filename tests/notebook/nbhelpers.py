"""Shared names of the notebook tests (a module of its own: `import conftest` would be ambiguous)."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

DEMO_IMAGES = 40  # the first 40 demo images: 13 photos (domain "samples"), 27 faces ("lfw")
FACE = 20  # a face among them: the query of the tests


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
