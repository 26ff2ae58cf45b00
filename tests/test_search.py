"""Search against a brute-force implementation of the definition, on random features and masks."""

import numpy as np
import pandas as pd
import pytest
import torch
from search_reference import brute_force, every_placement

from vfs.kernel import library
from vfs.masks import crop_mask, grid_mask
from vfs.scoring import QueryGeometry, RegionQuery, Scorer, plan_query
from vfs.search import FastPass, _ExactScoring, _FastScoring, search_regions, select_top
from vfs.sources import ArrayFeatures, UnpreparedArray, even_slices


def random_features(rng, n, h, w, c):
    """Post-ReLU-like features, rounded to fp16 as the cache stores them."""
    return np.maximum(rng.standard_normal((n, h, w, c)), 0).astype(np.float16)


def soft_blob(rng, h, w):
    m = np.zeros((h, w), np.float32)
    y, x = rng.integers(0, h), rng.integers(0, w)
    dy, dx = rng.integers(1, max(2, h // 2) + 1), rng.integers(1, max(2, w // 2) + 1)
    m[y : y + dy, x : x + dx] = rng.uniform(0.05, 1.0, size=m[y : y + dy, x : x + dx].shape)
    m[rng.random((h, w)) < 0.2] = 0
    if not m.any():
        m[y, x] = 1
    return m


def forms(mask: np.ndarray, dtype: torch.dtype = torch.float16, device: str = "cpu") -> tuple[str, ...]:
    """The exact forms that can score `mask` with operands in `dtype` on `device`: "whole" and
    "whole_cells" only where the region spans the grid, "pairs" on a CPU where the kernel is built
    for `dtype`."""
    lib = library()
    spans = crop_mask(mask).shape == mask.shape
    pairs = device == "cpu" and lib is not None and dtype in lib.dtypes
    return ("cells", "band") + ("whole", "whole_cells") * spans + ("pairs",) * pairs


def assert_exact_top_k(result, ref: np.ndarray, ref_where: np.ndarray, atol: float = 2e-3) -> None:
    """Every image's score within `atol` of the brute force's; the top-k, its scores and placements exact."""
    np.testing.assert_allclose(result.scores, ref, atol=atol)
    top = result.top
    assert list(top["index"]) == list(np.argsort(-ref, kind="stable")[: len(top)])
    np.testing.assert_allclose(top["score"], ref[top["index"]], atol=1e-5)
    for i, box in zip(top["index"], top["grid_box"]):
        assert box[:2] == tuple(ref_where[i])


MASKS = {
    "one cell": lambda rng, h, w: np.eye(1, h * w, rng.integers(h * w), dtype=np.float32).reshape(h, w),
    "full grid": lambda rng, h, w: np.ones((h, w), np.float32),
    "soft blob": soft_blob,
    "border": lambda rng, h, w: np.pad(np.full((2, 1), 0.5, np.float32), ((h - 2, 0), (w - 1, 0))),
    "corner square": lambda rng, h, w: np.pad(np.ones((2, 2), np.float32), ((0, h - 2), (0, w - 2))),
}


@pytest.mark.parametrize("grid", [(7, 7), (5, 9), (14, 14)])
@pytest.mark.parametrize("kind", list(MASKS))
def test_matches_brute_force(grid, kind, device):
    rng = np.random.default_rng(abs(hash((grid, kind))) % 2**32)
    h, w = grid
    feats = random_features(rng, 60, h, w, 24)
    query = feats[3].astype(np.float32)
    mask = MASKS[kind](rng, h, w)
    ref, ref_where = brute_force(feats, query, mask)

    result = search_regions(feats, query, mask, k=10, device=device)
    assert_exact_top_k(result, ref, ref_where)
    top = result.top
    assert top["index"].iloc[0] == 3 and top["score"].iloc[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid", [(7, 7), (5, 9), (14, 14)])
@pytest.mark.parametrize("kind", list(MASKS))
def test_other_operand_types_keep_the_top_k_exact(grid, kind, dtype, monkeypatch, force_form, device):
    """A prepared source searched with bf16 products (a 2⁵ wider bound, an fp16 pass over what it
    cannot rule out, then float64) or fp32 ones (a tighter bound): the same exact top-k."""
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: dtype)
    rng = np.random.default_rng([*grid, list(MASKS).index(kind)])
    h, w = grid
    feats = random_features(rng, 60, h, w, 24)
    mask = MASKS[kind](rng, h, w)
    ref, ref_where = brute_force(feats, feats[3].astype(np.float32), mask)
    for method in forms(mask, dtype, device):
        force_form(method)
        result = search_regions(ArrayFeatures(feats), 3, mask, k=10, device=device)
        # every image: within its operand type's bound
        assert_exact_top_k(result, ref, ref_where, atol=3e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("seed", range(12))
def test_random_masks_every_form_agrees(seed, force_form, device):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(2, 10, size=2)
    feats = random_features(rng, 40, h, w, 16)
    query = np.maximum(rng.standard_normal((h, w, 16)), 0).astype(np.float32)
    mask = soft_blob(rng, h, w)
    ref, _ = brute_force(feats, query, mask)
    results = {}
    for method in forms(mask, device=device):
        force_form(method)
        results[method] = search_regions(feats, query, mask, k=10, device=device)
        np.testing.assert_allclose(results[method].scores, ref, atol=2e-3)
        assert list(results[method].top["index"]) == list(np.argsort(-ref, kind="stable")[:10])


@pytest.mark.parametrize("kind", list(MASKS))
def test_the_same_answers_on_every_device(kind, device):
    """A user moving a cache between a laptop and a GPU box gets the same top-k, scores (exact, to
    float32) and placements: the forms, products and bounds differ, the answers may not."""
    if device == "cpu":
        pytest.skip("compares the CPU with the device VFS_TEST_DEVICE names")
    rng = np.random.default_rng(list(MASKS).index(kind))
    feats = rng.standard_normal((300, 7, 7, 64)).astype(np.float16)  # signed: scores packed near 0
    mask = MASKS[kind](rng, 7, 7)
    here, there = (search_regions(feats, 11, mask, k=10, exclude=11, device=d) for d in ("cpu", device))
    pd.testing.assert_frame_equal(here.top, there.top, atol=1e-6)


@pytest.mark.parametrize("n,row_bytes,slice_bytes", [(10, 4, 12), (7, 3, 100), (1000, 7, 999), (5, 10, 1)])
def test_even_slices_cover_every_row_once_within_the_limit(n, row_bytes, slice_bytes):
    slices = even_slices(n, row_bytes, slice_bytes)
    assert [a for a, _ in slices] == [0] + [b for _, b in slices[:-1]] and slices[-1][1] == n
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1  # no small tail slice
    assert all(s * row_bytes <= slice_bytes for s in sizes) or sizes == [1] * n


@pytest.mark.parametrize(
    "n,k,levels",
    [(50, 1, 7), (50, 10, 7), (50, 49, 7), (50, 60, 7), (3000, 10, 7)]
    # past 16,384 eligible scores (80% of n) the k-th is looked for in a sample first: ties,
    # distinct values, k past the sample's length
    + [(25000, 1, 7), (25000, 10, 7), (25000, 10, 0), (25000, 6000, 0), (50000, 4097, 0), (70000, 9000, 7)],
)
def test_top_k_selection_equals_a_stable_full_sort(n, k, levels):
    """The partial selection ranks exactly as a stable sort: ties by index, NaN last."""
    rng = np.random.default_rng(n + k)
    if levels:
        scores = rng.choice(np.linspace(0, 1, levels, dtype=np.float32), n)  # many ties
    else:
        scores = rng.random(n).astype(np.float32)
    scores[rng.integers(0, n, 3)] = np.nan
    eligible = rng.random(n) < 0.8
    order = np.flatnonzero(eligible)
    expected = order[np.argsort(-scores[order], kind="stable")][:k]
    np.testing.assert_array_equal(select_top(scores, eligible, k, None, None), expected)
    all_nan = np.full(n, np.nan, np.float32)
    np.testing.assert_array_equal(select_top(all_nan, eligible, k, None, None), order[:k])


@pytest.mark.parametrize("method", ["cells", "band", "pairs"])
def test_sliced_source_gives_the_same_results(method, force_form, device):
    """A source scored in several slices (a large cache) ranks exactly as one scored whole."""
    rng = np.random.default_rng(5)
    feats = random_features(rng, 50, 6, 7, 16)
    mask = soft_blob(rng, 6, 7)
    if method not in forms(mask, device=device):
        pytest.skip(f"the pairs kernel does not run on {device} here")
    force_form(method)
    whole = search_regions(ArrayFeatures(feats), 4, mask, k=12, device=device)
    sliced = search_regions(
        ArrayFeatures(feats, slice_bytes=feats[0].nbytes * 7), 4, mask, k=12, device=device
    )
    np.testing.assert_allclose(
        sliced.scores, whole.scores, atol=1e-6
    )  # another product shape may round apart
    pd.testing.assert_frame_equal(sliced.top, whole.top)  # exact: re-scored in float64


@pytest.mark.parametrize("seed", range(6))
def test_gathered_shift_and_adds_score_as_the_strided_ones(seed, monkeypatch, force_form, device):
    """The GPU's shift-and-add (`PlacementIndex`: one gather and one sum) against the CPU's strided
    adds, both run wherever the test runs: the same exact top-k and placements, scores within
    fp32 sums' order."""
    from vfs.scoring import PlacementIndex

    rng = np.random.default_rng(seed)
    h, w = rng.integers(2, 10, size=2)
    feats = random_features(rng, 40, h, w, 16)
    mask = soft_blob(rng, h, w)
    ref, ref_where = brute_force(feats, feats[2].astype(np.float32), mask)
    force_form("cells")
    monkeypatch.setattr("vfs.scoring.placement_index", lambda *a: None)
    strided = search_regions(ArrayFeatures(feats), 2, mask, k=10, device=device)
    monkeypatch.setattr("vfs.scoring.placement_index", PlacementIndex.create)
    gathered = search_regions(ArrayFeatures(feats), 2, mask, k=10, device=device)
    np.testing.assert_allclose(gathered.scores, strided.scores, atol=1e-6)
    pd.testing.assert_frame_equal(gathered.top, strided.top)
    assert_exact_top_k(gathered, ref, ref_where)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plan_prefers_cells_for_small_masks_band_for_large_and_one_product_for_the_grid(dtype, monkeypatch):
    """oneDNN's forms, without the pairs kernel. One placement is one product where its bound stays
    tight (the embedded model's 7×7×192), else the band form on a CPU and one product per cell on
    a GPU."""
    monkeypatch.setenv("VFS_KERNEL", "off")
    rng = np.random.default_rng(0)
    f = rng.random((7, 7, 2048)).astype(np.float32)  # ResNet-50 layer4
    small = np.zeros((7, 7), np.float32)
    small[2:5, 2:5] = 1
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert plan_query(RegionQuery.create(f, small), (7, 7), cpu, dtype).method == "cells"
    large = np.ones((7, 7), np.float32)
    large[:, 6] = 0  # 7×6: two placements
    assert plan_query(RegionQuery.create(f, large), (7, 7), cpu, dtype).method == "band"
    ring = np.ones((7, 7), np.float32)
    ring[1:6, 1:6] = 0  # touches every edge: one placement
    for whole in (np.ones((7, 7), np.float32), ring):
        assert plan_query(RegionQuery.create(f[..., :192], whole), (7, 7), cpu, dtype).method == "whole"
        assert plan_query(RegionQuery.create(f, whole), (7, 7), cpu, dtype).method == "band"
        assert plan_query(RegionQuery.create(f, whole), (7, 7), gpu, dtype).method == "whole_cells"


def test_operand_type_is_chosen_once_per_process_from_the_environment(monkeypatch):
    """`auto` (the default) measures both products on a CPU; GPUs always take fp16."""
    from vfs.scoring import FAST_DTYPES, fast_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    choices = [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)]
    for choice, expected in [*choices, (None, FAST_DTYPES)]:
        fast_dtype.cache_clear()
        if choice is None:
            monkeypatch.delenv("VFS_FAST_DTYPE", raising=False)
        else:
            monkeypatch.setenv("VFS_FAST_DTYPE", choice)
        got = fast_dtype(cpu)
        assert got in expected if isinstance(expected, tuple) else got == expected
        assert fast_dtype(gpu) == torch.float16
    fast_dtype.cache_clear()
    monkeypatch.setenv("VFS_FAST_DTYPE", "float8")
    with pytest.raises(ValueError, match="expected auto, float16, bfloat16, float32"):
        fast_dtype(cpu)
    fast_dtype.cache_clear()


@pytest.mark.parametrize(
    "bf16_ms,fp32_ms,bf16_pairs_ms,expected",
    [
        (5.9, 30.0, None, torch.float16),
        (4.9, 30.0, None, torch.bfloat16),
        (30.0, 4.9, None, torch.float32),
        (12.0, 30.0, None, torch.float16),
        (12.0, 30.0, 4.0, torch.float16),  # the kernel's bf16 run timed 2.5× faster: noise (2× at best)
        (4.9, 30.0, 4.0, torch.bfloat16),  # oneDNN's bf16 product (AMX) twice as fast: taken
    ],
)
def test_auto_takes_another_operand_type_only_where_twice_as_fast(
    monkeypatch, bf16_ms, fp32_ms, bf16_pairs_ms, expected
):
    """fp16 at 10 ms (its pairs kernel; oneDNN's 30): a bf16 run 1.7× faster (Zen 4 with the kernel,
    in some processes) keeps fp16 — a second copy and a 2⁵ wider bound for less; ≥ 2× takes it.
    The kernel's own bf16 run never does: its gain is 2× at best, so only a noisy timing reaches it."""
    from vfs import scoring

    times = {
        (torch.float16, "onednn"): 0.030,
        (torch.float16, "pairs"): 0.010,
        (torch.bfloat16, "onednn"): bf16_ms / 1e3,
        (torch.float32, "onednn"): fp32_ms / 1e3,
    }
    if bf16_pairs_ms is not None:
        times[torch.bfloat16, "pairs"] = bf16_pairs_ms / 1e3
    monkeypatch.delenv("VFS_FAST_DTYPE", raising=False)
    monkeypatch.setattr(scoring, "_cpu_product_times", lambda channels: times)
    scoring.fast_dtype.cache_clear()
    try:
        assert scoring.fast_dtype(torch.device("cpu"), 192) == expected
    finally:
        scoring.fast_dtype.cache_clear()


def test_exclude_candidates_and_heat_map(device):
    rng = np.random.default_rng(1)
    feats = random_features(rng, 50, 6, 6, 8)
    mask = grid_mask(np.pad(np.ones((40, 40)), ((20, 60), (30, 50))), (6, 6))
    result = search_regions(feats, 7, mask, k=5, exclude=7, device=device)
    assert 7 not in set(result.top["index"]) and len(result.top) == 5
    allowed = np.zeros(50, bool)
    allowed[10:20] = True
    only = search_regions(feats, 7, mask, k=20, candidates=allowed, device=device)
    assert set(only.top["index"]) == set(range(10, 20))
    i = int(result.top["index"].iloc[0])
    heat = result.placement_scores(i)
    assert heat.max() == pytest.approx(result.scores[i], abs=1e-5)
    assert np.unravel_index(heat.argmax(), heat.shape) == tuple(result.placements[i])


def test_a_result_shows_as_its_summary_and_ranked_table():
    """Not its arrays: a notebook cell ending in a search printed every image's score."""
    feats = random_features(np.random.default_rng(1), 300, 6, 6, 8)
    mask = np.zeros((6, 6), np.float32)
    mask[1:3, 2:5] = 1
    result = search_regions(feats, 7, mask, k=4)
    first, *rows = repr(result).splitlines()
    assert first.startswith("SearchResult: top 4 of 300 images for a 2×3-cell region of the 6×6 grid (")
    assert len(rows) == 5 and rows[1].split()[:2] == ["1", str(result.top["index"].iloc[0])]
    page = result._repr_html_()
    assert page.startswith("<p>SearchResult: top 4 of 300") and page.count("<tr") == 5
    assert result.ranked == 300 and search_regions(feats, 7, mask, k=4, exclude=7).ranked == 299
    some = np.zeros(300, dtype=bool)
    some[:83] = True  # e.g. a label filter: the summary says how many could be returned
    filtered = search_regions(feats, 7, mask, k=4, candidates=some, exclude=7)
    assert filtered.ranked == 82 and filtered.summary().startswith("top 4 of 82 of 300 images for")
    # a filter that the excluded images lie outside of: still said (review)
    others = search_regions(feats, 7, mask, k=4, candidates=~some, exclude=list(range(83)))
    assert others.ranked == 217 and others.summary().startswith("top 4 of 217 of 300 images for")


def test_per_domain_keeps_at_most_n_per_domain(device):
    rng = np.random.default_rng(2)
    src = ArrayFeatures(random_features(rng, 40, 5, 5, 8))
    src.domains = np.array(["a", "b", "c", "d"] * 10)
    mask = np.zeros((5, 5), np.float32)
    mask[1:3, 1:3] = 1
    result = search_regions(src, 0, mask, k=6, per_domain=1, device=device)
    assert len(result.top) == 4
    assert sorted(src.domains[result.top["index"]]) == ["a", "b", "c", "d"]
    assert result.caption().endswith(" — 4 of the 6 asked: at most 1 per domain")  # not a lost result
    full = search_regions(src, 0, mask, k=40, device=device)
    assert full.caption().startswith("40 results from 40 images in ") and " left out" not in full.caption()
    short = search_regions(src, 0, mask, k=41, exclude=[0, 5], device=device)
    assert short.caption().endswith("; 2 images left out — 38 of the 41 asked: no more images to rank")
    assert search_regions(src, 0, mask, k=1, exclude=0, device=device).caption().startswith("1 result from")
    # each domain's kept image is that domain's best
    for i in result.top["index"]:
        same = np.flatnonzero(src.domains == src.domains[i])
        assert i == same[np.argmax(full.scores[same])]


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((5, 5), np.float32), "empty"),
        (np.ones((4, 5), np.float32), "does not match"),
        (np.full((5, 5), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_masks_are_refused_with_a_reason(bad, message, device):
    feats = random_features(np.random.default_rng(3), 4, 5, 5, 8)
    with pytest.raises(ValueError, match=message):
        search_regions(feats, 0, bad, device=device)


@pytest.mark.parametrize(
    "query,exclude,message",
    [
        (4, None, "query index 4 is outside 0..3"),
        (-1, None, "query index -1 is outside 0..3"),
        (0, -1, "excluded image -1 is outside 0..3"),  # numpy would drop image 3 instead
        (0, [1, 7], "excluded image 7 is outside 0..3"),
    ],
)
def test_image_indices_outside_the_source_are_refused(query, exclude, message, device):
    feats = random_features(np.random.default_rng(3), 4, 5, 5, 8)
    with pytest.raises(ValueError, match=message):
        search_regions(feats, query, np.ones((5, 5)), exclude=exclude, device=device)
    with pytest.raises(ValueError, match="query index 0 is not there: the source holds no images"):
        search_regions(feats[:0], 0, np.ones((5, 5)), device=device)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"k": 0}, "k must be a whole number of results ≥ 1, not 0"),
        ({"k": 2.5}, "k must be a whole number of results ≥ 1, not 2.5"),
        ({"per_domain": 0}, "per_domain must be a whole number ≥ 1"),
        ({"per_domain": -1}, "per_domain must be a whole number ≥ 1"),
    ],
)
def test_bad_options_are_refused_with_a_reason(options, message, device):
    src = ArrayFeatures(random_features(np.random.default_rng(3), 4, 5, 5, 8))
    src.domains = np.array(["a", "b", "a", "b"])
    with pytest.raises(ValueError, match=message):
        search_regions(src, 0, np.ones((5, 5)), device=device, **options)
    src.domains = None  # before the features' pass, named as a source (the notebook widget's own words)
    with pytest.raises(
        ValueError, match="per_domain needs a dataset with a domain column; this source has none"
    ):
        search_regions(src, 0, np.ones((5, 5)), device=device, per_domain=1)


