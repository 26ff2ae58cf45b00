"""The fast pass's products on CUDA GPUs as Triton kernels: fp16 operands (the features as
stored), products exact in fp32, fp32 sums and fp32 outputs — the bound of cuBLAS's `out_dtype`
products, at the read speed.

On an H200 cuBLAS runs the cells form's product — millions of rows of C channels against the few
masked query cells — at 1.6 TB/s for C = 2048 (3.1 for 1,024), its per-cell batched products of
a whole-grid region at 3.2–3.4; these kernels run both at 4.2–4.3 TB/s, the speed of a plain sum
over the same bytes (`bench/gpu_products.py`, docs/performance.md).

The cells form's work after its product — the shift-and-add over the masked cells, the window
norms, scores, bounds and each image's best placement, ≈ 20 torch operations per slice, each a
launch costing the host 15–25 µs on an H200's — is one more kernel (`best_placements`); a
whole-grid region's, after its cell sums, the same kernel (`best_single_placement`).

Triton compiles on first use (its own compiler, and the system's C compiler for a launcher). Where
it does not import or cannot build here, or with `VFS_KERNEL=off`, `runs_on` is false and the
search runs torch's products: the same exact top-k, with the same bound.
"""

from __future__ import annotations

import logging
import math
import threading
from functools import cache
from typing import Any, NamedTuple

import torch

from .kernel import kernel_setting

log = logging.getLogger(__name__)

_ROW_BLOCK, _CHANNEL_BLOCK, _MAX_COLUMN_BLOCK = 128, 128, 64
"""Rows × channels per step of the rows kernel, and its most weight columns at once (more are run
as column blocks side by side, each over the same rows while they are in L2): 4.2–4.3 TB/s on an
H200 at 7×7×2048 and 14×14×1024, K = 9 and 14, as were 64 × 128 and 256 × 64 tiles."""
_IMAGE_BLOCK, _CELL_CHANNEL_BLOCK = 16, 256
"""Images × channels per step of the whole-grid kernel (4.3 TB/s at 14×14×1024; 3.8 at 7×7×2048,
where 32 × 128 reached 4.3); its cells are split among programs until there are `_PROGRAMS`."""
_PROGRAMS = 1024  # ≈ 8 per streaming multiprocessor of an H100 / H200
_SMALLEST = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps
"""The least positive fp32 value: `Scorer.scores` clamps its denominators to it."""
_BEST_BLOCK = 64
"""Images per program of `best_placements` (each loops over every placement and masked cell): 32
programs at N = 2,000 already, 261 in a slice of 16,667 images."""
_LOCK = threading.RLock()
"""Held while the kernels are defined, checked and launched: a launch may compile a new
specialization, and Triton's compiler is not safe to run from two threads at once (the app
searches on several)."""


class _Kernels(NamedTuple):
    rows: Any  # triton.JITFunction: (K, M) = weights · rowsᵀ
    cells: Any  # triton.JITFunction: per-cell sums over a whole grid
    best: Any  # triton.JITFunction: the cells form's shift-and-add, scores, bounds and best placement


def _kernels() -> _Kernels:
    with _LOCK:
        return _define_kernels()


