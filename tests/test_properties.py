"""Property-based tests (hypothesis): mask mapping and region search on random shapes, grids, masks.

- `grid_mask` (area averaging): weights in [0, 1]; the mask's mean equals the drawing's mean
  coverage (painted area is preserved); exact block means when the drawing is an integer multiple
  of the grid; monotone in the paint; no painted pixel ever vanishes (its cell gets weight > 0).
- `crop_mask`: peak 1, box = the nonzero cells, scores invariant to the mask's scale.
- `search_regions` against a brute-force loop over every image and placement, in every exact
  forms ("cells", "band", the compiled "pairs" where built, and for regions spanning the grid
  "whole" and "whole_cells"), with exact top-k scores.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from search_reference import brute_force

import vfs.kernel
import vfs.search
from vfs.masks import crop_mask, grid_mask
from vfs.scoring import QueryPlan
from vfs.search import search_regions

EXAMPLES = int(os.environ.get("VFS_HYPOTHESIS_EXAMPLES", "40"))  # raise it for a soak
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# grid_mask's arithmetic on drawings of any shape: its warning for a stretched one is not the point here
pytestmark = pytest.mark.filterwarnings("ignore:a .* drawing is stretched onto")


# --------------------------------------------------------------------------- strategies

sides = st.integers(1, 48)
grids = st.tuples(st.integers(1, 12), st.integers(1, 12))


@st.composite
def drawings(draw, shape=None):
    """A drawing as the app or a file gives it: bool strokes, uint8 alpha or float coverage."""
    shape = shape or (draw(sides), draw(sides))
    kind = draw(st.sampled_from(["bool", "uint8", "float"]))
    if kind == "bool":
        return draw(hnp.arrays(np.bool_, shape))
    if kind == "uint8":
        return draw(hnp.arrays(np.uint8, shape))
    return draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))


def coverage(drawing: np.ndarray) -> np.ndarray:
    if drawing.dtype == np.uint8:
        return drawing / 255.0
    return drawing.astype(np.float64)


# --------------------------------------------------------------------------- grid_mask


@SETTINGS
@given(drawing=drawings(), grid=grids)
def test_grid_mask_weights_and_area(drawing, grid):
    mask = grid_mask(drawing, grid)
    assert mask.shape == grid and mask.dtype == np.float32
    assert (mask >= 0).all() and (mask <= 1).all()
    # area averaging preserves the painted area: mean of the mask = mean coverage of the drawing
    assert mask.astype(np.float64).mean() == pytest.approx(coverage(drawing).mean(), abs=1e-6)


@SETTINGS
@given(grid=grids, factor=st.tuples(st.integers(1, 6), st.integers(1, 6)), data=st.data())
def test_grid_mask_is_exact_block_means_for_integer_multiples(grid, factor, data):
    (h, w), (ky, kx) = grid, factor
    drawing = data.draw(drawings((h * ky, w * kx)))
    expect = coverage(drawing).reshape(h, ky, w, kx).mean(axis=(1, 3))
    np.testing.assert_allclose(grid_mask(drawing, grid), expect, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(grid=grids, data=st.data())
def test_grid_mask_is_monotone_and_never_loses_paint(grid, data):
    shape = (data.draw(sides), data.draw(sides))
    # paint as files and the canvas hold it: 0, or at least one 16-bit level (float32 would lose 1e-143)
    paint = st.one_of(st.just(0.0), st.floats(1 / 65535, 1))
    less = data.draw(hnp.arrays(np.float64, shape, elements=paint))
    extra = data.draw(hnp.arrays(np.float64, shape, elements=paint))
    more = np.clip(less + extra, 0, 1)
    a, b = grid_mask(less, grid), grid_mask(more, grid)
    assert (a <= b).all()  # more paint never lowers a weight
    # every painted pixel gives its cell a weight > 0: a thin stroke never vanishes on the grid
    ys, xs = np.nonzero(more > 0)
    cy = ((ys + 0.5) * grid[0] / shape[0]).astype(int)
    cx = ((xs + 0.5) * grid[1] / shape[1]).astype(int)
    assert (b[cy, cx] > 0).all()


@SETTINGS
@given(
    mask=hnp.arrays(np.float64, grids, elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e6))),
    scale=st.floats(1e-20, 1e20),
)
def test_crop_mask_box_peak_and_scale(mask, scale):
    assume((mask > 0).any())
    c = crop_mask(mask)
    y0, x0, y1, x1 = c.query_box()
    rows, cols = np.nonzero(mask > 0)
    assert (y0, x0, y1, x1) == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    assert c.weights.max() == 1 and (c.weights >= 0).all()
    scaled = crop_mask(mask * scale)
    assert scaled.query_box() == c.query_box()
    np.testing.assert_allclose(scaled.weights, c.weights, rtol=1e-6, atol=1e-30)


# --------------------------------------------------------------------------- search


@st.composite
def search_cases(draw):
    """Random shapes, post-ReLU fp16 features, a soft mask with at least one positive cell."""
    n = draw(st.integers(1, 9))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    c = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.standard_normal((n, h, w, c)), 0).astype(np.float16)
    mask = draw(hnp.arrays(np.float32, (h, w), elements=st.sampled_from([0.0, 0.0, 0.05, 0.3, 0.5, 1.0])))
    if not (mask > 0).any():
        mask[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = 1
    use_index = draw(st.booleans())
    query = (
        int(rng.integers(n))
        if use_index
        else np.maximum(rng.standard_normal((h, w, c)), 0).astype(np.float32)
    )
    k = draw(st.integers(1, n))
    return feats, query, mask, k


def check_against_brute_force(feats, query, mask, k, device, method=None):
    q = feats[query].astype(np.float32) if isinstance(query, int) else query
    ref, _ = brute_force(feats, q, mask)
    plan = None if method is None else (lambda *a, m=method: QueryPlan(m))
    with mock.patch.object(vfs.search, "plan_query", plan or vfs.search.plan_query):
        try:
            result = search_regions(feats, query, mask, k=k, device=device)
        except ValueError as e:  # the only refusal here: the query region's features are all zero
            assert "all zero" in str(e)
            assert np.abs(q[mask > 0]).max() == 0
            return
    np.testing.assert_allclose(result.scores, ref, atol=2e-3)  # every image: within the fast bound
    top = result.top
    assert len(top) == k
    # the top-k are exact (re-scored in fp32) and are the best k (ties may come in any order)
    np.testing.assert_allclose(top["score"], ref[top["index"]], atol=1e-5)
    np.testing.assert_allclose(np.sort(top["score"])[::-1], np.sort(ref)[::-1][:k], atol=1e-5)
    assert list(top["score"]) == sorted(top["score"], reverse=True)
    for i, box in zip(top["index"], top["grid_box"]):  # the reported window scores the image's best
        mh, mw = result.query.mask.shape
        assert (box[2] - box[0], box[3] - box[1]) == (mh, mw)
        assert result.placement_scores(i)[box[0], box[1]] == pytest.approx(ref[i], abs=1e-5)


@SETTINGS
@given(case=search_cases())
def test_search_matches_brute_force(case, device):
    check_against_brute_force(*case, device)


@settings(max_examples=max(1, EXAMPLES * 5 // 8), deadline=None)
@given(case=search_cases(), method=st.sampled_from(["cells", "band", "whole", "whole_cells", "pairs"]))
def test_every_exact_form_matches_brute_force(case, method, device):
    feats, query, mask, k = case
    if method == "pairs" and (device != "cpu" or vfs.kernel.library() is None):
        return  # not built here, or on a GPU: the other forms run
    if method.startswith("whole"):  # the forms of one placement: a region spanning the grid
        mask = mask.copy()
        mask[0, 0], mask[-1, -1] = max(mask[0, 0], 0.05), max(mask[-1, -1], 0.3)
    check_against_brute_force(feats, query, mask, k, device, method=method)


@settings(max_examples=max(1, EXAMPLES * 5 // 8), deadline=None)
@given(case=search_cases(), scale=st.floats(1e-8, 1e8))
def test_search_is_invariant_to_the_mask_scale(case, scale, device):
    feats, query, mask, k = case
    try:
        a = search_regions(feats, query, mask, k=k, device=device)
    except ValueError:
        return
    b = search_regions(feats, query, mask * np.float32(scale), k=k, device=device)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-6)
    np.testing.assert_allclose(b.top["score"], a.top["score"], atol=1e-6)