def test_the_query_is_checked_against_the_datasets_grid_and_may_be_a_grad_tensor(device):
    feats = random_features(np.random.default_rng(3), 4, 5, 5, 8)
    with pytest.raises(ValueError, match=r"the query's feature grid \(7, 7\) is not the dataset's \(5, 5\)"):
        search_regions(feats, np.ones((7, 7, 8), np.float32), np.ones((5, 5)), device=device)
    # an image that was taken as features says so (it read as another layer)
    with pytest.raises(ValueError, match=r"Or an image\? .* this float64 array was taken as features"):
        search_regions(feats, np.random.default_rng(0).random((100, 100, 3)), np.ones((5, 5)), device=device)
    with pytest.raises(ValueError, match=r"Or a channels-first image\? .* image.transpose\(1, 2, 0\)"):
        search_regions(feats, np.zeros((3, 100, 100), np.uint8), np.ones((5, 5)), device=device)
    query = torch.tensor(feats[1], dtype=torch.float32, requires_grad=True)
    found = search_regions(feats, query, np.ones((5, 5)), device=device)
    assert found.top["index"].iloc[0] == 1
    with pytest.raises(TypeError, match="source must be a feature cache.*not list"):
        search_regions(list(feats), 0, np.ones((5, 5)), device=device)


