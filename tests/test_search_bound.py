"""The fast path's error bound, which decides which images are re-scored exactly: it must hold for
every placement (or the top-k could be wrong), and be tight (or every image would be re-scored)."""

import numpy as np
import pytest
import torch
from search_reference import every_placement
from test_search import soft_blob

import vfs.search
from vfs.kernel import kernel_weights, library
from vfs.scoring import FastBound, QueryGeometry, QueryPlan, RegionQuery, Scorer, product_output_dtype
from vfs.search import search_regions
from vfs.sources import ArrayFeatures

CASES = {
    # name: (feature scale, signed features, mask weight scale)
    "post-ReLU": (1.0, False, 1.0),
    "signed": (1.0, True, 1.0),
    "tiny features (fp16 subnormal outputs)": (3e-5, False, 1.0),
    "faint mask edge (subnormal weights)": (1.0, False, 1e-3),
    "large signed features": (300.0, True, 1.0),
}


def make(case: str, seed: int, n=50, grid=(6, 7), c=48, spanning=False):
    """fp16 features and a soft mask; `spanning`: the mask's box is the whole grid (one placement)."""
    scale, signed, faint = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *grid, c)) * rng.uniform(0.1, 3, size=(n, *grid, 1))
    x = (x if signed else np.maximum(x, 0)) * scale
    x[rng.random(x.shape[:3]) < 0.1] = 0  # some all-zero cells
    mask = soft_blob(rng, *grid)
    if spanning:
        mask[0, 0], mask[-1, -1] = max(mask[0, 0], 0.2), max(mask[-1, -1], 0.2)
    mask[mask < mask.max() / 2] *= faint
    return x.astype(np.float16), mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["cells", "band", "whole", "whole_cells", "pairs"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(4))
def test_upper_bound_holds_for_every_placement(case, method, seed, dtype, device):
    lib = library()
    if method == "pairs" and (device != "cpu" or lib is None or dtype not in lib.dtypes):
        pytest.skip(f"the pairs kernel does not run on {device} here for {dtype}")
    x, mask = make(case, seed, spanning=method.startswith("whole"))
    q = RegionQuery.create(x[seed].astype(np.float32), mask)
    exact = every_placement(x, q.features, mask)
    source = ArrayFeatures(x)
    dev = torch.device(device)
    geometry, plan = QueryGeometry.create(q, x.shape[1:3]), QueryPlan(method)
    scorer, bound = Scorer.fast(geometry, plan, dev, dtype), FastBound.create(q, geometry, plan, dtype, dev)
    features = torch.from_numpy(x).to(dev)
    t = features.to(dtype)  # bf16 operands: features rounded too, as a bf16 copy holds them
    wnorm = scorer.window_norms(torch.linalg.vector_norm(features.float(), dim=-1).square())
    fast = scorer.scores(t, wnorm)
    nonnegative = bound.nonnegative_weights and source.nonnegative
    assert nonnegative == (not CASES[case][1])
    upper = bound.upper(fast, wnorm, nonnegative).permute(2, 0, 1).double().cpu().numpy()
    assert (exact <= upper).all(), np.max(exact - upper)
    gap = (upper - exact)[exact > 0.05]
    # tight enough to rule most images out (bf16: unit roundoff 2⁻⁸, three roundings ≈ 1.2%);
    # whole_cells bounds h·w outputs, each in fp16's subnormal range with tiny features (where
    # they are fp16: on a CPU)
    tight = (5e-3 if nonnegative else 2e-2) if dtype != torch.bfloat16 else 3e-2
    subnormal_cells = (
        method == "whole_cells" and case.startswith("tiny") and product_output_dtype(dev, dtype) == dtype
    )
    assert gap.max() < tight * (3 if subnormal_cells else 1)
    if method == "pairs" and dtype == torch.float16:  # exact features, fp32 sums of known depth
        assert gap.max() < 1e-4


