"""The score of a masked query region at every placement in a batch of images, two ways.

score(d, p) = Σ_k m_k² ⟨f_q(k), f_d(p+k)⟩ / (‖q‖ · sqrt(Σ_k m_k² ‖f_d(p+k)‖²))

Five exact forms of the numerator, chosen per query by their cost (see `plan_query`):
- "cells": one product of the chunk's cells (n·h·w × C) with the K masked query cells, then a
  shift-and-add over the K offsets;
- "band": per data row, one product of that row of every image (n × w·C, a strided view, no
  copy) with each mask row that can land on it, placed at each horizontal placement (zeros
  elsewhere), then an add per mask row;
- "pairs" (CPU, `vfs.kernel`): per image, a dot product for each (data cell, query cell) pair
  some placement uses, and nothing else, by a kernel compiled for the machine — which also scores
  and bounds each image's placements as it sums them (`Scorer.best_placements`);
- "whole": a region as large as the grid has one placement: one matrix-vector product of the
  images as rows (n × h·w·C, contiguous) with the whole kernel — torch's gemv runs it at the
  read speed in fp16 and bf16 on every CPU (h strided products of the band form: 1.7–2.5× slower);
- "whole_cells" (GPU): one placement as h·w batched products, one per grid cell, each summing C
  terms, then a sum over the cells: the bound of C-term sums (≈ 1e-3) where one product of h·w·C
  terms has Higham's (h·w·C)·2⁻²⁴ (1.2% at 14×14×1024: a quarter of the images re-scored).
On CUDA the products run as Triton kernels where they build (`vfs.triton_products`: at the read
speed, where cuBLAS's skinny products ran at 40–80% of it), else as torch's.
The fast scorer runs fp16, bf16 or fp32 operands with fp32 sums, with a proven bound on each placement's
error (`FastBound`); the exact one runs float64 (`exact_scorer`). `vfs.search` ranks with both.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property, partial

import numpy as np
import torch

from . import triton_products
from .kernel import PairKernel, kernel_setting, kernel_weights, library, summation_depth
from .masks import CroppedMask, crop_mask, grid_mask_values

_U32 = 2.0**-24  # unit roundoff of fp32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative rounding of a value in `dtype`'s normal range: 2⁻¹¹ for fp16, 2⁻⁸ for bf16."""
    return torch.finfo(dtype).eps / 2


def subnormal_rounding(dtype: torch.dtype) -> float:
    """Absolute rounding of a value below `dtype`'s normal range: 2⁻²⁵ for fp16, 2⁻¹³⁴ for bf16."""
    return torch.finfo(dtype).smallest_normal * unit_roundoff(dtype)


def fast_score_error(
    terms: int, dtype: torch.dtype = torch.float16, output: torch.dtype | None = None
) -> float:
    """Relative error of a fast score's parts: rounding to the operand type of the weights, of each
    product's output (to `output`, by default the operand type) and — for bf16 operands, which
    round the stored fp16 features (fp16 and fp32 hold them exactly) — of the features (against
    Σ|terms| each), and fp32 sums of `terms` values in any order (at most (terms − 1)·2⁻²⁴ of the
    sum of their sizes, Higham's bound), with a 5% margin."""
    u = unit_roundoff(dtype)
    features = u if dtype == torch.bfloat16 else 0.0
    return 1.05 * (u + unit_roundoff(output or dtype) + features + terms * _U32)


@dataclass(frozen=True)
class ProductCost:
    """What a device's products in one operand type cost, relative to the cells form's one product:
    how many multiply-adds per cell read cost as much as reading it, the band form's fixed cost (h
    strided products per chunk rather than one), and the cost of each product row as that many
    values read (short rows, e.g. the 192 channels of a cells-form row, run below the read speed)."""

    free: float
    band_fixed: float
    per_row: float = 0.0


_PRODUCT_COST = {  # measured in docs/performance.md ("Per ISA")
    ("cpu", torch.float16): ProductCost(15.0, 1.13),
    ("cpu", torch.bfloat16): ProductCost(20.0, 1.05, 95.0),  # 192-channel rows: ~60% of 2048's speed
    ("cpu", torch.float32): ProductCost(15.0, 1.13),  # not measured apart from fp16
    ("cuda", torch.float16): ProductCost(120.0, 1.25),  # H200, bench/forms_bench.py
    ("mps", torch.float16): ProductCost(32.0, 1.1),
}
_WHOLE_MAX_TERMS = 1 << 14
"""The "whole" form's gemv sums h·w·C terms, a bound of (h·w·C)·2⁻²⁴: past 2¹⁴ terms that is more
than its fp16 output's rounding, and where whole-grid scores pack (synthetic features, N = 2,000,
no kernel, Zen 4) it re-scored 443–1,998 images: 187–574 ms against the band form's 50–86 ms at
14×14×768/1024, 34–79 against 29–32 at 7×7×2048. At 7×7×192 (the embedded model) it stays:
14 ms against 28 on the real cache (docs/performance.md)."""
# Exact re-scoring runs on a few images, where the count of products matters more than their
# multiply-adds: the cells form (one product) unless it does over this many times the band
# form's work (measured on 10 images, docs/performance.md).
_EXACT_BAND_FACTOR = 4


FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FastOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""A fast pass's per-image results: best score, its placement (py·pw + px), the largest upper bound
over the placements and the largest over the other placements."""
_FAST_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in FAST_DTYPES}
_FAST_DTYPE_GAIN = 2.0
"""With `VFS_FAST_DTYPE=auto`, another operand type than fp16 is chosen only where its product runs
this many times faster: a copy in another type is a second copy of the features (fp32: twice their
size) and a bf16 bound is 2⁵ wider (more images need an fp16 pass after it). oneDNN's bf16
against fp16 without AVX512-FP16 / AMX is 3–5×. The pairs kernel's bf16 run is no candidate (see
`fast_dtype`)."""


def _cpu_product_times(channels: int) -> dict[tuple[torch.dtype, str], float]:
    """Seconds of one search-shaped product per (operand type, form), best of 4 rounds after a first
    that builds the kernels, every candidate once per round (a slow spell of a shared machine then
    slows them alike, not one type's five runs): oneDNN's cells-form product — ≈ 16,000 cells of
    `channels` channels (rounded up to a power of two from 64 to 4,096: one timing per range; 16 Mi
    values) by the 9 cells of a 3×3 region — in fp16, bf16 and fp32, and the pairs kernel on the same cells
    (images of 7×7) where it is built for that type."""
    return _product_times(min(4096, max(64, 1 << (channels - 1).bit_length())))


@cache
def _product_times(channels: int) -> dict[tuple[torch.dtype, str], float]:
    times: dict[tuple[torch.dtype, str], float] = {}
    x = torch.full((max(2, 16384 * 1024 // (49 * channels)), 7, 7, channels), 0.25)
    w = torch.full((9, channels), 0.5, dtype=torch.float64)
    cells = tuple((y, x_) for y in range(3) for x_ in range(3))
    lib = library()
    runs: dict[tuple[torch.dtype, str], Callable[[], object]] = {}
    for dtype in FAST_DTYPES:
        xd, wd = x.to(dtype), w.to(dtype)
        runs[dtype, "onednn"] = partial(torch.matmul, wd, xd.view(-1, channels).T)
        if lib is not None and dtype in lib.dtypes:
            pairs = PairKernel.create(lib, dtype, w, cells, (7, 7), (5, 5))
            runs[dtype, "pairs"] = partial(pairs.numerator, [xd])
    for round_ in range(5):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                times[key] = min(times.get(key, math.inf), time.perf_counter() - start)
    return times


def uses_pairs(device: torch.device, dtype: torch.dtype, channels: int, placements: int = 2) -> bool:
    """Whether fast scores in `dtype` on `device` run the compiled pairs kernel (`vfs.kernel`), by
    `VFS_KERNEL`: `auto` (the default) where it is built for that type and its search-shaped run
    at this channel count beats oneDNN's product (`_cpu_product_times`: it does only the
    multiply-adds of the pairs, but with AMX oneDNN may still win) — and for a query of one
    placement wherever it is built (torch's gemv sums h·w·C terms in an order of its own:
    Higham's bound over all of them, ~1% on 14×14×1024, against ~C/16 + K roundings in the
    kernel's); `on` wherever it is built; `off` never."""
    choice = kernel_setting()
    if choice == "off" or device.type != "cpu":
        return False  # before `library()`: a GPU's search never compiles the CPU's kernel
    lib = library()
    if lib is None or dtype not in lib.dtypes:
        return False
    if choice == "on" or placements == 1:
        return True
    times = _cpu_product_times(channels)
    return times[dtype, "pairs"] < times[dtype, "onednn"]


@cache
def fast_dtype(device: torch.device, channels: int = 1024) -> torch.dtype:
    """The operand type of a prepared source's fast products on `device` for features of
    `channels` channels, chosen once per process and channel count by `VFS_FAST_DTYPE`: `auto`
    (the default) — on a CPU, the type whose fastest search-shaped product (oneDNN's or the pairs
    kernel's for fp16, oneDNN's for the others, `_cpu_product_times`) beats fp16's by
    `_FAST_DTYPE_GAIN`×, else fp16 (Zen 4 with the kernel: fp16; without a compiler bf16 on AVX512-BF16 CPUs
    without AVX512-FP16 / AMX, and fp32 where MKL's fp32 products win, e.g. AVX2 —
    docs/performance.md); or `float16` (features as stored, the only choice on GPUs), `bfloat16`,
    `float32`. The top-k is exact either way; other images' scores keep the chosen type's fast
    error (fp16 ≈ 0.1%, fp32 and the fp16 pairs kernel less, bf16 ≈ 1.2% of the score at most)."""
    choice = os.environ.get("VFS_FAST_DTYPE", "auto")
    if choice not in (*_FAST_DTYPES_BY_NAME, "auto"):
        raise ValueError(f"VFS_FAST_DTYPE={choice!r}: expected auto, {', '.join(_FAST_DTYPES_BY_NAME)}")
    if device.type != "cpu" or choice == "float16":
        return torch.float16  # GPUs run fp16 products at their memory speed, with fp32 outputs
    if choice != "auto":
        return _FAST_DTYPES_BY_NAME[choice]
    times = _cpu_product_times(channels)
    # The kernel's bf16 run is not a candidate against its fp16 run: one bf16 dot-product
    # instruction does two fp32 multiply-adds, so its gain is near 2× at best (1.2–1.7× measured on
    # a quiet Zen 4), the threshold itself. It won by noisy timings (a build beside the search:
    # 1.3–5.3 ms against the fp16 run's 1.5–6.1, from one process to the next) and then cost a
    # second, bf16 copy of every searched source for searches no faster.
    best = {
        d: min(t for (dt, form), t in times.items() if dt == d and (form != "pairs" or d == torch.float16))
        for d in FAST_DTYPES
    }
    fastest = min(best, key=best.__getitem__)
    return fastest if best[torch.float16] > _FAST_DTYPE_GAIN * best[fastest] else torch.float16


@dataclass(frozen=True)
class RegionQuery:
    """A query prepared once: the cropped soft mask and the weighted query cells."""

    features: np.ndarray  # (h, w, C) float32, the query image's feature map
    mask: CroppedMask

    @classmethod
    def create(cls, features: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> RegionQuery:
        if isinstance(features, np.ndarray):  # a flipped view has negative strides: no tensor views it
            features = np.ascontiguousarray(features)
        f = torch.as_tensor(features).detach().to(torch.float32).cpu().numpy()  # faster than numpy's fp16
        if f.ndim != 3:
            raise ValueError(f"query features must be (h, w, C); got shape {f.shape}")
        mask = grid_mask_values(mask, f.shape[:2])
        if not np.isfinite(f).all():
            raise ValueError("the query features contain NaN or inf")
        q = cls(f, crop_mask(mask))
        if q.norm <= 0:
            raise ValueError(
                "the query region's features are all zero: nothing to compare (try another region or layer)"
            )
        return q

    def __repr__(self) -> str:  # not the feature map: a notebook would print pages of it
        (h, w, c), (mh, mw) = self.features.shape, self.mask.shape
        return f"RegionQuery({mh}×{mw} cells at {self.mask.origin} of an {h}×{w}×{c} feature map)"

    @cached_property
    def kernel(self) -> np.ndarray:
        """(mh, mw, C) float64: m² ⊙ query features inside the box (zero where m = 0), exact."""
        y0, x0, y1, x1 = self.mask.query_box()
        return self.mask.weights.astype(np.float64)[..., None] ** 2 * self.features[y0:y1, x0:x1]

    @cached_property
    def norm(self) -> float:
        y0, x0, y1, x1 = self.mask.query_box()
        box = self.features[y0:y1, x0:x1].astype(np.float64)
        return float(np.sqrt((self.mask.weights.astype(np.float64) ** 2 * (box**2).sum(-1)).sum()))

    def placements(self, grid: tuple[int, int]) -> tuple[int, int]:
        (h, w), (mh, mw) = grid, self.mask.shape
        if mh > h or mw > w:
            raise ValueError(f"the region ({mh}×{mw} cells) does not fit the dataset's {h}×{w} grid")
        return h - mh + 1, w - mw + 1


@dataclass(frozen=True)
class QueryPlan:
    """Which form a scorer runs."""

    method: str  # "cells" | "band" | "pairs" | "whole" | "whole_cells"


@dataclass(frozen=True)
class QueryGeometry:
    """A query's placements on a grid and its float64 kernel: prepared once per search, shared by
    the fast scorer and the exact one."""

    grid: tuple[int, int]
    ph: int
    pw: int
    mh: int
    mw: int
    cells: tuple[tuple[int, int], ...]  # the masked cells (y, x) of the cropped mask
    m2: tuple[float, ...]  # their squared weights
    band: tuple[range, ...]  # per data row y: the mask rows that can land on it
    kernel: torch.Tensor  # (mh, mw, C) float64, m² ⊙ query features × scale (exact)
    scale: float  # a power of two, to a largest kernel value in (½, 1]
    qnorm: float  # the query's norm × scale

    @classmethod
    def create(cls, query: RegionQuery, grid: tuple[int, int]) -> QueryGeometry:
        ph, pw = query.placements(grid)
        mh, mw = query.mask.shape
        weights = query.mask.weights
        # Scaled by a power of two (exact) to a largest weight in (½, 1]: the fp16 weights keep full
        # precision down to 2⁻¹⁴ of it, with room before the outputs overflow.
        scale = 2.0 ** -math.ceil(math.log2(float(np.abs(query.kernel).max())))
        ys, xs = np.nonzero(weights > 0)  # in arrays: a whole-grid region has 49–196 cells
        return cls(
            grid=grid,
            ph=ph,
            pw=pw,
            mh=mh,
            mw=mw,
            cells=tuple(zip(ys.tolist(), xs.tolist())),
            m2=tuple(w**2 for w in weights[ys, xs].tolist()),  # Python floats squared, as ever
            band=tuple(range(max(0, y - ph + 1), min(mh, y + 1)) for y in range(grid[0])),
            kernel=torch.from_numpy(query.kernel * scale),
            scale=scale,
            qnorm=query.norm * scale,
        )

    @property
    def channels(self) -> int:
        return self.kernel.shape[-1]

    def weights(self, method: str) -> list[torch.Tensor]:
        """The float64 weights of a form, on the left of each product (oneDNN's fp16 product runs
        faster so). Cells: the K masked query cells (K, C). Band, per data row y: one column per
        (mask row that lands on y, horizontal placement), the mask row's kernel at its placement
        in an otherwise zero row of w·C — adding the zeros is exact, so a column still sums mw·C terms.
        Whole: the kernel as one (1, h·w·C) row (one placement: the region spans the grid);
        whole_cells: as (h·w, 1, C), a row per grid cell."""
        c = self.channels
        if method == "whole":
            return [self.kernel.reshape(1, -1)]
        if method == "whole_cells":
            return [self.kernel.reshape(-1, 1, c)]
        if method == "cells":
            ky, kx = np.array(self.cells).T  # numpy's gather: a third of torch's with index lists
            return [torch.from_numpy(self.kernel.numpy()[ky, kx])]
        placed = torch.zeros(self.mh, self.pw, self.grid[1] * c, dtype=torch.float64)
        for px in range(self.pw):
            placed[:, px, px * c : (px + self.mw) * c] = self.kernel.reshape(self.mh, self.mw * c)
        return [placed[r.start : r.stop].reshape(-1, self.grid[1] * c) for r in self.band]


def plan_query(
    query: RegionQuery, grid: tuple[int, int], device: torch.device, dtype: torch.dtype = torch.float16
) -> QueryPlan:
    """Pick the cheaper form for operands in `dtype`. Both read every cell once; cost = a fixed part
    + the multiply-adds per cell read over what the device does at no extra cost (on CPU, oneDNN
    packs its operand first, then pays per column) + a cost per product row (measured in
    docs/performance.md). A region as large as the grid is one matrix-vector product ("whole")
    where its sum's bound stays within the output's rounding, else on a GPU one product per grid
    cell ("whole_cells") and elsewhere the band form. The compiled kernel's "pairs" form runs
    instead where `uses_pairs` says so."""
    (h, w), c = grid, query.features.shape[-1]
    ph, pw = query.placements(grid)
    if uses_pairs(device, dtype, c, ph * pw):
        return QueryPlan("pairs")
    if ph == pw == 1 and device.type == "cuda":
        return QueryPlan("whole_cells")
    if ph == pw == 1 and h * w * c <= _WHOLE_MAX_TERMS:
        return QueryPlan("whole")
    cost = _PRODUCT_COST.get((device.type, dtype), _PRODUCT_COST["cpu", torch.float16])
    cells = 1 + int((query.mask.weights > 0).sum()) / cost.free + cost.per_row / c
    columns = ph * query.mask.shape[0] * pw / h  # Σ over data rows of their columns, ÷ h
    band = cost.band_fixed + columns / cost.free + cost.per_row / (w * c)
    return QueryPlan("cells" if cells <= band else "band")


def plan_exact(geometry: QueryGeometry) -> QueryPlan:
    """The form for re-scoring a few images: multiply-adds per cell read, the band form's weighed
    by `_EXACT_BAND_FACTOR` (its h products cost more than their work on few images); one product
    where there is one placement."""
    if geometry.ph == geometry.pw == 1:
        return QueryPlan("whole")
    cells = len(geometry.cells)
    band = _EXACT_BAND_FACTOR * geometry.ph * geometry.mh * geometry.pw / len(geometry.band)
    return QueryPlan("cells" if cells <= band else "band")


@cache
def _cuda_fp32_outputs(dtype: torch.dtype) -> bool:
    """Whether `dtype` products on CUDA can give fp32 outputs (`out_dtype`, torch ≥ 2.8)."""
    one = torch.ones(1, 1, 1, dtype=dtype, device="cuda")
    try:
        torch.mm(one[0], one[0], out_dtype=torch.float32)
        torch.bmm(one, one, out_dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError):
        return False
    return True


def product_output_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The type the fast forms' products output in: fp32 for fp16 and bf16 operands on CUDA —
    Triton's products (`vfs.triton_products`), or torch's where it offers `out_dtype` (no rounding
    of the outputs to the operand type, and cuBLAS adds split sums in fp32 even where
    `allow_fp16_reduced_precision_reduction` is on) — else the operand type."""
    if triton_products.runs_on(device, dtype):
        return torch.float32
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _cuda_fp32_outputs(dtype):
        return torch.float32
    return dtype


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 / fp32 operands (matrices, or batches of them), outputs in
    `product_output_dtype`; the bound assumes the backend's sums are fp32 (oneDNN's and cuBLAS's
    are; a torch too old for `out_dtype` on CUDA may add split sums in fp16). float64 operands (exact
    re-scoring) run as they are. On CUDA a matrix product runs Triton's kernel where it builds."""
    if a.ndim == 2 and triton_products.runs_on(a.device, a.dtype):
        return triton_products.rows_product(a, b.T)
    if product_output_dtype(a.device, a.dtype) != a.dtype:
        return (torch.bmm if a.ndim == 3 else torch.mm)(a, b, out_dtype=torch.float32)
    return a @ b


def _grid_norm_weights(
    geometry: QueryGeometry, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """(h·w,) the squared mask weights over the grid, on `device` once per search where the query has
    one placement: a copy from host memory inside the fast pass would wait for the GPU's queue."""
    if not geometry.ph == geometry.pw == 1:
        return None
    m2 = np.zeros(geometry.grid)
    m2[tuple(zip(*geometry.cells))] = geometry.m2
    return torch.from_numpy(m2.ravel()).to(device, dtype)


def _data_row(images: torch.Tensor, y: int) -> torch.Tensor:
    """Row y of every image as (n, w·C): a strided view, no copy."""
    return images[:, y].reshape(len(images), -1)


@dataclass(frozen=True)
class PlacementIndex:
    """Where each masked cell lands at every placement, held on a GPU (`placement_index`): the K
    shifted windows of a shift-and-add are summed there by one gather and one sum, not K strided
    adds (each ≈ 15–25 µs of the host's time to launch: most of a small search's time on an H200's
    host). A CPU keeps the adds: the gathered (K, placements, n) copy would be a fresh temporary of
    tens of MB per slice of a large cache, its page faults costing more than the adds."""

    cells: torch.Tensor  # (K·P,) long: k·h·w + the data cell (y·w + x) mask cell k covers at each placement
    grid: torch.Tensor  # (K·P,) long: the data cell alone
    m2: torch.Tensor  # (K, 1, 1) the squared mask weights, in the sums' type

    @classmethod
    def create(cls, geometry: QueryGeometry, device: torch.device, dtype: torch.dtype) -> PlacementIndex:
        (h, w), k = geometry.grid, len(geometry.cells)
        py, px = np.meshgrid(np.arange(geometry.ph), np.arange(geometry.pw), indexing="ij")
        ky, kx = np.array(geometry.cells).reshape(k, 2).T
        grid = (ky[:, None] + py.ravel()) * w + kx[:, None] + px.ravel()  # (K, P)
        cells = grid + np.arange(k)[:, None] * (h * w)
        m2 = torch.tensor(geometry.m2, dtype=dtype).view(k, 1, 1)
        return cls(
            torch.from_numpy(cells.ravel()).to(device),
            torch.from_numpy(grid.ravel()).to(device),
            m2.to(device),
        )

    def numerators(self, products: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (P, n) = Σ over the K masked cells of their (K, h, w, n) `products` at each placement."""
        return torch.sum(self._gather(products, self.cells), 0, dtype=out.dtype, out=out)

    def squared_norms(self, sq: torch.Tensor) -> torch.Tensor:
        """(P, n) Σ m² ‖f_d(p + k)‖² over the masked cells, from (h, w, n) squared norms `sq`."""
        return torch.sum(self._gather(sq, self.grid).mul_(self.m2), 0)

    def _gather(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n = values.shape[-1]
        return values.reshape(-1, n).index_select(0, index).view(len(self.m2), -1, n)


def placement_index(
    geometry: QueryGeometry, device: torch.device, dtype: torch.dtype
) -> PlacementIndex | None:
    """A `PlacementIndex` on a GPU; None elsewhere (the shift-and-adds run as strided adds)."""
    return PlacementIndex.create(geometry, device, dtype) if device.type == "cuda" else None


@dataclass(frozen=True)
class Scorer:
    """The numerator, window norms and scores of one query on one device, in one form and precision:
    weights in the features' operand type and fp32 sums (`fast`, bounded by `FastBound`), or float64
    throughout (`exact`)."""

    geometry: QueryGeometry
    plan: QueryPlan
    weights: tuple[torch.Tensor, ...]
    dtype: torch.dtype  # of the sums
    pairs: PairKernel | None = None  # the "pairs" form's kernel, with its weights
    norm_weights: torch.Tensor | None = None  # one placement: `_grid_norm_weights`
    placements: PlacementIndex | None = None  # on a GPU

    @classmethod
    def fast(
        cls,
        geometry: QueryGeometry,
        plan: QueryPlan,
        device: torch.device,
        dtype: torch.dtype = torch.float16,
    ) -> Scorer:
        """Operands in `dtype` (one of FAST_DTYPES: the features' type), sums in fp32."""
        if plan.method == "pairs":
            lib = library()
            if lib is None or dtype not in lib.dtypes:
                raise RuntimeError(f"the pairs kernel is not built for {dtype} here")
            g = geometry
            pairs = PairKernel.create(lib, dtype, g.weights("cells")[0], g.cells, g.grid, (g.ph, g.pw))
            return cls._on(device, geometry, plan, (), torch.float32, pairs)
        weights = tuple(wt.to(device, dtype) for wt in geometry.weights(plan.method))
        return cls._on(device, geometry, plan, weights, torch.float32)

    @classmethod
    def exact(cls, geometry: QueryGeometry, device: torch.device) -> Scorer:
        plan = plan_exact(geometry)
        weights = tuple(wt.to(device) for wt in geometry.weights(plan.method))
        return cls._on(device, geometry, plan, weights, torch.float64)

    @classmethod
    def _on(
        cls,
        device: torch.device,
        geometry: QueryGeometry,
        plan: QueryPlan,
        weights: tuple[torch.Tensor, ...],
        dtype: torch.dtype,
        pairs: PairKernel | None = None,
    ) -> Scorer:
        """A scorer with its query's other constants put on `device` once, in the sums' type (the
        pairs kernel takes its own)."""
        if pairs is not None:
            return cls(geometry, plan, weights, dtype, pairs)
        norm_weights = _grid_norm_weights(geometry, device, dtype)
        return cls(
            geometry, plan, weights, dtype, pairs, norm_weights, placement_index(geometry, device, dtype)
        )

    # Placement-major layout: every (Ph, Pw, n) array below keeps the images innermost, so the
    # shift-and-adds run over long contiguous rows rather than rows of Pw placements.

    def numerator(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(Ph, Pw, n) numerators of a chunk, or of consecutive pieces of one (mapped chunk files):
        one product per piece, everything after it once over the chunk."""
        g_ = self.geometry
        parts = x if isinstance(x, list) else [x]
        if self.pairs is not None:
            return self.pairs.numerator(parts)
        n, (h, w, c) = sum(len(p) for p in parts), parts[0].shape[1:]
        out = torch.zeros(g_.ph, g_.pw, n, device=parts[0].device, dtype=self.dtype)

        def product(weights: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            if len(parts) == 1:  # columns: the pieces' rows, in order
                return _matmul(weights, view(parts[0]).T)
            return torch.cat([_matmul(weights, view(p).T) for p in parts], 1)

        def images_last(g: torch.Tensor) -> torch.Tensor:
            """(k, n, ...) → (k, ..., n), same dtype: one more g at most."""
            return g.movedim(1, -1).contiguous()

        if self.plan.method == "whole":  # one placement: the images' rows as they are stored
            out[0, 0] = product(self.weights[0], lambda p: p.reshape(len(p), -1))[0]
        elif self.plan.method == "whole_cells" and triton_products.runs_on(out.device, parts[0].dtype):
            sums = [
                triton_products.cell_sums(self.weights[0].view(h * w, c), p.reshape(len(p), h * w, c))
                for p in parts
            ]
            out[0, 0] = torch.cat(sums) if len(sums) > 1 else sums[0]
        elif self.plan.method == "whole_cells":  # per piece one batched product, (h·w, 1, n): a row per cell
            cell = [_matmul(self.weights[0], p.reshape(len(p), h * w, c).permute(1, 2, 0)) for p in parts]
            torch.sum(torch.cat(cell, 2) if len(cell) > 1 else cell[0], 0, dtype=self.dtype, out=out[0])
        elif self.plan.method == "cells":
            g = images_last(product(self.weights[0], lambda p: p.reshape(-1, c)).view(-1, n, h, w))
            if self.placements is not None:
                self.placements.numerators(g, out.view(-1, n))
            else:
                for k, (ky, kx) in enumerate(g_.cells):
                    out += g[k, ky : ky + g_.ph, kx : kx + g_.pw]
        else:
            for y, rows in enumerate(g_.band):  # data row y: a strided (n, w·C) view, no copy
                g = product(self.weights[y], partial(_data_row, y=y)).view(len(rows), g_.pw, n)
                for i, ky in enumerate(rows):
                    out[y - ky] += g[i]
        return out

    def fuses(self, x: torch.Tensor | list[torch.Tensor]) -> bool:
        """Whether a chunk's fast scores, bounds and best placements are computed where its
        numerators are (`best_placements`): by the pairs kernel; the cells and whole-grid forms on a
        GPU where Triton's products run."""
        return self.pairs is not None or (
            self.plan.method in ("cells", "whole_cells")
            and self.placements is not None
            and isinstance(x, torch.Tensor)
            and triton_products.runs_on(x.device, x.dtype)
        )

    def best_placements(
        self,
        x: torch.Tensor | list[torch.Tensor],
        sqnorm: torch.Tensor,
        bound: FastBound,
        nonnegative: bool,
        out: FastOutputs,
        fill: bool = False,
    ) -> FastOutputs:
        """Per image its best fast score, that placement, the largest upper bound over its
        placements and the largest over its other placements, where `fuses(x)` (`out`, four (n,)
        tensors; see `kernel.PairKernel.best_placements`). Triton's epilogue computes no runner-up
        (∞). One placement (the whole grid): its numerators and squared norms are summed first,
        then passed as one cell. `fill`: the pairs kernel takes the squared norms, into `sqnorm`
        (`nonnegative` must then be False: the features' sign is not known)."""
        affine = bound.affine(nonnegative)
        if self.pairs is not None:
            parts = x if isinstance(x, list) else [x]
            return self.pairs.best_placements(
                parts, sqnorm, self.geometry.m2, self.geometry.qnorm, affine, out, fill
            )
        assert self.placements is not None and isinstance(x, torch.Tensor) and not fill
        out[3].fill_(math.inf)
        first = (out[0], out[1], out[2])
        n, h, w, c = x.shape
        k = len(self.geometry.cells)
        if self.plan.method == "whole_cells":
            assert self.norm_weights is not None
            numerators = triton_products.cell_sums(self.weights[0].view(h * w, c), x.reshape(n, h * w, c))
            sq = sqnorm.reshape(n, h * w) @ self.norm_weights
            triton_products.best_single_placement(
                numerators, sq, self.geometry.qnorm, affine, nonnegative, first
            )
            return out
        products = triton_products.rows_product(self.weights[0], x.reshape(-1, c)).view(k, n, h * w)
        sq = sqnorm.reshape(n, h * w).contiguous()
        cells, m2 = self.placements.grid.view(k, -1), self.placements.m2.view(k)
        triton_products.best_placements(
            products, sq, cells, m2, self.geometry.qnorm, affine, nonnegative, first
        )
        return out

    def window_norms(self, sqnorm: torch.Tensor) -> torch.Tensor:
        """(Ph, Pw, n) ‖r‖ = sqrt(Σ m² ‖f_d(p+k)‖²) of every placement, summed in fp32 or float64 (a
        convolution could run in TF32 on a GPU, outside the bound)."""
        g_ = self.geometry
        if self.norm_weights is not None:  # one placement: one matrix-vector product (not K strided adds)
            weights = self.norm_weights.to(sqnorm.device)  # where they are already: no copy
            wnorm = sqnorm.reshape(len(sqnorm), -1).to(self.dtype) @ weights
            return wnorm.sqrt_().view(1, 1, -1)
        sq = sqnorm.permute(1, 2, 0).to(self.dtype).contiguous()  # (h, w, n)
        if self.placements is not None:
            return self.placements.squared_norms(sq).view(g_.ph, g_.pw, -1).sqrt_()
        wnorm = torch.zeros(g_.ph, g_.pw, sqnorm.shape[0], device=sqnorm.device, dtype=self.dtype)
        for w2, (ky, kx) in zip(g_.m2, g_.cells):
            wnorm.add_(sq[ky : ky + g_.ph, kx : kx + g_.pw], alpha=w2)
        return wnorm.sqrt_()

    def scores(self, x: torch.Tensor | list[torch.Tensor], wnorm: torch.Tensor) -> torch.Tensor:
        """(Ph, Pw, n) cosine scores; a window whose features are all zero scores 0 (its numerator
        is exactly 0, over the smallest positive value: torch's `where` costs 10× this division)."""
        info = torch.finfo(self.dtype)
        positive = info.smallest_normal * info.eps
        return self.numerator(x).div_((wnorm * self.geometry.qnorm).clamp_min_(positive))


@dataclass(frozen=True)
class FastBound:
    """How far a fast score can be from the exact one, proven per placement (see `upper`)."""

    eps: float  # relative error of the products and sums
    weight_error: float  # subnormal weights' exact rounding, over a window (Cauchy–Schwarz)
    output_error: float  # outputs in the operand type's subnormal range, ÷ the window norm
    nonnegative_weights: bool  # the query's kernel is ≥ 0 (with ≥ 0 features: a relative bound)

    @classmethod
    def create(
        cls,
        query: RegionQuery,
        geometry: QueryGeometry,
        plan: QueryPlan,
        dtype: torch.dtype = torch.float16,
        device: torch.device | None = None,
    ) -> FastBound:
        """The bound of `Scorer.fast` with operands in `dtype` on `device` (default: outputs in
        `dtype`, as on a CPU)."""
        kernel, c, k = geometry.kernel, geometry.channels, len(geometry.cells)
        # A band column sums mw·C terms (and exact zeros); mh of them make a placement's score.
        # The pairs kernel's sums are ours: a product passes through at most `summation_depth`
        # fp32 roundings, and nothing else rounds — its fp16 features are exact in fp32 and its
        # weights fp32 (fp32's bound); with bf16 features and weights, the dot-product instruction
        # flushes subnormal inputs (the weights are flushed before) and subnormal products and
        # sums — at most 2⁻¹²⁶ each, absolute.
        pairs = plan.method == "pairs"
        if plan.method == "cells":
            terms, outputs = c, k
        elif plan.method == "band":
            terms, outputs = geometry.mw * c, geometry.mh
        elif pairs:
            terms, outputs = summation_depth(dtype, c, k), 1
        elif plan.method == "whole_cells":
            terms, outputs = c, geometry.mh * geometry.mw
        else:  # whole
            terms, outputs = geometry.mh * geometry.mw * c, 1
        rounding = torch.float32 if pairs and dtype == torch.float16 else dtype
        output = rounding if pairs or device is None else product_output_dtype(device, dtype)
        tiny = torch.finfo(torch.float32).smallest_normal if dtype == torch.bfloat16 else 2.0**-150
        flushed = 2 * k * c * tiny if pairs else 0.0
        # Weights that `rounding` cannot hold within its unit roundoff: their exact rounding error,
        # bounded over a window by Cauchy–Schwarz — a constant per query. Only those below its
        # normal range can be such (rounding to nearest errs by ≤ u·|w| above it): the rest are not
        # converted (on 49 × 2,048 weights the whole array's passes took 0.3–0.6 ms a search).
        m = query.mask.weights
        w = kernel.reshape(-1, c).numpy()
        rows, cols = np.nonzero((np.abs(w) < torch.finfo(rounding).smallest_normal) & (w != 0))
        part = torch.from_numpy(w[rows, cols])
        err = (part - (kernel_weights(part, dtype) if pairs else part.to(dtype)).double()).abs().numpy()
        beyond = np.where(err > unit_roundoff(rounding) * np.abs(w[rows, cols]), err, 0.0)
        err2 = np.bincount(rows, weights=beyond**2, minlength=len(w)).reshape(m.shape)
        weight_error = (
            1.01 * float(np.sqrt((err2[m > 0] / m[m > 0].astype(np.float64) ** 2).sum())) / geometry.qnorm
        )
        # Tensor cores (cuBLAS's fp16 / bf16 products, Triton's `tl.dot`) align and truncate rather
        # than round to nearest when they add (Fasi et al., PeerJ Comput. Sci. 7:e330, 2021): an
        # addition may lose 2⁻²³, two fp32 unit roundoffs, so a product's terms count twice there.
        truncating = device is not None and device.type == "cuda" and dtype != torch.float32 and not pairs
        products = 2 * terms if truncating else terms
        return cls(
            # The products, each cell's squared norm (C terms) and the window's (K), the shift-and-add, slack.
            eps=fast_score_error(products + c + 2 * k + outputs + 8, rounding, output),
            weight_error=weight_error,
            output_error=(outputs * subnormal_rounding(output) + flushed) / geometry.qnorm,
            nonnegative_weights=bool((w >= 0).all()),
        )

    def upper(self, scores: torch.Tensor, wnorm: torch.Tensor, nonnegative: bool) -> torch.Tensor:
        """A proven upper bound on each placement's exact score, given its fast score.

        |fast − exact| ≤ eps·Σ|terms|/(‖q‖‖r‖) + weight_error + output_error/‖r‖, and Σ|terms| is
        at most ‖q‖‖r‖ (Cauchy–Schwarz) — or, when query and features are all ≥ 0 (post-ReLU
        layers), the exact numerator itself, which makes the first part relative to the score.
        An all-zero window's numerator is exactly 0, so it gets no output error.
        """
        output_error, weight_term, scale = self.affine(nonnegative)
        tiny = (output_error / wnorm).nan_to_num_(nan=0.0, posinf=0.0)  # ∞ or NaN: ‖r‖ = 0
        upper = tiny.add_(scores).add_(weight_term)
        return upper.div_(scale) if nonnegative else upper

    def affine(self, nonnegative: bool) -> tuple[float, float, float]:
        """`upper` as (output_error, weight_term, scale): (output_error / ‖r‖ + score + weight_term)
        / scale — what the fused epilogues (the pairs kernel's, Triton's) compute per placement."""
        if nonnegative:
            return self.output_error, self.weight_error, 1 - self.eps
        return self.output_error, self.weight_error + self.eps, 1.0


ExactScore = Callable[[np.ndarray | torch.Tensor], np.ndarray]


def exact_device(device: torch.device | None) -> torch.device:
    """Where exact scores are computed: on a GPU, next to the resident features (no host round
    trip); elsewhere on the CPU (MPS has no float64)."""
    return device if device is not None and device.type == "cuda" else torch.device("cpu")


def exact_scorer(geometry: QueryGeometry, device: torch.device | None = None) -> ExactScore:
    """`exact_scores` for one query on `exact_device(device)`: float64 with the weights unrounded,
    prepared once per search for every image it re-scores."""
    device = exact_device(device)
    scorer = Scorer.exact(geometry, device)

    def score(features: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(features).to(device)
        if x.dtype != torch.float64:
            x = x.float().double()  # via fp32 (exact): 2–10× faster than fp16 → float64
        with torch.inference_mode():
            sqnorm = torch.linalg.vector_norm(x, dim=-1).square_()  # no temporary x² array
            return scorer.scores(x, scorer.window_norms(sqnorm)).permute(2, 0, 1).cpu().numpy()

    return score


def exact_scores(features: np.ndarray, query: RegionQuery) -> np.ndarray:
    """(m, Ph, Pw) scores of some images computed in float64: the definition, rounding aside."""
    return exact_scorer(QueryGeometry.create(query, features.shape[1:3]))(features)