def test_zero_windows_score_zero_and_zero_query_is_refused(device):
    feats = random_features(np.random.default_rng(4), 6, 4, 4, 8)
    feats[2] = 0
    mask = np.ones((4, 4), np.float32)
    assert search_regions(feats, 0, mask, device=device).scores[2] == 0
    with pytest.raises(ValueError, match="all zero"):
        search_regions(feats, 2, mask, device=device)


def test_rescoring_gathers_rows_where_the_source_holds_them(monkeypatch, device):
    """Re-scored rows come from the resident tensor on the search's device (on a GPU: no host
    round trip), not through `rows`; a source without one is read through `rows`."""
    rng = np.random.default_rng(9)
    feats = random_features(rng, 40, 5, 5, 8)
    query, mask = feats[2].astype(np.float32), soft_blob(rng, 5, 5)
    ref, _ = brute_force(feats, query, mask)
    source = ArrayFeatures(feats)
    search_regions(source, query, mask, k=5, device=device)  # loads it on the device
    monkeypatch.setattr(source, "rows", lambda idx: pytest.fail("read through rows"))
    result = search_regions(source, query, mask, k=5, device=device)
    assert result.rescored >= 5
    assert result.top["index"].tolist() == list(np.argsort(-ref, kind="stable")[:5])
    monkeypatch.setattr(source, "resident_on", lambda device: None)
    with pytest.raises(pytest.fail.Exception, match="read through rows"):
        search_regions(source, query, mask, k=5, device=device)