@pytest.mark.skipif(library() is None, reason="the pairs kernel is not built here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("pool", [False, True], ids=["openmp-team", "own-pool"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(4))
def test_the_kernels_own_norms_stay_within_the_bound(case, seed, pool, dtype, monkeypatch):
    """Given no norms (an unprepared array), the kernel takes each cell's as it reads it, summed in
    its own order: each image's largest bound stays above its exact best score, the runner-up's
    above every other placement's, and the best fast score near its placement's exact one. An fp32
    array off fp16's grid (by less than half its spacing) is bounded as its fp16 copy."""
    if pool:  # the kernel's threads of our own, where torch's OpenMP runtime is not found
        monkeypatch.setattr("vfs.kernel.openmp", lambda: None)
    x, mask = make(case, seed)
    n = len(x)
    features = torch.from_numpy(x)
    if dtype == torch.float32:
        jitter = np.random.default_rng(seed).uniform(-(2.0**-13), 2.0**-13, x.shape)
        features = features.float() * (1 + torch.from_numpy(jitter).float())
        assert torch.equal(features.half(), torch.from_numpy(x))
    q = RegionQuery.create(x[seed].astype(np.float32), mask)
    exact = every_placement(x, q.features, mask).reshape(n, -1)
    cpu, plan = torch.device("cpu"), QueryPlan("pairs")
    geometry = QueryGeometry.create(q, x.shape[1:3])
    scorer = Scorer.fast(geometry, plan, cpu, dtype)
    bound = FastBound.create(q, geometry, plan, dtype, cpu)
    out = (torch.empty(n), torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n))
    taken = torch.empty(x.shape[:3])
    best, where, upper, runner = (
        t.numpy() for t in scorer.best_placements(features, taken, bound, False, out, fill=True)
    )
    want = torch.linalg.vector_norm(torch.from_numpy(x).float(), dim=-1).square()
    torch.testing.assert_close(taken, want, rtol=1e-5, atol=1e-30)  # the fp16 copy's norms
    images = np.arange(n)
    assert (exact.max(1) <= upper).all()
    others = exact.copy()
    others[images, where] = -np.inf
    assert (others.max(1) <= runner).all()
    np.testing.assert_allclose(best, exact[images, where], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_top_k_is_exact_on_tightly_packed_scores(case, device):
    """Random features pack the best scores within ~1e-3: the re-scoring must sort them out."""
    rng = np.random.default_rng(len(case))
    n, grid, c = 400, (7, 7), 64
    x, _ = make(case, 0, n=n, grid=grid, c=c)
    source = ArrayFeatures(x)
    for _ in range(6):
        mask = soft_blob(rng, *grid)
        qi = int(rng.integers(n))
        ref = every_placement(x, x[qi].astype(np.float32), mask).reshape(n, -1).max(1)
        ref[qi] = -np.inf
        result = search_regions(source, qi, mask, k=10, exclude=qi, device=device)
        order = np.argsort(-ref, kind="stable")
        got = result.top["index"].to_numpy()
        np.testing.assert_allclose(result.top["score"], ref[got], atol=2e-6)
        np.testing.assert_allclose(ref[got], ref[order[:10]], atol=2e-6)  # ties within fp32 may swap
        assert result.rescored < n // 2


@pytest.mark.parametrize("form", [None, "cells", "band"])
def test_fp16_overflow_is_re_scored_not_lost(device, form, force_form, monkeypatch):
    """Products beyond fp16's range come out as inf / NaN: those images are re-scored in float64 (on
    a GPU, whose products output fp32, nothing overflows: the top-k is checked all the same), not
    taken for damaged features — oneDNN's forms, which run where the kernel does not (no compiler,
    an ARM CPU), output fp16 on a CPU."""
    if form is not None:
        force_form(form)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((30, 5, 5, 256)) * 2000).astype(np.float16)
    mask = np.ones((5, 5), np.float32)
    mask[0, 0] = 0
    ref = every_placement(x, x[4].astype(np.float32), mask).reshape(30, -1).max(1)
    scored = []  # each image re-scored in float64 once, though its bound stays ∞
    row_blocks = vfs.search._row_blocks

    def spy(source, indices, *args):
        scored.extend(indices.tolist())
        return row_blocks(source, indices, *args)

    monkeypatch.setattr(vfs.search, "_row_blocks", spy)
    result = search_regions(x, 4, mask, k=5, device=device)
    assert result.top["index"].tolist() == np.argsort(-ref, kind="stable")[:5].tolist()
    np.testing.assert_allclose(result.top["score"], ref[result.top["index"]], atol=2e-6)
    assert len(scored) == len(set(scored)) == result.rescored


def test_subnormal_query_weights_are_bounded(device):
    """Weights below fp16's normal range round with up to 2⁻²⁵ absolute (2.4% here, all the same
    way): against huge features on exactly those channels, only the weight term covers it."""
    c = 64
    q = np.zeros((2, 2, c), np.float32)
    q[0, 0, 0], q[0, 0, 1:] = 1.0, 20.5 * 2.0**-24  # halfway between two fp16 subnormals
    x = np.zeros((3, 2, 2, c), np.float16)
    x[0, 0, 0, 1:] = 60000
    x[1, 0, 0] = 1
    x[2] = 0.5
    mask = np.zeros((2, 2), np.float32)
    mask[0, 0] = 1
    rq = RegionQuery.create(q, mask)
    geometry, plan = QueryGeometry.create(rq, (2, 2)), QueryPlan("cells")
    dev = torch.device(device)
    scorer, bound = Scorer.fast(geometry, plan, dev), FastBound.create(rq, geometry, plan, device=dev)
    assert bound.weight_error > 0
    t = torch.from_numpy(x).to(device)
    wnorm = scorer.window_norms(torch.linalg.vector_norm(t.float(), dim=-1).square())
    upper = (
        bound.upper(scorer.scores(t, wnorm), wnorm, nonnegative=True).permute(2, 0, 1).double().cpu().numpy()
    )
    assert (every_placement(x, q, mask) <= upper).all()


