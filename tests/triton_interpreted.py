"""The Triton products of CUDA searches (`vfs.triton_products`) run by Triton's interpreter on the
CPU: their sums against float64 within fp32's bound, and searches through them exact, with a bound
that holds. Triton decides at import whether to interpret, so tests/test_triton_products.py runs
this file in a process of its own with TRITON_INTERPRET=1 (not collected otherwise: not test_*)."""

import os

import numpy as np
import pytest
import torch
from search_reference import brute_force, every_placement
from test_search import MASKS, assert_exact_top_k, random_features
from test_search_bound import make

from vfs import triton_products
from vfs.scoring import (
    FastBound,
    PlacementIndex,
    QueryGeometry,
    QueryPlan,
    RegionQuery,
    Scorer,
    product_output_dtype,
)
from vfs.search import search_regions

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run by tests/test_triton_products.py, in a process that interprets Triton", allow_module_level=True
    )

U32 = 2.0**-24
pytestmark = pytest.mark.filterwarnings(  # the interpreter computes both sides of a tl.where
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)


@pytest.fixture
def interpreted(monkeypatch):
    """The search's fp16 products sent through the (interpreted) kernels, as on a GPU: the cells
    form's epilogue too (it runs where the placements are indexed)."""
    monkeypatch.setattr(triton_products, "runs_on", lambda device, dtype: dtype == torch.float16)
    monkeypatch.setattr("vfs.scoring.placement_index", PlacementIndex.create)


@pytest.mark.parametrize(
    "k,c,m,pad",
    [(9, 192, 300, 0), (1, 5, 3, 0), (70, 100, 33, 0), (15, 300, 40, 37), (16, 128, 129, 0)],
)
def test_rows_product_is_fp32_sums_of_exact_products(k, c, m, pad, interpreted):
    """Any K (past 64: column blocks side by side), C and row count off the tiles, rows strided."""
    g = torch.Generator().manual_seed(k * c + m)
    rows = torch.randn(m, c + pad, generator=g).half()[:, :c]  # pad > 0: a stride past the row
    weights = torch.randn(k, c, generator=g).half()
    out = triton_products.rows_product(weights, rows)
    assert out.shape == (k, m) and out.dtype == torch.float32
    exact = weights.double() @ rows.double().T
    size = weights.double().abs() @ rows.double().abs().T
    assert ((out.double() - exact).abs() <= c * U32 * size + 1e-30).all()


@pytest.mark.parametrize("n,cells,c", [(37, 49, 128), (5, 196, 100), (3, 1, 7), (2000, 4, 16)])
def test_cell_sums_sum_each_cell_then_the_cells_in_fp32(n, cells, c, interpreted):
    """Few images (cells split among programs) or many (one group), C off the channel block."""
    g = torch.Generator().manual_seed(n + cells)
    images = torch.randn(n, cells, c, generator=g).half()
    weights = torch.randn(cells, c, generator=g).half()
    out = triton_products.cell_sums(weights, images)
    assert out.shape == (n,) and out.dtype == torch.float32
    exact = images.reshape(n, -1).double() @ weights.reshape(-1).double()
    size = images.reshape(n, -1).double().abs() @ weights.reshape(-1).double().abs()
    assert ((out.double() - exact).abs() <= (c + cells) * U32 * size + 1e-30).all()


@pytest.mark.parametrize("grid", [(7, 7), (5, 9)])
@pytest.mark.parametrize("kind", list(MASKS))
def test_searches_through_the_kernels_keep_the_top_k_exact(grid, kind, interpreted, force_form):
    rng = np.random.default_rng([*grid, list(MASKS).index(kind)])
    h, w = grid
    feats = random_features(rng, 60, h, w, 24)
    mask = MASKS[kind](rng, h, w)
    ref, ref_where = brute_force(feats, feats[3].astype(np.float32), mask)
    spans = kind == "full grid"
    for method in ("cells", "band") + ("whole_cells",) * spans:
        force_form(method)
        assert_exact_top_k(search_regions(feats, 3, mask, k=10, device="cpu"), ref, ref_where)