def test_rescoring_takes_the_fast_best_window_alone_only_where_no_other_bound_reaches_it(device):
    """An image whose other placements' bounds (`runner_up`) stay below the exact score of its
    fast-best window keeps that window's placement and gets its exact score; every other image is
    re-scored at every placement (its best, the first of ties)."""
    rng = np.random.default_rng(4)
    feats = random_features(rng, 12, 6, 7, 16)
    query, mask = feats[0].astype(np.float32), soft_blob(rng, 6, 7)
    every = every_placement(feats, query, mask)  # (n, Ph, Pw)
    pw = every.shape[2]
    best_flat = every.reshape(len(feats), -1).argmax(1)
    rq = RegionQuery.create(query, mask)
    geometry = QueryGeometry.create(rq, (6, 7))
    # Images 0-3: at a placement that is not their best, "nothing else reaches it" (a false
    # runner-up: the window's exact score is what they must get). 4-7: at their best, a runner-up
    # below it. 8-11: not at their best, a runner-up that reaches it (∞: not computed; or the
    # exact best itself): their best must be found.
    wrong = (best_flat + 1) % every[0].size
    flat = np.where((np.arange(12) < 4) | (np.arange(12) >= 8), wrong, best_flat)
    found = FastPass(
        scores=np.ones(12, np.float32),  # above every exact score: only the window's may settle
        placements=np.stack(np.divmod(flat, pw), axis=1),
        upper=np.ones(12, np.float32),
        runner_up=np.array([-np.inf] * 4 + [-1.0] * 4 + [np.inf, np.inf, 0, 0], np.float32),
    )
    found.runner_up[10:] = every.reshape(12, -1).max(1)[10:]
    exact = np.zeros(12, dtype=bool)
    _ExactScoring(ArrayFeatures(feats), rq, geometry, torch.device(device))(np.arange(12), found, exact)
    assert exact.all()
    expected = np.where(np.arange(12) < 4, wrong, best_flat)
    np.testing.assert_allclose(found.scores, every.reshape(12, -1)[np.arange(12), expected], rtol=1e-6)
    np.testing.assert_array_equal(found.placements, np.stack(np.divmod(expected, pw), axis=1))


def count_every_placement(monkeypatch) -> list[int]:
    """The number of images each every-placement re-scoring scores, from now on."""
    every: list[int] = []
    scorer = _ExactScoring.every_placement.func

    def counted(self):
        score = scorer(self)
        return lambda x: every.append(len(x)) or score(x)

    monkeypatch.setattr(_ExactScoring, "every_placement", property(counted))
    return every


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spanning", [False, True])
def test_the_runner_up_is_the_largest_bound_over_the_other_placements(
    dtype, spanning, force_form, monkeypatch, device
):
    """`_FastScoring`'s fourth output, per image, in every form: the largest upper bound over all
    placements but the fast-best one (−∞ where the region has one placement)."""
    monkeypatch.setattr(Scorer, "fuses", lambda self, x: False)
    rng = np.random.default_rng(8)
    feats = np.asarray(rng.standard_normal((30, 6, 7, 24)), np.float16)
    feats[3, 2] = 0  # an all-zero row of cells
    mask = np.ones((6, 7), np.float32) if spanning else soft_blob(rng, 6, 7)
    rq = RegionQuery.create(feats[0].astype(np.float32), mask)
    geometry, dev = QueryGeometry.create(rq, (6, 7)), torch.device(device)
    x = torch.from_numpy(feats).to(dev)
    sq = torch.linalg.vector_norm(x.float(), dim=-1).square()
    for method in forms(mask, dtype, device):
        if method == "pairs" and dtype == torch.float32:
            continue
        force_form(method)
        fast = _FastScoring(rq, geometry, dev, nonnegative=False)
        best, where, upper, runner = (t.cpu().numpy() for t in fast(x.to(dtype), sq))
        scorer, bound = fast._by_dtype[dtype]
        wnorm = scorer.window_norms(sq)
        bounds = bound.upper(scorer.scores(x.to(dtype), wnorm), wnorm, False).nan_to_num(
            nan=np.inf, posinf=np.inf, neginf=np.inf
        )
        bounds = bounds.flatten(0, 1).cpu().numpy().T  # (n, P)
        np.testing.assert_array_equal(upper, bounds.max(1))
        others = bounds.copy()
        others[np.arange(len(feats)), where] = -np.inf
        np.testing.assert_array_equal(runner, others.max(1))
        assert (runner == -np.inf).all() == (bounds.shape[1] == 1)


def test_a_search_rescores_every_placement_only_of_images_a_window_cannot_settle(monkeypatch, device):
    """The fast pass gives each image its runner-up bound: of the images re-scored, those whose
    other placements cannot reach the best window's exact score skip the every-placement pass.
    (The fused GPU epilogue computes no runner-up, ∞: turned off here; the pairs kernel's is kept.)"""
    monkeypatch.setattr(Scorer, "fuses", lambda self, x: self.pairs is not None)
    rng = np.random.default_rng(6)
    feats = random_features(rng, 200, 7, 7, 32)
    query, mask = feats[5].astype(np.float32), soft_blob(rng, 7, 7)
    ref, ref_where = brute_force(feats, query, mask)
    every = count_every_placement(monkeypatch)
    result = search_regions(feats, query, mask, k=10, device=device)
    assert_exact_top_k(result, ref, ref_where)
    assert result.rescored >= 10 and sum(every) < result.rescored


