"""Shared pieces of the browser tests: where things are, the caches the UI does not build, artifacts.

(A module of its own, not conftest.py: tests/app has a conftest.py too, and `import conftest`
would be ambiguous.)
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}

DEMO = "demo"  # the Home page's one-click cache: <VFS_CACHE_DIR>/demo.zarr
DEMO_N = 213
LITE1 = "lite1"  # the same embedded dataset through EfficientNet-Lite1, for the Compare page
SYNTH = "synth1000"  # 1,000 images of 7×7×192 random features, for the latency check
SYNTH_N = 1000


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def record_latency(key: str, value) -> None:
    """Merge a figure into test-artifacts/latency.json (emptied when the server fixture starts)."""
    path = artifact("latency.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1) + "\n")


def build_demo(out: Path) -> Path:
    """The demo cache exactly as the Home page's button builds it (cache_jobs/demo.toml); kept when complete."""
    from vfs.cache import open_cache
    from vfs.jobs import BuildJob, build_cache

    try:
        if open_cache(out).complete:
            return out
    except Exception:  # noqa: BLE001 - absent or partial: (re)build / resume it
        pass
    build_cache(BuildJob.from_toml(ROOT / "cache_jobs" / "demo.toml", out=str(out)))
    return out


def build_lite1(out: Path) -> Path:
    """EfficientNet-Lite1 blocks.5 over the whole embedded demo dataset: the demo cache's images, in its order."""
    from vfs.jobs import BuildJob, build_cache

    build_cache(
        BuildJob(
            model="embedded:efficientnet_lite1",
            layer="blocks.5",
            data="embedded:skimage",
            label_col="label",
            domain_col="source",
            out=str(out),
        )
    )
    return out


def write_synthetic_cache(out: Path, n: int = SYNTH_N, seed: int = 0) -> Path:
    """A real, complete cache of `n` images with Lite0 blocks.5's shape (7×7×192): random features,
    blocky colour thumbnails (they compress), labels "a" / "b". Written with `vfs.cache.CacheWriter`,
    so the app opens and searches it like any built cache; a few seconds instead of a 1,000-image build."""
    import numpy as np
    import pandas as pd

    from vfs.cache import CacheSpec, CacheWriter
    from vfs.data import DataSpec
    from vfs.models import Preprocess, load_extractor

    d = load_extractor("embedded:efficientnet_lite0", "blocks.5").describe()
    h, w = d["grid"]
    spec = CacheSpec(
        model=d["spec"],
        layer=d["layer"],
        input_size=d["input_size"],
        grid=(h, w),
        channels=d["channels"],
        preprocess=Preprocess.from_dict(d["preprocess"]),
        data=DataSpec(f"synthetic:{n}", "label", None),
    )
    candidates = pd.DataFrame(
        {
            "path": [f"synthetic/{i:04d}.png" for i in range(n)],
            "label": np.where(np.arange(n) % 2 == 0, "a", "b"),
        }
    )
    rng = np.random.default_rng(seed)
    size = min(224, d["input_size"])  # as a build stores thumbnails (vfs.jobs.THUMB_MAX)
    block = -(-size // h)
    writer = CacheWriter.open(out, spec, candidates, size)
    for i in range(n):
        features = rng.standard_normal((h, w, d["channels"]), dtype=np.float32).astype(np.float16)
        colours = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        writer.add(i, features, np.kron(colours, np.ones((block, block, 1), np.uint8))[:size, :size])
    writer.finish(candidates)
    return out