@cache
def _define_kernels() -> _Kernels:
    """The kernels, defined on first use (Triton is imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_kernel(
        w_ptr,
        x_ptr,
        out_ptr,
        M,
        C,
        K,
        stride_x,
        column_blocks,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rm = (pid // column_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = (pid % column_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        rc = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + rc[None, :]
        w_ptrs = w_ptr + rk[None, :] * C + rc[:, None]
        for c0 in range(0, C, BLOCK_C):
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rc[None, :] + c0 < C), other=0.0)
            w = tl.load(w_ptrs, mask=(rk[None, :] < K) & (rc[:, None] + c0 < C), other=0.0)
            acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_C
            w_ptrs += BLOCK_C
        out = out_ptr + rk[None, :].to(tl.int64) * M + rm[:, None]
        tl.store(out, acc, mask=(rk[None, :] < K) & (rm[:, None] < M))

    @triton.jit
    def cells_kernel(
        w_ptr,
        x_ptr,
        out_ptr,
        N,
        CELLS,
        C,
        stride_x,
        cells_per_program,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        first = tl.program_id(1) * cells_per_program
        rc = tl.arange(0, BLOCK_C)
        row = rn[:, None].to(tl.int64) * stride_x
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in range(first, tl.minimum(first + cells_per_program, CELLS)):
            cell = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                inside = rc + c0 < C
                x = tl.load(
                    x_ptr + row + p * C + c0 + rc[None, :],
                    mask=(rn[:, None] < N) & inside[None, :],
                    other=0.0,
                )
                w = tl.load(w_ptr + p * C + c0 + rc, mask=inside, other=0.0)
                cell += tl.sum(x.to(tl.float32) * w.to(tl.float32)[None, :], axis=1)
            total += cell
        tl.store(out_ptr + tl.program_id(1).to(tl.int64) * N + rn, total, mask=rn < N)

    @triton.jit
    def best_kernel(
        g_ptr,
        sq_ptr,
        cell_ptr,
        m2_ptr,
        best_ptr,
        where_ptr,
        upper_ptr,
        N,
        HW,
        K,
        P,
        qnorm,
        smallest,
        output_error,
        weight_error,
        scale,
        NONNEGATIVE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Python floats arrive as fp32 (fp64 when interpreted)
        qnorm, smallest = tl.cast(qnorm, tl.float32), tl.cast(smallest, tl.float32)
        output_error = tl.cast(output_error, tl.float32)
        weight_error, scale = tl.cast(weight_error, tl.float32), tl.cast(scale, tl.float32)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = rn < N
        image = rn.to(tl.int64) * HW
        plane = tl.cast(N, tl.int64) * HW  # N = 1 arrives as a constant, not a tensor
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        where = tl.zeros((BLOCK_N,), tl.int64)
        upper = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        for p in range(0, P):
            num = tl.zeros((BLOCK_N,), tl.float32)
            wn2 = tl.zeros((BLOCK_N,), tl.float32)
            for k in range(0, K):
                cell = tl.load(cell_ptr + k * P + p)
                num += tl.load(g_ptr + k * plane + image + cell, mask=inside, other=0.0)
                wn2 += tl.load(m2_ptr + k) * tl.load(sq_ptr + image + cell, mask=inside, other=0.0)
            wn = tl.sqrt_rn(wn2)
            # as `Scorer.scores`: an all-zero window's numerator (exactly 0) over the smallest value
            score = tl.math.div_rn(num, tl.maximum(wn * qnorm, smallest))
            tiny = tl.where(wn > 0, tl.math.div_rn(output_error, wn), 0.0)
            if NONNEGATIVE:
                up = tl.math.div_rn(tiny + score + weight_error, scale)
            else:
                up = tiny + score + weight_error
            up = tl.where((up == up) & (up < float("inf")) & (up > float("-inf")), up, float("inf"))
            better = (score > best) | ((score != score) & (best == best))
            best = tl.where(better, score, best)
            where = tl.where(better, p, where)
            upper = tl.maximum(upper, up)
        tl.store(best_ptr + rn, best, mask=inside)
        tl.store(where_ptr + rn, where, mask=inside)
        tl.store(upper_ptr + rn, upper, mask=inside)

    return _Kernels(rows_kernel, cells_kernel, best_kernel)


def rows_product(
    weights: torch.Tensor,
    rows: torch.Tensor,
    *,
    row_block: int = _ROW_BLOCK,
    channel_block: int = _CHANNEL_BLOCK,
    warps: int = 4,
    stages: int = 3,
) -> torch.Tensor:
    """(K, M) fp32 `weights` (K, C) · `rows` (M, C)ᵀ, each output a sum of C products in fp32 (any
    order). `rows` may be strided between rows (a data row of every image), not within one. The
    tiles are keywords for bench/gpu_products.py, which measures others."""
    k, c = weights.shape
    m = rows.shape[0]
    if rows.shape[1] != c:
        raise ValueError(f"weights have {c} channels, rows {rows.shape[1]}")
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    block_k = min(_MAX_COLUMN_BLOCK, max(16, 1 << (k - 1).bit_length()))
    column_blocks = math.ceil(k / block_k)
    out = torch.empty(k, m, dtype=torch.float32, device=rows.device)
    if m:
        grid = (math.ceil(m / row_block) * column_blocks,)
        with _LOCK:
            _kernels().rows[grid](
                weights.contiguous(),
                rows,
                out,
                m,
                c,
                k,
                rows.stride(0),
                column_blocks,
                BLOCK_M=row_block,
                BLOCK_C=channel_block,
                BLOCK_K=block_k,
                num_warps=warps,
                num_stages=stages,
            )
    return out


def cell_sums(
    weights: torch.Tensor,
    images: torch.Tensor,
    *,
    image_block: int = _IMAGE_BLOCK,
    channel_block: int = _CELL_CHANNEL_BLOCK,
    warps: int = 4,
    stages: int = 3,
) -> torch.Tensor:
    """(n,) fp32 Σ over the h·w cells of ⟨weights[cell], images[:, cell]⟩ for `weights` (h·w, C)
    and `images` (n, h·w, C) (rows of images may be strided): each cell's C products summed in fp32,
    then the cells' sums in fp32 — the whole-grid form's bound (C terms, h·w outputs)."""
    n, cells, c = images.shape
    if weights.shape != (cells, c):
        raise ValueError(f"weights of shape {tuple(weights.shape)} for images of {cells} cells × {c}")
    if images.stride(2) != 1 or images.stride(1) != c:
        images = images.contiguous()
    image_blocks = max(1, math.ceil(n / image_block))
    groups = min(cells, max(1, _PROGRAMS // image_blocks))
    per_group = math.ceil(cells / groups)
    groups = math.ceil(cells / per_group)
    partial = torch.empty(groups, n, dtype=torch.float32, device=images.device)
    if n:
        with _LOCK:
            _kernels().cells[(image_blocks, groups)](
                weights.contiguous(),
                images,
                partial,
                n,
                cells,
                c,
                images.stride(0),
                per_group,
                BLOCK_N=image_block,
                BLOCK_C=channel_block,
                num_warps=warps,
                num_stages=stages,
            )
    return partial[0] if groups == 1 else partial.sum(0)


def best_placements(
    products: torch.Tensor,
    sqnorm: torch.Tensor,
    cells: torch.Tensor,
    m2: torch.Tensor,
    qnorm: float,
    affine: tuple[float, float, float],
    nonnegative: bool,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    image_block: int = _BEST_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cells form's work after its product, in one pass: for each image its best fast score,
    that placement's index and the largest upper bound over its placements (`out`: fp32, int64,
    fp32, each (n,)) — what `Scorer.scores`, `FastBound.upper` and a max over the placements give
    in ≈ 20 operations, each a launch and a pass. `products` (K, n, h·w) fp32 are the masked cells'
    products with every cell, `sqnorm` (n, h·w) fp32 the cells' squared norms, `cells` (K, P) the
    data cell each masked cell covers at each placement, `m2` (K,) fp32 the squared mask weights,
    `affine` the bound's (output_error, weight_term, scale) (`FastBound.affine`; `nonnegative` its
    form). Sums of K values in fp32 as in the strided adds; divisions and square roots rounded to
    nearest as torch's."""
    k, n, hw = products.shape
    output_error, weight_term, scale = affine
    best, where, upper = out
    if n:
        with _LOCK:
            _kernels().best[(math.ceil(n / image_block),)](
                products,
                sqnorm,
                cells,
                m2,
                best,
                where,
                upper,
                n,
                hw,
                k,
                cells.shape[1],
                qnorm,
                _SMALLEST,
                output_error,
                weight_term,
                scale,
                NONNEGATIVE=nonnegative,
                BLOCK_N=image_block,
                num_warps=2,
            )
    return best, where, upper