def test_tied_placements_are_rescored_at_every_one_and_the_first_kept(monkeypatch, device):
    """Features equal in every cell: every placement of an image ties exactly, so the fast best's
    window never settles an image alone, and each gets the brute force's placement, (0, 0)."""
    rng = np.random.default_rng(5)
    cells = np.maximum(rng.standard_normal((30, 1, 1, 12)), 0) + 0.1
    feats = np.broadcast_to(cells, (30, 7, 7, 12)).astype(np.float16)
    query = random_features(rng, 1, 7, 7, 12)[0].astype(np.float32) + 0.1
    mask = np.pad(np.ones((2, 3), np.float32), ((2, 3), (1, 3)))
    ref, ref_where = brute_force(feats, query, mask)
    every = count_every_placement(monkeypatch)
    result = search_regions(feats, query, mask, k=10, device=device)
    assert_exact_top_k(result, ref, ref_where)
    assert (ref_where[result.top["index"]] == 0).all()
    assert sum(every) == result.rescored  # a tied placement's bound reaches the window's score


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_exact_gives_every_image_its_exact_score_in_every_form(dtype, force_form, monkeypatch, device):
    """`all_exact=True` (the Distributions page): every image's score and placement are the brute
    force's, not only the top-k's, whatever form and operand type the fast pass ran — so statistics
    over all images read alike on every machine. Without it the others keep their fast scores."""
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: dtype)
    rng = np.random.default_rng(21)
    feats = np.asarray(rng.standard_normal((60, 6, 7, 24)), np.float16)  # signed: the widest bounds
    mask = soft_blob(rng, 6, 7)
    ref, ref_where = brute_force(feats, feats[4].astype(np.float32), mask)
    for method in forms(mask, dtype, device):
        force_form(method)
        fast = search_regions(feats, 4, mask, k=5, device=device)
        result = search_regions(feats, 4, mask, k=5, device=device, all_exact=True)
        np.testing.assert_allclose(result.scores, ref, rtol=0, atol=1e-6)  # float64, kept as fp32
        np.testing.assert_array_equal(result.placements, ref_where)
        assert result.rescored == len(feats) > fast.rescored and result.top.equals(fast.top)


def test_an_unchanged_array_is_prepared_once_and_a_changed_one_never_gives_stale_results(device, monkeypatch):
    """search_regions on a bare array it must convert (fp32 here, the pairs kernel off) reuses its
    preparation (squared norms, fp16 copy) while the array provably has not changed: a GPU tensor
    with the same version counter, a read-only array. A CPU tensor is prepared anew on every call:
    a numpy array may share its memory, whose writes bump no version counter."""
    monkeypatch.setenv("VFS_KERNEL", "off")  # else the kernel reads an fp32 array unprepared
    rng = np.random.default_rng(11)
    feats = random_features(rng, 30, 5, 5, 8).astype(np.float32)
    mask = soft_blob(rng, 5, 5)

    tensor = torch.from_numpy(feats.copy()).to(device)
    first = search_regions(tensor, 2, mask, k=5, device=device)
    again = search_regions(tensor, 2, mask, k=5, device=device)
    assert (again.source._sqnorm is first.source._sqnorm) == (tensor.device.type != "cpu")  # reused
    tensor[7] = tensor[2]  # an in-place write: image 7 now matches the query exactly
    changed = search_regions(tensor, 2, mask, k=5, exclude=2, device=device)
    assert changed.source._sqnorm is not first.source._sqnorm
    ref, _ = brute_force(tensor.cpu().numpy(), tensor[2].float().cpu().numpy(), mask)
    ref[2] = -np.inf
    assert changed.top["index"].iloc[0] == 7
    np.testing.assert_allclose(changed.top["score"], np.sort(ref)[::-1][:5], atol=1e-5)

    frozen = feats.copy()
    frozen.flags.writeable = False
    assert (
        search_regions(frozen, 2, mask, device=device).source._sqnorm
        is search_regions(frozen, 2, mask, device=device).source._sqnorm
    )

    writable = feats.copy()  # numpy counts no writes: prepared anew every call
    a, b = (search_regions(writable, 2, mask, device=device) for _ in range(2))
    assert a.source._sqnorm is not b.source._sqnorm
    view = writable.view()
    view.flags.writeable = False  # read-only, but its base is not
    assert (
        search_regions(view, 2, mask, device=device).source._sqnorm
        is not search_regions(view, 2, mask, device=device).source._sqnorm
    )


def test_a_cpu_tensor_written_through_numpy_is_never_searched_stale(monkeypatch):
    """`torch.from_numpy(a)` and then `a[i] = …` (a notebook's everyday pattern; float64, which the
    kernel does not read, so the array is prepared): the write bumps no version counter, so a CPU
    tensor's preparation is never kept (it was, and the next search used the norms of before)."""
    monkeypatch.setenv("VFS_KERNEL", "auto")
    rng = np.random.default_rng(13)
    feats = random_features(rng, 40, 5, 5, 16).astype(np.float64)
    mask = soft_blob(rng, 5, 5)
    tensor = torch.from_numpy(feats)
    first = search_regions(tensor, 3, mask, k=5, exclude=3, device="cpu")
    assert isinstance(first.source, ArrayFeatures) and not _kept(tensor)
    _writes_bookkeeping_cannot_see(tensor, 3, 30)
    changed = search_regions(tensor, 3, mask, k=5, exclude=3, device="cpu")
    assert changed.top["index"].iloc[0] == 30 and changed.top["score"].iloc[0] == pytest.approx(1.0)
    ref, _ = brute_force(feats.astype(np.float16), feats[3].astype(np.float16).astype(np.float32), mask)
    np.testing.assert_allclose(changed.scores, ref, atol=2e-3)  # every image's, the query's (1) too


def _kept(array: np.ndarray | torch.Tensor) -> bool:
    """Whether a preparation of `array` is kept for the next call."""
    from vfs import sources

    return any(ref() is array for ref, _ in sources._prepared.values())


def _writes_bookkeeping_cannot_see(array: torch.Tensor, source: int, target: int) -> None:
    """Image `target` becomes image `source`, written where no version counter or flag tells."""
    array.data[target] = array.data[source]  # `.data` bumps no version counter
    view = array.numpy()  # nor does a numpy view's write
    view[target, 0, 0] += 0  # (a no-op write, then a real one through the same view)
    view[target] = view[source]