@pytest.mark.parametrize("method", ["cells", "band", "whole_cells"])
@pytest.mark.parametrize("case", ["post-ReLU", "signed", "tiny features (fp16 subnormal outputs)"])
def test_the_bound_holds_through_the_kernels(method, case, interpreted):
    """fp32 outputs (as `out_dtype` gives): the bound `FastBound` proves for them holds and is tight."""
    x, mask = make(case, 1, spanning=method == "whole_cells")
    q = RegionQuery.create(x[1].astype(np.float32), mask)
    cpu = torch.device("cpu")
    assert product_output_dtype(cpu, torch.float16) == torch.float32
    geometry, plan = QueryGeometry.create(q, x.shape[1:3]), QueryPlan(method)
    scorer, bound = Scorer.fast(geometry, plan, cpu), FastBound.create(q, geometry, plan, torch.float16, cpu)
    features = torch.from_numpy(x)
    wnorm = scorer.window_norms(torch.linalg.vector_norm(features.float(), dim=-1).square())
    fast = scorer.scores(features, wnorm)
    upper = bound.upper(fast, wnorm, bound.nonnegative_weights and (x >= 0).all()).permute(2, 0, 1).double()
    exact = every_placement(x, q.features, mask)
    assert (exact <= upper.numpy()).all()
    assert (upper.numpy() - exact)[exact > 0.05].max() < 2e-2


def test_a_build_check_passes_where_the_kernels_give_float64_sums():
    """The check `runs_on` makes once per device before the search trusts the kernels."""
    assert triton_products._builds(torch.device("cpu"))


@pytest.mark.parametrize("method", ["cells", "whole_cells"])
@pytest.mark.parametrize("case", ["post-ReLU", "signed", "tiny features (fp16 subnormal outputs)"])
@pytest.mark.parametrize("seed", range(3))
def test_the_fused_epilogue_gives_what_the_operations_it_replaces_give(method, case, seed, interpreted):
    """`best_placements` against window norms, scores, bounds and max over placements as torch
    runs them (on the same products): all-zero cells included (`make` zeroes 10% of them)."""
    x, mask = make(case, seed, n=70, spanning=method == "whole_cells")
    x[69] = 0  # every window all-zero: scores 0, the first placement best
    q = RegionQuery.create(x[seed].astype(np.float32), mask)
    cpu = torch.device("cpu")
    geometry, plan = QueryGeometry.create(q, x.shape[1:3]), QueryPlan(method)
    scorer, bound = Scorer.fast(geometry, plan, cpu), FastBound.create(q, geometry, plan, torch.float16, cpu)
    features = torch.from_numpy(x)
    sq = torch.linalg.vector_norm(features.float(), dim=-1).square()
    nonnegative = bound.nonnegative_weights and bool((x >= 0).all())
    assert scorer.fuses(features)
    wnorm = scorer.window_norms(sq)
    scores = scorer.scores(features, wnorm).flatten(0, 1)
    upper = bound.upper(scores.view_as(wnorm), wnorm, nonnegative).flatten(0, 1).nan_to_num_(posinf=np.inf)
    empty = (torch.empty(70), torch.empty(70, dtype=torch.int64), torch.empty(70), torch.empty(70))
    best, where, fused_upper, runner = scorer.best_placements(features, sq, bound, nonnegative, empty)
    assert (runner == np.inf).all()  # no runner-up computed: every placement of a re-scored image
    torch.testing.assert_close(best, scores.max(0).values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused_upper, upper.amax(0), rtol=1e-6, atol=1e-7)
    picked = scores.gather(0, where[None])[0]  # the placement it names scores what it says
    torch.testing.assert_close(picked, best, rtol=1e-6, atol=1e-7)
    assert best[69] == 0 and where[69] == 0
    # the first best placement, as torch's max on the CPU (ties: all-zero windows)
    np.testing.assert_array_equal(where.numpy(), np.argmax(scores.numpy(), axis=0))
