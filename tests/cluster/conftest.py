"""A local Ray cluster (2 CPUs) for the whole session, a small dataset with unreadable files, and its
single-process cache — the reference every cluster build and sharded search must equal.

Every test here is marked `ray` (deselect with `-m "not ray"`) and skipped when Ray is not installed.
"""

from __future__ import annotations

import faulthandler
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from clusterhelpers import job
from PIL import Image

from vfs import build_cache
from vfs.cache import FeatureCache

N_IMAGES = 40
BAD = {
    5: b"",
    20: b"not an image",
    21: b"\x89PNG\r\n\x1a\n",
    22: b"",
    23: b"GIF89a",
}  # batch 5 (20..23) fails whole
TEST_SECONDS = 300


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: tests on a local Ray cluster (need requirements-ray.txt)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _deadline():
    """A hung cluster (an actor that can never be placed, say) ends the run with every thread's
    stack instead of hanging CI: a blocked `ray.get` never returns to Python to take a signal."""
    faulthandler.dump_traceback_later(TEST_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def cluster():
    """A local cluster of 2 CPUs, as small as CI machines; shut down at the end of the session. Its
    workers run fp16 products, as the tests' own process does (tests/conftest.py), so sharded fast
    scores equal local ones on every machine."""
    ray = pytest.importorskip("ray")
    from vfs.cluster import connect

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VFS_FAST_DTYPE", "float16")
        connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> Path:
    """40 synthetic 48-px images (label and domain columns), five of them unreadable."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48] / 48
    rows = []
    for i in range(N_IMAGES):
        path = f"images/{i:02d}.png"
        if i in BAD:
            (root / path).write_bytes(BAD[i])
        else:
            f = rng.uniform(1, 6, 3)
            img = np.stack([np.sin(f[c] * (xx + yy * c)) for c in range(3)], -1) + rng.normal(
                0, 0.2, (48, 48, 3)
            )
            Image.fromarray(np.uint8(np.clip((img + 1.5) * 80, 0, 255))).save(root / path)
        rows.append({"path": path, "label": "ab"[i % 2], "domain": "xyz"[i % 3]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def reference(manifest, tmp_path_factory) -> FeatureCache:
    """The single-process build of the test dataset."""
    return build_cache(job(manifest, tmp_path_factory.mktemp("ref") / "ref.zarr"))