@pytest.mark.skipif(library() is None, reason="the unprepared path is the pairs kernel's")
def test_an_fp16_array_is_searched_unprepared_and_never_stale(monkeypatch):
    """Where the pairs kernel runs, an fp16 array is searched as it is: nothing kept between calls
    (no blind spot for writes that bypass a version counter), and the same answers as a prepared
    source of it (the same top-k and placements; scores as exact, or as fast, as its own)."""

    monkeypatch.setenv("VFS_KERNEL", "on")  # whatever oneDNN's timing at 40 channels
    rng = np.random.default_rng(21)
    feats = np.ascontiguousarray(rng.standard_normal((61, 6, 6, 40)).astype(np.float16))  # tail images
    feats[:20] = np.abs(feats[:20])  # some images of either sign
    mask = soft_blob(rng, 6, 6)
    for array in (feats.copy(), torch.from_numpy(feats.copy())):
        result = search_regions(array, 3, mask, k=7, device="cpu")
        assert isinstance(result.source, UnpreparedArray) and not _kept(array)
        prepared = search_regions(ArrayFeatures(array), 3, mask, k=7, device="cpu")
        pd.testing.assert_frame_equal(result.top, prepared.top)
        np.testing.assert_allclose(result.scores, prepared.scores, atol=2e-3)
        np.testing.assert_array_equal(result.placements, prepared.placements)
    tensor = torch.from_numpy(feats.copy())
    search_regions(tensor, 3, mask, k=7, exclude=3, device="cpu")
    _writes_bookkeeping_cannot_see(tensor, 3, 50)
    changed = search_regions(tensor, 3, mask, k=7, exclude=3, device="cpu")
    assert changed.top["index"].iloc[0] == 50 and changed.top["score"].iloc[0] == pytest.approx(1.0)
    ref, _ = brute_force(tensor.numpy(), tensor[3].float().numpy(), mask)
    ref[3] = -np.inf
    np.testing.assert_allclose(changed.top["score"], np.sort(ref)[::-1][:7], atol=1e-5)
    # a result's source searched again where the kernel does not run: its array, prepared
    monkeypatch.setenv("VFS_KERNEL", "off")
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: torch.bfloat16)
    again = search_regions(changed.source, 3, mask, k=7, exclude=3, device="cpu")
    assert isinstance(again.source, ArrayFeatures) and again.top["index"].equals(changed.top["index"])


@pytest.mark.skipif(library() is None, reason="the unprepared path is the pairs kernel's")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_unprepared_array_with_nan_or_inf_is_refused(bad, monkeypatch):
    monkeypatch.setenv("VFS_KERNEL", "on")
    feats = random_features(np.random.default_rng(2), 8, 4, 4, 16)
    feats[5, 3, 3, 7] = bad  # a corner cell: every placement's, or none
    for mask in (np.ones((4, 4)), np.pad(np.ones((2, 2)), 1)):
        with pytest.raises(ValueError, match="NaN or inf"):
            search_regions(feats, 0, mask, device="cpu")


@pytest.mark.parametrize("kind", ["fp16 tensor", "read-only", "fp32 tensor"])
def test_a_kept_preparation_goes_with_its_array(kind, device, monkeypatch):
    """The preparation kept for the next call holds none of the array's memory: once the caller
    drops the array (and the results that hold it), the array is freed and its entry goes. (fp16
    arrays are prepared where the pairs kernel is off.)"""
    import gc
    import weakref

    from vfs import sources

    monkeypatch.setenv("VFS_KERNEL", "off")
    rng = np.random.default_rng(5)
    feats = random_features(rng, 12, 4, 4, 8)
    array = {
        "fp16 tensor": lambda: torch.from_numpy(feats.copy()).to(device),
        "read-only": lambda: np.require(feats.copy(), requirements="O"),
        "fp32 tensor": lambda: torch.from_numpy(feats.astype(np.float32)).to(device),
    }[kind]()
    if isinstance(array, np.ndarray):
        array.flags.writeable = False
    elif array.device.type == "cpu":
        search_regions(array, 1, soft_blob(rng, 4, 4), k=3, device=device)
        assert not _kept(array)  # a CPU tensor's memory may be a numpy array's: never kept
        return
    mask = soft_blob(rng, 4, 4)
    first = search_regions(array, 1, mask, k=3, device=device)
    again = search_regions(array, 1, mask, k=3, device=device)
    assert again.source._sqnorm is first.source._sqnorm and id(array) in sources._prepared
    alive, key = weakref.ref(array), id(array)
    del array, first, again
    gc.collect()
    assert alive() is None and key not in sources._prepared


def test_an_array_gone_while_the_preparations_are_locked_is_forgotten_at_the_next_call(monkeypatch):
    """Its weakref callback cannot wait for the lock (it may run inside `prepared`, in a garbage
    collection): the entry goes at the next call instead of deadlocking."""
    from vfs import sources

    monkeypatch.setenv("VFS_KERNEL", "off")  # a prepared array
    rng = np.random.default_rng(6)

    def read_only() -> np.ndarray:  # kept: no write can reach it
        array = random_features(rng, 6, 3, 3, 8).astype(np.float32)
        array.flags.writeable = False
        return array

    array = read_only()
    search_regions(array, 0, np.ones((3, 3)), k=2, device="cpu")
    key = id(array)
    with sources._prepared_lock:
        del array  # the callback runs here, the lock held
    assert key in sources._prepared
    other = read_only()
    search_regions(other, 0, np.ones((3, 3)), k=2, device="cpu")
    assert all(ref() is not None for ref, _ in sources._prepared.values())  # (`other` may reuse the id)


def test_a_kept_array_gets_its_bf16_copy_in_the_preparing_pass(monkeypatch):
    """Where bf16 is chosen and the pairs kernel is off, a bare array whose preparation is kept is
    rounded to bf16 once, in the same pass as its norms, and searched in bf16 (top-k still exact);
    one prepared for this call only is searched in fp16 (a bf16 copy would cost about what it
    saves)."""
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: torch.bfloat16)
    monkeypatch.setenv("VFS_KERNEL", "off")
    rng = np.random.default_rng(12)
    feats = random_features(rng, 40, 6, 6, 16)
    mask = soft_blob(rng, 6, 6)
    ref, _ = brute_force(feats, feats[4].astype(np.float32), mask)
    frozen = feats.copy()
    frozen.flags.writeable = False  # kept: no write can reach it
    kept = search_regions(frozen, 4, mask, k=8, device="cpu")
    source = kept.source
    assert isinstance(source, ArrayFeatures) and source.cpu_dtype == torch.bfloat16
    (_, held, _), *_ = source.chunks(torch.device("cpu"), dtype=torch.bfloat16)
    assert torch.equal(held, torch.from_numpy(feats).to(torch.bfloat16))
    once = search_regions(feats.copy(), 4, mask, k=8, device="cpu")
    assert once.source.cpu_dtype == torch.float16
    np.testing.assert_allclose(once.scores, ref, atol=2e-3)  # fp16-level scores for every image
    for result in (kept, once):
        assert list(result.top["index"]) == list(np.argsort(-ref, kind="stable")[:8])
        np.testing.assert_allclose(result.top["score"], ref[result.top["index"]], atol=1e-5)