def test_an_overflow_to_nan_is_re_scored(device):
    """+inf and −inf outputs in one window make a NaN fast score; its image must still be found
    (fp16 outputs: on a CPU)."""
    c = 64
    x = np.zeros((6, 1, 2, c), np.float16)
    x[0, 0, 0], x[0, 0, 1] = 1.0, 0.02  # the query
    x[1, 0, 0], x[1, 0, 1] = 65000, -65000  # +inf + −inf in fp16 products: NaN
    x[2:] = np.random.default_rng(0).uniform(0, 1, (4, 1, 2, c))
    mask = np.ones((1, 2), np.float32)
    ref = every_placement(x, x[0].astype(np.float32), mask).reshape(6, -1).max(1)
    ref[0] = -np.inf
    assert np.argmax(ref) == 1
    result = search_regions(x, 0, mask, k=3, exclude=0, device=device)
    assert result.top["index"].tolist() == np.argsort(-ref, kind="stable")[:3].tolist()


def test_a_placement_overflowing_to_minus_inf_is_re_scored(device):
    """One window's output below −65504 makes that placement's fast score −inf while its exact
    score is the best of the dataset; the image's other placement is finite and low (fp16 outputs:
    on a CPU)."""
    x = np.zeros((7, 2, 3, 2), np.float16)
    x[0] = 1  # the query: ones
    x[1, :, :2] = 30000
    x[1, 0, 0] = -40000  # 2 × −40000 → −inf in fp16; the window still sums to +100000
    x[1, :, 2] = -30000  # the other placement scores 0
    x[2:] = np.array([1, -0.6], np.float16) + np.random.default_rng(1).uniform(
        0, 0.01, (5, 2, 3, 2)
    )  # ≈ 0.24
    mask = np.zeros((2, 3), np.float32)
    mask[:, :2] = 1
    ref = every_placement(x, x[0].astype(np.float32), mask).reshape(7, -1).max(1)
    ref[0] = -np.inf
    assert np.argmax(ref) == 1 and ref[1] > 0.3 > ref[2:].max()
    result = search_regions(x, 0, mask, k=3, exclude=0, device=device)
    assert result.top["index"].iloc[0] == 1
    np.testing.assert_allclose(result.top["score"], np.sort(ref)[::-1][:3], atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["cells", "band", "pairs"])
def test_the_weight_term_is_every_weights_rounding_beyond_its_unit_roundoff(method, dtype):
    """`FastBound.create` converts only the weights below the rounding type's normal range: its
    weight term must equal the one over every weight (the definition), on weights spread from 1
    down to fp32's subnormals (some in each type's subnormal range)."""
    lib = library()
    if method == "pairs" and (lib is None or dtype not in lib.dtypes):
        pytest.skip(f"the pairs kernel is not built for {dtype} here")
    rng = np.random.default_rng(7)
    c = 40
    q = (rng.standard_normal((4, 5, c)) * 10.0 ** rng.uniform(-44, 0, (4, 5, c))).astype(np.float32)
    mask = rng.uniform(0.2, 1, (4, 5)).astype(np.float32)  # m² q: not a value of the query's type
    rq = RegionQuery.create(q, mask)
    geometry, plan = QueryGeometry.create(rq, (4, 5)), QueryPlan(method)
    bound = FastBound.create(rq, geometry, plan, dtype, torch.device("cpu"))
    pairs = method == "pairs"
    rounding = torch.float32 if pairs and dtype == torch.float16 else dtype
    w = geometry.kernel.reshape(-1, c)
    err = (w - (kernel_weights(w, dtype) if pairs else w.to(dtype)).double()).abs()
    beyond = torch.where(err > torch.finfo(rounding).eps / 2 * w.abs(), err, 0)
    err2 = beyond.square().sum(1).numpy().reshape(rq.mask.weights.shape)
    m = rq.mask.weights.astype(np.float64)
    expected = 1.01 * float(np.sqrt((err2[m > 0] / m[m > 0] ** 2).sum())) / geometry.qnorm
    assert expected > 0  # some weights round beyond their unit roundoff in every type here
    assert bound.weight_error == pytest.approx(expected, rel=1e-9, abs=0)  # tiny for bf16 and fp32
