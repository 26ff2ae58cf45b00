"""Concurrent users: many searches on one opened cache, builds beside searches, partial caches.

- N threads searching one `FeatureCache` (as app sessions share it through `st.cache_resource`)
  get exactly the results of one search alone, on the resident path (the first searches race to
  load it) and on the streamed path (a memory budget), mixed;
- a build running in a background thread does not block searches on another cache, and the cache
  it is writing is listed as incomplete, opens, and refuses to be searched unless
  `allow_partial=True` (then it searches the images stored so far, exactly);
- two builds of one output in one process: the second is refused.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from cachehelpers import synthetic_spec
from PIL import Image

from vfs.cache import BuildLock, CacheError, CacheWriter, list_caches, open_cache
from vfs.jobs import BuildJob, build_cache
from vfs.search import search_regions

GRID, C, N = (7, 7), 32, 240


def synthetic_cache(path, n=N, chunk=16, finish=True, seed=0):
    spec = synthetic_spec(GRID, C, input_size=224, source="synthetic", label_col="label", domain_col="domain")
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, *GRID, C)), 0).astype(np.float16)
    cand = pd.DataFrame(
        {
            "path": [f"img/{i:04d}.png" for i in range(n)],
            "label": [f"c{i % 5}" for i in range(n)],
            "domain": [f"d{i % 3}" for i in range(n)],
        }
    )
    w = CacheWriter.open(path, spec, cand, 8, chunk_images=chunk)
    for i in range(n):
        w.add(i, x[i], np.zeros((8, 8, 3), np.uint8))
    if finish:
        w.finish(cand)
    return x, w


def queries(n_queries=12, seed=1):
    """Varied masks (one cell to the whole grid, soft), each with a query image index."""
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n_queries):
        m = np.zeros(GRID, np.float32)
        y, x = rng.integers(0, 5, size=2)
        dy, dx = rng.integers(1, 4, size=2)
        m[y : y + dy, x : x + dx] = rng.uniform(0.2, 1.0, size=(dy, dx)).astype(np.float32)[: 7 - y, : 7 - x]
        if q == 0:
            m[:] = 1
        out.append((int(rng.integers(N)), m, 5 + q % 7, [None, 1][q % 2]))
    return out


def run(cache, q, budget=None):
    index, mask, k, per_domain = q
    return search_regions(
        cache, index, mask, k=k, exclude=index, per_domain=per_domain, device="cpu", memory_budget=budget
    )


def same(a, b):
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.placements, b.placements)
    pd.testing.assert_frame_equal(a.top, b.top)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("caches") / "shared.zarr"
    synthetic_cache(path)
    return path


def test_concurrent_searches_on_one_cache_equal_one_alone(cache_path):
    qs = queries()
    alone = [run(open_cache(cache_path), q) for q in qs]  # each alone, on a fresh cache object
    shared = open_cache(cache_path)  # one object for every thread, as st.cache_resource shares it
    budget = 400 << 10  # streamed: 16 rows a read (the cache is 750 kB)
    tasks = [(i, budget if r % 2 else None) for r in range(4) for i in range(len(qs))]  # 48 searches
    start = threading.Barrier(8)

    def one(task):
        i, b = task
        if task in tasks[:8]:
            start.wait(timeout=30)  # the first eight start together: they race to make the cache resident
        return i, run(shared, qs[i], b)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, tasks))
    assert len(results) == len(tasks) == 48
    for i, result in results:
        same(result, alone[i])
    assert len(shared._resident) == 1  # loaded once, shared


def test_streamed_equals_resident_under_threads(cache_path):
    q = queries(1, seed=7)[0]
    resident = run(open_cache(cache_path), q)
    shared = open_cache(cache_path)
    with ThreadPoolExecutor(6) as pool:
        streamed = list(pool.map(lambda _: run(shared, q, budget=200 << 10), range(12)))
    for s in streamed:
        same(s, resident)
    assert not shared._resident  # the budget kept it streamed


def test_partial_cache_is_listed_incomplete_and_refused_unless_allowed(tmp_path):
    x, writer = synthetic_cache(tmp_path / "building.zarr", n=100, chunk=16, finish=False)
    assert writer.rows == 96  # six whole chunks stored; the last four images are still pending
    synthetic_cache(tmp_path / "done.zarr", n=20)
    rows = {r["name"]: r for r in list_caches(tmp_path)}
    assert rows["done"]["complete"] and rows["done"]["stored"] == 20
    assert (
        not rows["building"]["complete"]
        and rows["building"]["stored"] == 96
        and rows["building"]["error"] is None
    )

    partial = open_cache(tmp_path / "building.zarr")
    assert not partial.complete and partial.stored == 96 and partial.n == 0
    mask = np.ones((2, 2), np.float32)
    with pytest.raises(CacheError, match=r"incomplete: its build is running or was interrupted \(96 of 100"):
        search_regions(partial, x[3].astype(np.float32), np.pad(mask, ((0, 5), (0, 5))), device="cpu")
    with pytest.raises(CacheError, match="incomplete"):
        partial.rows(np.array([0]))

    allowed = open_cache(tmp_path / "building.zarr", allow_partial=True)
    assert (
        allowed.n == 96 and len(allowed.manifest) == 96 and allowed.manifest["path"].iloc[5] == "img/0005.png"
    )
    got = search_regions(allowed, 3, np.pad(mask, ((0, 5), (0, 5))), k=5, device="cpu")
    ref = search_regions(x[:96], 3, np.pad(mask, ((0, 5), (0, 5))), k=5, device="cpu")
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-6)  # the cache's own sqnorm: last-bit rounding
    assert got.top["index"].tolist() == ref.top["index"].tolist()
    assert got.top["path"].tolist() == [f"img/{i:04d}.png" for i in ref.top["index"]]


def test_second_build_of_one_output_in_one_process_is_refused(tmp_path):
    out = tmp_path / "c.zarr"
    with BuildLock(out):
        with pytest.raises(CacheError, match="another build is writing"):
            with BuildLock(out):
                pass
    with BuildLock(out):  # released on exit: the next build goes ahead
        pass


def test_a_second_build_is_refused_before_its_model_loads(tmp_path, monkeypatch):
    """The refusal came after the model had loaded (seconds, for a big one; review)."""
    from vfs import BuildJob, build_cache

    monkeypatch.setattr("vfs.jobs.load_extractor", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "c.zarr"
    with BuildLock(out):
        with pytest.raises(CacheError, match="another build is writing"):
            build_cache(BuildJob(layer="blocks.5", data="embedded:skimage", out=str(out)))
    BuildLock(out).refuse_if_held()  # released: nothing to refuse, and nothing made
    assert not out.exists() and not (tmp_path / "c.zarr.lock").exists()


def test_an_output_named_with_a_trailing_slash_takes_the_same_lock_beside_it(tmp_path):
    """`--out c.zarr/` is c.zarr: the lock was `c.zarr/.lock`, whose folder then stood where the
    cache was to be made (refused as "not a VFS cache", every rerun too), and another build of
    `c.zarr` took another lock."""
    out = tmp_path / "c.zarr"
    with BuildLock(f"{out}/") as lock:
        assert lock.path == tmp_path / "c.zarr.lock" and not out.exists()
        with pytest.raises(CacheError, match="another build is writing"):
            with BuildLock(out):
                pass
    with pytest.raises(CacheError, match="'/' names no folder to build a cache in"):
        BuildLock("/")  # Path('/').with_name raised "has an empty name"


def test_a_cache_named_through_a_link_takes_the_same_lock(tmp_path):
    """A second build of one cache through a linked folder took its own lock beside the link: two
    writers at once (helper trial)."""
    out = tmp_path / "c.zarr"
    out.mkdir()
    (tmp_path / "alias").mkdir()
    (tmp_path / "alias" / "c.zarr").symlink_to(out)
    (tmp_path / "linked").symlink_to(tmp_path / "alias")
    with BuildLock(out):
        for other in (tmp_path / "alias" / "c.zarr", tmp_path / "linked" / "c.zarr"):
            with pytest.raises(CacheError, match="another build is writing"):
                with BuildLock(other):
                    pass


def test_a_background_build_does_not_block_searches_on_another_cache(cache_path, tmp_path):
    from vfs.models import load_extractor

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    extractor = load_extractor("embedded:efficientnet_lite0", "blocks.5", 64)
    out = tmp_path / "bg" / "building.zarr"
    job = BuildJob(
        layer="blocks.5",
        data=str(folder),
        out=str(out),
        image_size=64,
        batch_size=4,
        device="cpu",
        chunk_images=4,
    )
    seen, stored_seen = [], threading.Event()

    def slow_progress(p):  # paces the build so the searches surely overlap it (holds no lock)
        seen.append(p)
        if p.stored >= 8:
            stored_seen.set()
        time.sleep(0.15)

    build = threading.Thread(target=build_cache, args=(job, slow_progress), kwargs={"extractor": extractor})
    build.start()
    try:
        assert stored_seen.wait(60)
        time.sleep(0.3)  # the writer thread stores the chunk a moment after the progress report
        qs = queries(6, seed=3)
        alone = [run(open_cache(cache_path), q) for q in qs]
        shared = open_cache(cache_path)
        overlapped = 0
        for _ in range(3):
            for q, ref in zip(qs, alone):
                t = time.perf_counter()
                same(run(shared, q), ref)
                assert time.perf_counter() - t < 20
                overlapped += build.is_alive()
        assert overlapped > 0, "the build ended before the searches: nothing was tested"
        # the cache being built is offered as incomplete, and refused for search
        row = next(r for r in list_caches(out.parent) if r["name"] == "building")
        assert row["complete"] is False or not build.is_alive()
        if build.is_alive():
            building = open_cache(out)
            assert not building.complete
            with pytest.raises(CacheError, match="incomplete"):
                search_regions(building, 0, np.ones((2, 2), np.float32), device="cpu")
    finally:
        build.join(120)
    assert not build.is_alive()
    done = open_cache(out)
    assert done.complete and done.n == 48