@pytest.mark.skipif(library() is None, reason="the unprepared path is the pairs kernel's")
def test_an_fp32_array_is_searched_unprepared_with_the_answers_of_its_fp16_copy(monkeypatch, force_form):
    """Where the pairs kernel runs, an fp32 array is searched as it is, each value rounded to fp16
    as the kernel reads it: nothing kept, never stale, and bit for bit the answers of its fp16 copy
    — with values halfway between fp16's (to even), in its subnormal range and near its largest."""

    monkeypatch.setenv("VFS_KERNEL", "on")
    rng = np.random.default_rng(22)
    feats = rng.standard_normal((61, 6, 6, 40)).astype(np.float32)
    feats[:20] = np.abs(feats[:20])
    feats[5, 2] *= 1e-5  # fp16 subnormals
    feats[6, :, :, :8] = 1 + 2.0**-11  # halfway between 1 and fp16's next value: to even, 1
    feats[7, 1, 1, :4] = 65519.0  # to fp16's largest, 65,504
    mask = soft_blob(rng, 6, 6)
    want = search_regions(feats.astype(np.float16), 3, mask, k=7, device="cpu")
    for array in (feats.copy(), torch.from_numpy(feats.copy())):
        got = search_regions(array, 3, mask, k=7, device="cpu")
        assert isinstance(got.source, UnpreparedArray) and got.method == "pairs"
        assert not _kept(array)
        pd.testing.assert_frame_equal(got.top, want.top)
        np.testing.assert_array_equal(got.scores, want.scores)  # the fast ones too: the same sums
        np.testing.assert_array_equal(got.placements, want.placements)
        np.testing.assert_array_equal(got.placement_scores(7), want.placement_scores(7))
    tensor = torch.from_numpy(feats.copy())
    search_regions(tensor, 3, mask, k=7, exclude=3, device="cpu")
    _writes_bookkeeping_cannot_see(tensor, 3, 50)
    changed = search_regions(tensor, 3, mask, k=7, exclude=3, device="cpu")
    assert changed.top["index"].iloc[0] == 50 and changed.top["score"].iloc[0] == pytest.approx(1.0)
    # one image all in fp16's subnormals (not zero) in an array fp16 holds: searched as it is,
    # that image as the query and in `placement_scores`
    feats[9] *= 1e-6
    want = search_regions(feats.astype(np.float16), 9, mask, k=7, device="cpu")
    for array in (feats.copy(), torch.from_numpy(feats.copy())):
        got = search_regions(array, 9, mask, k=7, device="cpu")
        assert isinstance(got.source, UnpreparedArray) and not _kept(array)
        pd.testing.assert_frame_equal(got.top, want.top)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.placement_scores(9), want.placement_scores(9))
    # where oneDNN's fp32 product beats the kernel's fp32 run: the array is prepared (fp16 copy)
    faster = lambda device, dtype, *a: dtype == torch.float16
    with monkeypatch.context() as slower_fp32:
        slower_fp32.setattr("vfs.search.uses_pairs", faster)
        slower_fp32.setattr("vfs.scoring.uses_pairs", faster)
        other = search_regions(feats, 9, mask, k=7, device="cpu")
    assert isinstance(other.source, ArrayFeatures) and other.method == "pairs"
    pd.testing.assert_frame_equal(other.top, want.top)
    # a form other than the kernel's (forced): the slices' fp16 copy
    force_form("cells")
    cells = search_regions(feats, 9, mask, k=7, device="cpu")
    assert isinstance(cells.source, UnpreparedArray) and cells.method == "cells"
    pd.testing.assert_frame_equal(cells.top, want.top)
    copy_cells = search_regions(feats.astype(np.float16), 9, mask, k=7, device="cpu")
    np.testing.assert_allclose(cells.scores, copy_cells.scores, rtol=0, atol=1e-6)  # norms' rounding apart


@pytest.mark.skipif(library() is None, reason="the unprepared path is the pairs kernel's")
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_a_channels_first_view_is_searched_as_it_is_slice_by_slice(dtype, monkeypatch, force_form):
    """A CNN's (N, C, h, w) output permuted to (N, h, w, C) — a numpy transpose or a torch permute,
    no copy — is searched as it is, slice by slice: bit for bit the answers of a contiguous copy,
    nothing kept, never stale."""
    from vfs import sources

    monkeypatch.setenv("VFS_KERNEL", "on")
    image = 6 * 5 * 37 * np.dtype(dtype).itemsize
    monkeypatch.setattr(sources, "RESIDENT_SLICE_BYTES", {"cpu": 7 * image})  # 9 slices, 6-7 images each
    rng = np.random.default_rng(24)
    nchw = rng.standard_normal((61, 37, 6, 5)).astype(dtype)
    mask = soft_blob(rng, 6, 5)
    want = search_regions(np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), 3, mask, k=7, device="cpu")
    for view in (nchw.transpose(0, 2, 3, 1), torch.from_numpy(nchw).permute(0, 2, 3, 1)):
        got = search_regions(view, 3, mask, k=7, device="cpu")
        assert isinstance(got.source, UnpreparedArray) and got.method == "pairs" and not _kept(view)
        pd.testing.assert_frame_equal(got.top, want.top)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.placement_scores(40), want.placement_scores(40))
    base = torch.from_numpy(nchw.copy())
    view = base.permute(0, 2, 3, 1)
    search_regions(view, 3, mask, k=7, exclude=3, device="cpu")
    base.data[50] = base.data[3]  # no version counter bumped
    changed = search_regions(view, 3, mask, k=7, exclude=3, device="cpu")
    assert changed.top["index"].iloc[0] == 50 and changed.top["score"].iloc[0] == pytest.approx(1.0)
    force_form("cells")  # another form: the slices' fp16 copies, their norms summed as a copy's
    cells = search_regions(nchw.transpose(0, 2, 3, 1), 3, mask, k=7, device="cpu")
    copy = search_regions(np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), 3, mask, k=7, device="cpu")
    assert cells.method == "cells" and isinstance(cells.source, UnpreparedArray)
    np.testing.assert_array_equal(cells.scores, copy.scores)


@pytest.mark.skipif(library() is None, reason="the unprepared path is the pairs kernel's")
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_a_channels_first_view_under_a_whole_grid_region_finds_its_contiguous_copys_top(
    dtype, default_dtype, monkeypatch
):
    """A region covering the grid reads a channels-first view in order (kernel.c's WCF kinds):
    the top-k and its exact scores are a contiguous copy's, the other images' fast scores within
    fp32 rounding of the copy's, whatever torch's default type; a changed array is searched anew."""
    from vfs import sources

    image = 5 * 5 * 48 * np.dtype(dtype).itemsize
    monkeypatch.setattr(sources, "RESIDENT_SLICE_BYTES", {"cpu": 9 * image})  # 10 slices
    rng = np.random.default_rng(25)
    nchw = rng.standard_normal((90, 48, 5, 5)).astype(dtype)
    mask = rng.uniform(0.1, 1, (5, 5)).astype(np.float32)
    copy = search_regions(np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), 4, mask, k=9, device="cpu")
    got = search_regions(nchw.transpose(0, 2, 3, 1), 4, mask, k=9, device="cpu")
    assert isinstance(got.source, UnpreparedArray) and got.method == "pairs"
    pd.testing.assert_frame_equal(got.top, copy.top)
    np.testing.assert_allclose(got.scores, copy.scores, rtol=1e-6, atol=1e-7)
    tensor = torch.from_numpy(nchw.copy())
    view = tensor.permute(0, 2, 3, 1)
    tensor[70] = tensor[4] * 3
    changed = search_regions(view, 4, mask, k=9, exclude=4, device="cpu")
    assert changed.top["index"].iloc[0] == 70 and changed.top["score"].iloc[0] == pytest.approx(1.0)


