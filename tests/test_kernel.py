"""The compiled pairs kernel (vfs/kernel.c) against float64 sums of its definition: every operand
type it is built for, AVX2 and AVX-512 builds, channel counts off the vector width, odd image
counts, pieces of a chunk, its own thread pool; and how searches choose it (`VFS_KERNEL`)."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vfs.kernel as kernel
import vfs.scoring as scoring
from vfs.kernel import PairKernel, build, library, pair_tables
from vfs.masks import crop_mask
from vfs.scoring import (
    FastBound,
    QueryGeometry,
    RegionQuery,
    Scorer,
    _cpu_product_times,
    exact_scores,
    uses_pairs,
)
from vfs.search import _FastScoring, search_regions
from vfs.sources import ArrayFeatures

BUILT = library()
needs_kernel = pytest.mark.skipif(BUILT is None, reason="no C compiler or no AVX2+F16C+FMA here")


def reference(x: np.ndarray, weights: np.ndarray, cells, placements) -> np.ndarray:
    """(ph, pw, n) float64: Σ_k ⟨x[:, py + ky, px + kx], weights[k]⟩."""
    ph, pw = placements
    out = np.zeros((ph, pw, len(x)))
    for k, (ky, kx) in enumerate(cells):
        out += np.einsum("nyxc,c->yxn", x[:, ky : ky + ph, kx : kx + pw].astype(np.float64), weights[k])
    return out


@pytest.mark.parametrize("seed", range(20))
def test_pair_tables_list_every_pair_once_by_data_cell(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 9, size=2)
    mask = crop_mask((rng.random((h, w)) < 0.5).astype(np.float32) + np.eye(1, h * w, 0).reshape(h, w))
    mh, mw = mask.shape
    cells = tuple((int(y), int(x)) for y, x in zip(*np.nonzero(mask.weights > 0)))
    ph, pw = h - mh + 1, w - mw + 1
    start, query_cell, placement = pair_tables(cells, (h, w), (ph, pw))
    expected = sorted(
        ((py + ky) * w + px + kx, k, py * pw + px)
        for k, (ky, kx) in enumerate(cells)
        for py in range(ph)
        for px in range(pw)
    )
    got = sorted(
        (d, int(query_cell[j]), int(placement[j]))
        for d in range(h * w)
        for j in range(start[d], start[d + 1])
    )
    assert got == expected and start[-1] == len(expected)


def _case(rng, n, grid, c, region):
    h, w = grid
    x = rng.standard_normal((n, h, w, c)).astype(np.float16)
    mask = np.zeros(grid, np.float32)
    y0, x0 = rng.integers(0, h - region[0] + 1), rng.integers(0, w - region[1] + 1)
    mask[y0 : y0 + region[0], x0 : x0 + region[1]] = rng.uniform(0.2, 1, region)
    geometry = QueryGeometry.create(RegionQuery.create(x[0].astype(np.float32), mask), grid)
    return x, geometry


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "n,grid,c,region",
    [
        (7, (7, 7), 192, (3, 3)),
        (5, (4, 6), 40, (2, 3)),
        (9, (14, 14), 33, (4, 2)),
        (1, (3, 1), 2048, (2, 1)),
        (203, (5, 5), 48, (2, 2)),
    ],
)
def test_numerator_equals_float64_sums(dtype, n, grid, c, region):
    """Channel counts off the vector width (40, 33: zero-padded tails), odd image counts (the
    kernel runs four or two images at a time), a chunk in two pieces, and pieces of more images
    than the threads take at a time from their shared counter (32: kernel.c's SHARE). fp32
    features off fp16's grid by less than half its spacing: the kernel rounds them back to it."""
    if dtype not in BUILT.dtypes:
        pytest.skip("no AVX512-BF16 here")
    rng = np.random.default_rng(n * c)
    x, g = _case(rng, n, grid, c, region)
    weights = g.weights("cells")[0]
    pairs = PairKernel.create(BUILT, dtype, weights, g.cells, g.grid, (g.ph, g.pw))
    t = torch.from_numpy(x).to(dtype)
    if dtype == torch.float32:
        t *= 1 + torch.from_numpy(rng.uniform(-(2.0**-13), 2.0**-13, x.shape)).float()
        assert torch.equal(t.half(), torch.from_numpy(x)) and not torch.equal(t, t.half().float())
        t_rounded = t.half()
    else:
        t_rounded = t
    got = pairs.numerator([t[: n // 2], t[n // 2 :]] if n > 1 else [t]).double().numpy()
    operands = t_rounded.double().numpy()  # bf16, fp32: the rounded features are what it multiplies
    want = reference(operands, pairs.weights[:, :c].double().numpy(), g.cells, (g.ph, g.pw))
    scale = reference(np.abs(operands), np.abs(pairs.weights[:, :c].double().numpy()), g.cells, (g.ph, g.pw))
    # fp32 sums of K·C terms (Higham), any order
    np.testing.assert_array_less(np.abs(got - want), (len(g.cells) * c + 16) * 2.0**-24 * scale + 1e-30)


def _fast_results(fast: _FastScoring, x, sq, fill: bool = False) -> list[np.ndarray]:
    return [t.numpy() for t in fast(x, sq, fill=fill)]


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory):
    """The kernel's AVX2 + F16C build (8 lanes, no bf16), compiled once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFS_KERNEL_DIR", str(tmp_path_factory.mktemp("avx2")))
        return build(("-mavx2", "-mf16c", "-mfma", "-mno-avx512f"))


@needs_kernel
@pytest.mark.parametrize(
    "on,dtype",
    [
        ("native", torch.float16),
        ("native", torch.bfloat16),
        ("native", torch.float32),
        ("avx2", torch.float16),
        ("avx2", torch.float32),
    ],
)
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("output_error", [None, 1e-3])
@pytest.mark.parametrize(
    "grid,c,region",
    [
        ((7, 7), 192, (3, 3)),
        ((3, 40), 33, (1, 2)),
        ((5, 6), 16, (5, 6)),
        ((14, 14), 24, (8, 9)),
        ((4, 4), 16, (1, 1)),  # 16 placements: whole vectors of either build
        ((1, 17), 8, (1, 1)),  # 17: one placement in the last vector
    ],
)
def test_placements_scored_in_the_kernel_match_torchs_operators_and_bound_the_exact_scores(
    on, dtype, nonnegative, output_error, grid, c, region, avx2_build, force_form, monkeypatch
):
    """`PairKernel.best_placements` (kernel.c's `best_of`) against the torch operators it replaces
    (`Scorer.window_norms`, `scores`, `FastBound.upper`, the maxima over placements) and against
    float64 scores, on both builds: rows of placements wider than a vector (39 on the 3×40 grid),
    one placement (the 5×6 region), placements filling whole vectors and one past them, an all-zero
    and an all −0 image (score 0), images holding a NaN (at the first cell, or the last only) or an
    inf (bound ∞), tied placements (the first kept), a chunk in uneven pieces, taken by both threads;
    an output error large enough to show in the bound (it is ≈ 1e-43 for fp16)."""
    lib = BUILT if on == "native" else avx2_build
    if dtype not in lib.dtypes:
        pytest.skip(f"no {dtype} in the {on} build here")
    monkeypatch.setattr(kernel, "library", lambda: lib)
    monkeypatch.setattr(scoring, "library", lambda: lib)
    if output_error is not None:
        create = FastBound.create
        inflated = lambda *a: dataclasses.replace(create(*a), output_error=output_error)
        monkeypatch.setattr(FastBound, "create", inflated)
    rng = np.random.default_rng(c)
    feats = rng.standard_normal((100, *grid, c))
    feats = np.abs(feats) if nonnegative else feats
    feats[1] = 0
    feats[2, 0, 0, 0] = np.nan
    feats[3, -1, -1, 1] = np.inf
    feats[4] = feats[4, 0, 0]  # every cell alike: every placement ties
    feats[6] = -0.0
    feats[7, -1, -1, 0] = np.nan  # the first NaN placement is in the last vector
    feats = feats.astype(np.float16)
    mask = np.zeros(grid, np.float32)
    mask[: region[0], grid[1] - region[1] :] = rng.uniform(0.2, 1, region)
    rq = RegionQuery.create(feats[5].astype(np.float32), mask)
    geometry, cpu = QueryGeometry.create(rq, grid), torch.device("cpu")
    x16 = torch.from_numpy(feats)
    sq = torch.linalg.vector_norm(x16.float(), dim=-1).square()  # of the features as stored
    x = x16.to(dtype)
    force_form("pairs")
    pieces = [x[a:b] for a, b in [(0, 5), (5, 6), (6, 71), (71, 100)]]
    fused = _fast_results(_FastScoring(rq, geometry, cpu, nonnegative), pieces, sq)
    with monkeypatch.context() as torch_path:
        torch_path.setattr(Scorer, "fuses", lambda self, x: False)
        want = _fast_results(_FastScoring(rq, geometry, cpu, nonnegative), x, sq)
    np.testing.assert_array_equal(fused[1], want[1])  # the same placements, ties to the first
    for got, expected in zip(fused[::2] + fused[3:], want[::2] + want[3:]):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)  # NaN and ∞ where torch's are
    assert fused[0][1] == 0 and np.isfinite(fused[2][1]) and np.isinf(fused[2][2:4]).all()
    assert (fused[3] == -np.inf).all() == (geometry.ph * geometry.pw == 1)
    assert fused[0][6] == 0 and np.isnan(fused[0][7]) and fused[1][7] == want[1][7]
    finite = np.setdiff1d(np.arange(len(feats)), [2, 3, 7])
    exact = exact_scores(feats[finite], rq).reshape(len(finite), -1)
    assert (fused[2][finite] >= exact.max(1)).all()
    exact[np.arange(len(finite)), fused[1][finite]] = -np.inf
    assert (fused[3][finite] >= exact.max(1)).all()


@needs_kernel
def test_the_kernel_uses_no_wider_vectors_than_torch_dispatches_to(tmp_path):
    """`ATEN_CPU_CAPABILITY=avx2` (torch's own operators on 256-bit vectors) gives the kernel's
    AVX2 build too, on any CPU that has AVX2."""
    code = "import vfs.kernel as k; print(k.native_flags(), k.library().lanes)"
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "VFS_KERNEL_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["('-march=native',", "'-mno-avx512f')", "8"]


@needs_kernel
def test_avx2_build_and_own_thread_pool_give_the_same_sums(monkeypatch, tmp_path):
    """The AVX2 + F16C build (8 lanes, fp16 and fp32: no bf16) on this CPU, and the pool used where
    no OpenMP runtime is found in the process, sum what the native build on torch's OpenMP team
    sums."""
    monkeypatch.setenv("VFS_KERNEL_DIR", str(tmp_path))
    avx2 = build(("-mavx2", "-mf16c", "-mfma", "-mno-avx512f"))
    assert avx2 is not None and avx2.lanes == 8 and avx2.dtypes == {torch.float16, torch.float32}
    assert list(tmp_path.glob("pairs-*.so"))  # kept for the next process
    x, g = _case(np.random.default_rng(3), 11, (7, 7), 200, (3, 3))
    t = torch.from_numpy(x)
    weights = g.weights("cells")[0]
    native = PairKernel.create(BUILT, torch.float16, weights, g.cells, g.grid, (g.ph, g.pw)).numerator([t])
    on_avx2 = PairKernel.create(avx2, torch.float16, weights, g.cells, g.grid, (g.ph, g.pw))
    np.testing.assert_allclose(on_avx2.numerator([t]), native, rtol=1e-5, atol=1e-5)
    native_best = _best_placements(
        PairKernel.create(BUILT, torch.float16, weights, g.cells, g.grid, (g.ph, g.pw)), t, g
    )
    np.testing.assert_allclose(_best_placements(on_avx2, t, g), native_best, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(kernel, "openmp", lambda: None)
    np.testing.assert_allclose(on_avx2.numerator([t]), native, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_best_placements(on_avx2, t, g), native_best, rtol=1e-5, atol=1e-6)


def _best_placements(pairs: PairKernel, x: torch.Tensor, g: QueryGeometry) -> np.ndarray:
    """(4, n) the kernel's best score, placement, bound and runner-up bound of each image."""
    n = len(x)
    out = (torch.empty(n), torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n))
    sq = torch.linalg.vector_norm(x.float(), dim=-1).square()
    pairs.best_placements([x], sq, g.m2, g.qnorm, (1e-30, 1e-7 + 1e-6, 1.0), out)
    return np.stack([t.double().numpy() for t in out])


@needs_kernel
def test_many_placements_need_no_large_thread_stack():
    """The per-placement arrays of the kernel's scoring live in the heap scratch, not on a thread's
    stack: 25,600 placements (a 1×1 region on a 160×160 grid) on threads of 256 KiB stacks (musl's
    default is 128 KiB; `OMP_STACKSIZE` may be small) — 300 KiB of arrays (a review found it)."""
    code = """
import threading
threading.stack_size(256 * 1024)  # the kernel's own pool, started below, gets these stacks
import numpy as np, vfs.kernel as kernel
from vfs.search import search_regions
kernel.openmp = lambda: None
feats = np.random.default_rng(0).standard_normal((5, 160, 160, 8)).astype(np.float16)
mask = np.zeros((160, 160), np.float32)
mask[70, 90] = 1
result = search_regions(feats, 2, mask, k=1)
print(result.method, result.top["index"][0], result.placements[2])
"""
    env = os.environ | {"VFS_KERNEL": "on"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["pairs", "2", "[70", "90]"]


@needs_kernel
def test_openmp_runtime_is_torchs():
    team = kernel.openmp()
    assert team is not None and all(isinstance(a, int) and a > 0 for a in team)


def test_no_compiler_turns_the_kernel_off(monkeypatch, tmp_path):
    monkeypatch.setenv("VFS_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    assert build() is None


@needs_kernel
def test_no_writable_folder_turns_the_kernel_off(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("VFS_KERNEL_DIR", str(blocker / "vfs"))
    assert build() is None


@needs_kernel
def test_vfs_kernel_setting_decides_who_runs(monkeypatch):
    """auto: where its search-shaped run beats oneDNN's at the source's channel count, and for one
    placement (its bound is far tighter than the gemv's) wherever built; on: always; off: never
    (and a bad value is refused)."""
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((300, 7, 7, 64)), 0).astype(np.float16)
    mask = np.zeros((7, 7), np.float32)
    mask[2:5, 1:5] = 1
    times = _cpu_product_times(64)
    faster = times[torch.float16, "pairs"] < times[torch.float16, "onednn"]
    faster32 = times[torch.float32, "pairs"] < times[torch.float32, "onednn"]
    for setting, expected, whole in [
        ("off", {"cells", "band"}, "whole"),
        ("on", {"pairs"}, "pairs"),
        ("auto", {"pairs"} if faster else {"cells", "band"}, "pairs"),
    ]:
        monkeypatch.setenv("VFS_KERNEL", setting)
        assert uses_pairs(cpu, torch.float16, 64) == (setting == "on" or (setting == "auto" and faster))
        assert search_regions(ArrayFeatures(feats), 5, mask, k=5, device="cpu").method in expected
        assert search_regions(ArrayFeatures(feats), 5, np.ones((7, 7)), k=5, device="cpu").method == whole
        assert not uses_pairs(torch.device("cuda"), torch.float16, 64)
        assert uses_pairs(cpu, torch.float32, 64) == (setting == "on" or (setting == "auto" and faster32))
    monkeypatch.setenv("VFS_KERNEL", "fast")
    with pytest.raises(ValueError, match="expected auto, on, off"):
        uses_pairs(cpu, torch.float16, 64)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(
    "shape,region",
    [((19, 37, 6, 5), (3, 2)), ((6, 2048, 7, 7), (3, 3)), ((9, 16, 8, 1), (2, 1)), ((5, 3, 1, 2), (1, 2))],
)
@pytest.mark.parametrize("on", ["native", "avx2", "own-pool"])
def test_a_channels_first_view_is_read_as_its_contiguous_copy(
    dtype, shape, region, on, avx2_build, monkeypatch
):
    """kernel.c's CF16 / CF32: a permuted (N, C, h, w) array read as it is, a few images at a time
    transposed in cache, sums bit for bit what a contiguous copy's sum — channel and cell counts
    off its 8 × 8 tiles, 16 channels exactly, fewer cells than a tile, image counts off its groups
    — in both builds, on torch's team and on the pool used without one; its scores and bounds too,
    with the norms taken."""
    lib = avx2_build if on == "avx2" else BUILT
    if on == "own-pool":
        monkeypatch.setattr(kernel, "openmp", lambda: None)
    n, c, h, w = shape
    nchw = torch.randn(*shape).to(dtype)
    view = nchw.permute(0, 2, 3, 1)
    assert kernel.channels_first(view) and (not view.is_contiguous() or min(h, w, c) == 1)
    mask = np.zeros((h, w), np.float32)
    mask[: region[0], : region[1]] = 1
    g = QueryGeometry.create(RegionQuery.create(view[0].float().numpy(), mask), (h, w))
    pairs = PairKernel.create(lib, dtype, g.weights("cells")[0], g.cells, g.grid, (g.ph, g.pw))
    copy = view.contiguous()
    assert torch.equal(pairs.numerator([view[:2], view[2:]]), pairs.numerator([copy[:2], copy[2:]]))
    results = []
    for x in (view, copy):
        out = (torch.empty(n), torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n))
        taken = torch.empty(n, h, w)
        pairs.best_placements([x], taken, g.m2, g.qnorm, (1e-30, 1e-6, 1.0), out, fill=True)
        results.append([*out, taken])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(
    "shape", [(37, 2048, 7, 7), (13, 192, 7, 7), (9, 40, 3, 5), (70, 33, 1, 17), (21, 64, 4, 4)]
)
@pytest.mark.parametrize("on", ["native", "avx2", "own-pool"])
def test_a_channels_first_view_under_a_whole_grid_region_is_read_in_order(
    dtype, shape, on, avx2_build, monkeypatch
):
    """kernel.c's WCF16 / WCF32: one placement covering the grid of a permuted (N, C, h, w) array is
    one dot product per image over its memory in order, no transposition — its sums in another
    order than a contiguous copy's, within the same bound: scores and bounds as the copy's to fp32
    rounding, every upper bound above the float64 score of the features' fp16 copy, each cell's
    squared norm to fp32 rounding (a NaN or an inf found in its own cell); a soft mask with a
    hole; images off the chunk's groups, channels × cells off the vector width and the periods
    of lanes over cells (7×7, 3×5, 1×17; 4×4: a lane per cell), both builds, torch's team and the
    pool used without one."""
    lib = avx2_build if on == "avx2" else BUILT
    monkeypatch.setattr(kernel, "library", lambda: lib)
    monkeypatch.setattr(scoring, "library", lambda: lib)
    if on == "own-pool":
        monkeypatch.setattr(kernel, "openmp", lambda: None)
    n, c, h, w = shape
    rng = np.random.default_rng(c + h)
    nchw = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    nchw[1] = 0
    view = nchw.permute(0, 2, 3, 1)
    mask = rng.uniform(0.2, 1, (h, w)).astype(np.float32)
    mask[h // 2, w // 2] = 0  # a hole: that cell's weights are zero, its norm still taken
    rq = RegionQuery.create(view[5].float().numpy(), mask)
    geometry, cpu = QueryGeometry.create(rq, (h, w)), torch.device("cpu")
    assert (geometry.ph, geometry.pw) == (1, 1)
    results = []
    for x in (view, view.contiguous()):
        fast = _FastScoring(rq, geometry, cpu, None)
        taken = torch.empty(n, h, w)
        results.append((_fast_results(fast, [x[:3], x[3:]], taken, fill=True), taken))
        pairs = fast._by_dtype[dtype][0].pairs
        assert pairs is not None and pairs._whole_grid is not None
    (got, got_sq), (want, want_sq) = results
    fp16 = view.to(torch.float16).numpy()
    exact = exact_scores(fp16, rq).reshape(n)
    np.testing.assert_array_equal(got[1], 0)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got[2], want[2], rtol=2e-6, atol=1e-7)
    assert (got[2] >= exact).all() and got[0][1] == 0 and (got[3] == -np.inf).all()
    sq = np.square(fp16.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(got_sq.numpy(), sq, rtol=c * 2**-24)
    np.testing.assert_allclose(want_sq.numpy(), sq, rtol=c * 2**-24)
    nchw[2, c - 1, h - 1, w - 1] = float("nan")
    nchw[3, 0, h // 2, w // 2] = float("inf")  # in the hole
    taken = torch.empty(n, h, w)
    bad = _fast_results(_FastScoring(rq, geometry, cpu, None), view, taken, fill=True)
    taken = taken.numpy()
    assert np.isnan(taken[2, h - 1, w - 1]) and np.isinf(taken[3, h // 2, w // 2])
    assert np.isfinite(taken[2]).sum() == np.isfinite(taken[3]).sum() == h * w - 1
    np.testing.assert_array_equal(np.delete(bad[0], [2, 3]), np.delete(got[0], [2, 3]))


@needs_kernel
@pytest.mark.parametrize("c", [5, 16, 200, 2048])
@pytest.mark.parametrize("avx2", [False, True])
def test_squared_norms_and_the_sign_check_read_fp16_once(c, avx2, monkeypatch):
    """`squared_norms`: each cell's Σ x² (fp32, to its rounding) and whether every value is ≥ 0 —
    a negative value or a NaN anywhere says no, −0 does not — in the AVX2 build and the native one,
    on torch's team and on the pool used without one; the arrays' preparation takes it where built."""
    lib = build(("-mavx2", "-mf16c", "-mfma", "-mno-avx512f")) if avx2 else BUILT
    rng = np.random.default_rng(c)
    x = torch.from_numpy(np.maximum(rng.standard_normal((37, 3, 5, c)), 0).astype(np.float16))
    x[0, 0, 0, 0] = -0.0
    for team in (True, False):
        if not team:
            monkeypatch.setattr(kernel, "openmp", lambda: None)
        sq, nonnegative = kernel.squared_norms(lib, x)
        np.testing.assert_allclose(sq.double().numpy(), x.double().square().sum(-1).numpy(), rtol=c * 2e-7)
        assert nonnegative
        for bad in (-1e-3, float("nan")):
            y = x.clone()
            y[36, 2, 4, c - 1] = bad  # the last value: in a tail where c is not a multiple of the width
            assert not kernel.squared_norms(lib, y)[1]
    calls = []
    monkeypatch.setattr(kernel, "squared_norms", lambda *a, f=kernel.squared_norms: calls.append(1) or f(*a))
    prepared = ArrayFeatures(x)  # the kernel's pass
    monkeypatch.setattr(kernel, "library", lambda: None)
    blocks = ArrayFeatures(x)  # torch's blocks
    assert len(calls) == 1 and prepared.nonnegative and blocks.nonnegative
    np.testing.assert_allclose(prepared._sqnorm, blocks._sqnorm, rtol=c * 2e-7)