def best_single_placement(
    numerators: torch.Tensor,
    squared_norms: torch.Tensor,
    qnorm: float,
    affine: tuple[float, float, float],
    nonnegative: bool,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`best_placements` of a query with one placement (a region spanning the grid), from its
    (n,) numerators and (n,) squared window norms, both fp32: passed as one cell of weight 1."""
    n = len(numerators)
    cells, m2 = _one_cell(numerators.device)
    return best_placements(
        numerators.view(1, n, 1), squared_norms.view(n, 1), cells, m2, qnorm, affine, nonnegative, out
    )


@cache
def _one_cell(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell table (1, 1) and weight (1,) of `best_single_placement`, made once per device."""
    return torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, device=device)


def _builds(device: torch.device) -> bool:
    with _LOCK:
        return _checked(device)


@cache
def _checked(device: torch.device) -> bool:
    """Whether the kernels import, compile and give float64's sums here: with the largest tiles a
    search uses (a GPU with less shared memory fails here, not in a search) and the smallest, on
    channel counts that are and are not multiples of 16 (Triton compiles each case apart)."""
    try:
        g = torch.Generator().manual_seed(0)
        ok = True
        for k, c in ((_MAX_COLUMN_BLOCK, 40), (9, 48)):
            w = torch.randn(k, c, generator=g).half()
            x = torch.randn(5, 2, c, generator=g).half()
            rows = rows_product(w.to(device), x.reshape(-1, c).to(device)).cpu()
            cells = cell_sums(w[:2].to(device), x.to(device)).cpu()
            exact_rows = (w.double() @ x.reshape(-1, c).double().T).float()
            exact_cells = (x.reshape(5, -1).double() @ w[:2].reshape(-1).double()).float()
            ok = ok and torch.allclose(rows, exact_rows, rtol=1e-5, atol=1e-5)
            ok = ok and torch.allclose(cells, exact_cells, rtol=1e-5, atol=1e-5)
        # the epilogue: every placement of 2 unit cells (m² = 1) in unit windows scores 2/√2; for
        # 3 images and for 1 (Triton compiles an argument equal to 1 as a constant)
        for n in (3, 1):
            out = (
                torch.empty(n, device=device),
                torch.empty(n, dtype=torch.int64, device=device),
                torch.empty(n, device=device),
            )
            ones = torch.ones(2, n, 4, device=device)
            cells_at = torch.tensor([[0, 1], [1, 2]], device=device)
            best, where, upper = best_placements(
                ones, ones[0], cells_at, ones[:, 0, 0], 1.0, (0.0, 0.0, 1.0), True, out
            )
            ok = ok and torch.allclose(best.cpu(), torch.full((n,), 2**0.5))
            ok = ok and torch.allclose(upper.cpu(), best.cpu()) and not where.any()
            # one placement (cells, grid and placements of 1: constants to Triton too): 3/√9 = 1
            three = torch.full((n,), 3.0, device=device)
            best, where, upper = best_single_placement(three, three * 3, 1.0, (0.0, 0.0, 1.0), False, out)
            ok = ok and torch.allclose(best.cpu(), torch.ones(n)) and not where.any()
    except torch.cuda.OutOfMemoryError:
        raise  # not a property of the kernels: asked again next time
    except Exception as error:  # noqa: BLE001 (no Triton, no C compiler, an unsupported GPU: torch's products run)
        log.info("vfs: Triton products are off on %s: %s", device, error)
        return False
    if not ok:
        log.warning("vfs: Triton products gave wrong sums on %s; torch's products run", device)
    return ok


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast products in `dtype` on `device` run these kernels: on CUDA, for fp16
    operands (a GPU's only fast type, `vfs.scoring.fast_dtype`), unless `VFS_KERNEL=off`, where
    they build (checked once per process and GPU, however the device is named)."""
    if device.type != "cuda" or dtype != torch.float16 or kernel_setting() == "off":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _builds(torch.device("cuda", index))