@pytest.mark.skipif(library() is None, reason="the unprepared path is the pairs kernel's")
@pytest.mark.parametrize(
    "case", ["beyond fp16", "query beyond fp16", "tiny", "tiny, a feature-map query", "at the limit"]
)
def test_an_fp32_array_its_fp16_copy_would_lose_is_prepared_and_scaled(case, monkeypatch):
    """Values fp16 cannot hold — beyond its largest (in any image, or in the query's), or an array
    so small that its copy would fall to fp16's subnormals — send the search to a prepared array,
    scaled by a power of two and kept for no next call: the answers of `ArrayFeatures`, not inf,
    NaN or a refusal. So does a largest cell norm at the limit, within the rounding of the
    kernel's norms (`ArrayFeatures` sums them in another order)."""

    monkeypatch.setenv("VFS_KERNEL", "on")
    rng = np.random.default_rng(23)
    feats = np.abs(rng.standard_normal((40, 5, 5, 24))).astype(np.float32)
    if case == "beyond fp16":
        feats[17, 2, 2, 0] = 1e5
    elif case == "query beyond fp16":
        feats[3, 0, 0, 0] = 7e4
    else:
        feats *= 1e-7
    if case == "at the limit":  # one cell of squared norm 2⁻¹², exactly FP16_SAFE_SQNORM
        feats[11, 0, 0] = 0
        feats[11, 0, 0, 0] = 2.0**-6
    mask = soft_blob(rng, 5, 5)
    query = feats[3] if "feature-map" in case else 3
    tensor = torch.from_numpy(feats)
    got = search_regions(tensor, query, mask, k=6, device="cpu")
    assert isinstance(got.source, ArrayFeatures) and not _kept(tensor)
    want = search_regions(ArrayFeatures(feats), query, mask, k=6, device="cpu")
    pd.testing.assert_frame_equal(got.top, want.top)
    if case != "at the limit":  # there fp16's subnormals hold the other values, unscaled
        ref, _ = brute_force(feats, feats[3], mask)
        np.testing.assert_allclose(got.top["score"], ref[got.top["index"]], atol=2e-3)  # fp16's rounding
    feats[9, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        search_regions(feats, query, mask, k=6, device="cpu")


@pytest.mark.skipif(library() is None, reason="the pairs kernel is not built here")
def test_an_array_is_searched_as_it_is_where_the_kernel_reads_fp16(monkeypatch):
    """With the pairs kernel, no bf16 copy of a notebook's array (its page faults cost more on the
    first call than the kernel's fp16 reads cost on later ones), nor any preparation."""
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: torch.bfloat16)
    monkeypatch.setenv("VFS_KERNEL", "on")
    rng = np.random.default_rng(12)
    tensor = torch.from_numpy(random_features(rng, 40, 6, 6, 16))
    mask = soft_blob(rng, 6, 6)
    result = search_regions(tensor, 4, mask, k=8, device="cpu")
    assert isinstance(result.source, UnpreparedArray) and result.method == "pairs"
    ref, _ = brute_force(tensor.numpy(), tensor[4].float().numpy(), mask)
    np.testing.assert_allclose(result.scores, ref, atol=1e-4)  # fp32-tight for every image
    assert list(result.top["index"]) == list(np.argsort(-ref, kind="stable")[:8])


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32-default", "fp64-default"])
def default_dtype(request):
    """torch's default type, which training code sets to float64: fast results stay fp32."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_bf16_scores_refine_by_gathering_or_by_one_more_pass(share, default_dtype, monkeypatch):
    """What the bf16 bound cannot rule out is scored again in fp16: gathered, or (past a share of
    the images) in one more pass over all; either way the top-k is exact and, past that share,
    every image's score fp16-close — whatever torch's default type (the refined images' results
    are allocated fp32, what the kernel writes)."""
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: torch.bfloat16)
    monkeypatch.setattr("vfs.search._REFINE_ALL_SHARE", share)
    monkeypatch.setattr("vfs.search._REFINE_MIN_VALUES", 0)  # this few would go to float64 directly
    rng = np.random.default_rng(13)
    feats = rng.standard_normal((50, 6, 6, 32)).astype(np.float16)  # signed: scores packed near 0
    mask = soft_blob(rng, 6, 6)
    ref, _ = brute_force(feats, feats[5].astype(np.float32), mask)
    result = search_regions(ArrayFeatures(feats, cpu_dtype=torch.bfloat16), 5, mask, k=7, device="cpu")
    assert list(result.top["index"]) == list(np.argsort(-ref, kind="stable")[:7])
    np.testing.assert_allclose(result.top["score"], ref[result.top["index"]], atol=1e-5)
    np.testing.assert_allclose(result.scores, ref, atol=2e-3 if share == 0 else 3e-2)


def test_a_source_mixing_bf16_and_fp16_chunks_keeps_the_top_k_exact(monkeypatch):
    """Images of a chunk that came in fp16 (e.g. streamed) may be refined too: with their own
    squared norms, not whatever memory held (a review found it; this failed 4 times in 5)."""
    monkeypatch.setattr("vfs.search.fast_dtype", lambda *a: torch.bfloat16)
    monkeypatch.setattr("vfs.search._REFINE_MIN_VALUES", 0)  # refined, not sent to float64 directly
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((40, 5, 5, 16)).astype(np.float16)
    feats[30:] = feats[3]  # in the fp16 half: exact matches of the query
    base = ArrayFeatures(feats, cpu_dtype=torch.bfloat16)

    class Mixed:
        shape, nonnegative, domains = base.shape, base.nonnegative, None
        rows, resident_on, describe_rows = base.rows, base.resident_on, base.describe_rows

        def chunks(self, device, memory_budget=None, dtype=torch.float16):
            (_, bf16, sq), *_ = base.chunks(device, dtype=torch.bfloat16)
            yield 0, bf16[:20], sq[:20]
            yield 20, base._fp16[20:], sq[20:]

    mask = np.zeros((5, 5), np.float32)
    mask[1:4, 1:4] = 1
    ref, _ = brute_force(feats, feats[3].astype(np.float32), mask)
    for _ in range(3):
        torch.full((40 * 25,), 1e30)  # junk where the next torch.empty may land
        result = search_regions(Mixed(), 3, mask, k=12, device="cpu")
        assert sorted(result.top["index"]) == sorted(np.argsort(-ref, kind="stable")[:12])
        np.testing.assert_allclose(result.top["score"], ref[result.top["index"]], atol=1e-5)


def test_inference_mode_tensors_are_searched_prepared_anew(device):
    """No version counter to tell whether they changed: prepared on every call, never refused."""
    rng = np.random.default_rng(3)
    feats = random_features(rng, 20, 4, 4, 8)
    with torch.inference_mode():
        tensor = torch.from_numpy(feats).clone()
    mask = soft_blob(rng, 4, 4)
    a, b = (search_regions(tensor, 1, mask, k=3, device=device) for _ in range(2))
    assert a.source is not b.source and list(a.top["index"]) == list(b.top["index"])
