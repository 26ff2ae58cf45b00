"""The fast pass's products on a GPU, each way they can run, against the read floor of the same
bytes: which one reaches the memory speed (issue 11: the cells product ran 1.6–2.1 TB/s on an H200,
the floor 4.1). One resident slice of each shape (as `vfs.sources.resident_slices` cuts them):
- cuBLAS through torch: (K, C)·(C, M) and (M, C)·(C, K), fp32 outputs (`out_dtype`) or fp16 ones,
  K as the mask has it or padded to 16; the whole-grid form's batched product per cell;
- Triton (where it imports): one tiled kernel for the cells product, fp32 accumulation, several
  tile shapes; and the whole-grid form's per-cell sums in one pass.
Prints one JSON document.

    python bench/gpu_products.py --shape r50l4 --n 16667
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import emit, environment, log
from search_bench import SHAPES


def cuda_ms(fn, repeats: int) -> float:
    """The fastest of `repeats` calls (CUDA events) after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop))
    return round(best, 3)


def triton_kernels():
    """The Triton kernels, or None where Triton does not import or cannot compile here."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def cells(
        x_ptr, w_ptr, out_ptr, M, C, K, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rc = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * C + rc[None, :]
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
    def whole(x_ptr, w_ptr, out_ptr, N, CELLS, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rc = tl.arange(0, BLOCK_C)
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row = rn[:, None].to(tl.int64) * CELLS * C
        for p in range(0, CELLS):
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                x = tl.load(x_ptr + row + p * C + c0 + rc[None, :], mask=rn[:, None] < N, other=0.0)
                w = tl.load(w_ptr + p * C + c0 + rc)
                acc += tl.sum(x.to(tl.float32) * w.to(tl.float32)[None, :], axis=1)
            total += acc
        tl.store(out_ptr + rn, total, mask=rn < N)

    def run_cells(w, x, block_m, block_c, warps, stages):
        k, c = w.shape
        m = x.shape[0]
        block_k = max(16, triton.next_power_of_2(min(k, 64)))
        out = torch.empty(k, m, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
        cells[grid](x, w, out, m, c, k, block_m, block_c, block_k, num_warps=warps, num_stages=stages)
        return out

    def run_whole(w, x, block_n, block_c, warps, stages):
        n, cells_, c = x.shape
        out = torch.empty(n, dtype=torch.float32, device=x.device)
        whole[(triton.cdiv(n, block_n),)](
            x, w, out, n, cells_, c, block_n, block_c, num_warps=warps, num_stages=stages
        )
        return out

    return run_cells, run_whole


def shape_case(shape_name: str, n: int, repeats: int, kernels) -> dict:
    h, w, c = SHAPES[shape_name]
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(n, h, w, c, generator=g, device="cuda").relu_().half()
    rows = x.view(-1, c)
    ms: dict[str, float] = {}
    ms["floor: bf16-view matvec"] = cuda_ms(
        lambda: x.view(torch.bfloat16).view(-1, c) @ torch.ones(c, 1, dtype=torch.bfloat16, device="cuda"),
        repeats,
    )
    ms["floor: fp32-accumulating sum"] = cuda_ms(lambda: x.sum(dtype=torch.float32), repeats)
    errors: dict[str, float] = {}
    for k in (9, 14):
        wk = torch.randn(k, c, generator=g, device="cuda").half()
        ref = (wk.double() @ rows[:4096].double().T).float()
        w16 = torch.zeros(16, c, dtype=torch.half, device="cuda")
        w16[:k] = wk
        variants = {
            f"K={k} (K,C)·(C,M) out fp32": lambda: torch.mm(wk, rows.T, out_dtype=torch.float32),
            f"K={k} (K,C)·(C,M) out fp16": lambda: wk @ rows.T,
            f"K={k}→16 (K,C)·(C,M) out fp32": lambda: torch.mm(w16, rows.T, out_dtype=torch.float32),
            f"K={k} (M,C)·(C,K) out fp32": lambda: torch.mm(rows, wk.T, out_dtype=torch.float32),
            f"K={k} (M,C)·(C,K) out fp16": lambda: rows @ wk.T,
            f"K={k}→16 (M,C)·(C,K) out fp16": lambda: rows @ w16.T,
        }
        if kernels is not None:
            for bm, bc, warps, stages in (
                (128, 64, 4, 3),
                (128, 128, 4, 3),
                (256, 64, 8, 3),
                (64, 128, 4, 4),
                (128, 64, 4, 5),
            ):
                name = f"K={k} triton cells BM={bm} BC={bc} warps={warps} stages={stages}"
                variants[name] = lambda bm=bm, bc=bc, warps=warps, stages=stages, wk=wk: kernels[0](
                    wk, rows, bm, bc, warps, stages
                )
        for name, fn in variants.items():
            try:
                ms[name] = cuda_ms(fn, repeats)
                out = fn()
                part = out[:, :4096] if out.shape[0] in (k, 16) else out[:4096].T
                errors[name] = float((part[:k].float() - ref).abs().max())
            except Exception as error:  # noqa: BLE001 (a variant this torch, Triton or GPU lacks: recorded)
                ms[name] = None
                errors[name] = repr(error)[:200]
            log(f"{shape_name} {name}: {ms[name]} ms")
    wc = torch.randn(h * w, 1, c, generator=g, device="cuda").half()
    cells3 = x.view(n, h * w, c)
    whole = {
        "whole_cells bmm out fp32": lambda: torch.bmm(wc, cells3.permute(1, 2, 0), out_dtype=torch.float32),
        "whole_cells bmm out fp16": lambda: torch.bmm(wc, cells3.permute(1, 2, 0)),
        "whole gemv fp16": lambda: x.view(n, -1) @ wc.view(-1),
    }
    if kernels is not None:
        for bn, bc, warps, stages in ((32, 128, 4, 3), (64, 64, 4, 3), (16, 256, 4, 3), (64, 128, 8, 3)):
            whole[f"triton whole BN={bn} BC={bc} warps={warps} stages={stages}"] = (
                lambda bn=bn, bc=bc, warps=warps, stages=stages: kernels[1](
                    wc.view(-1), cells3, bn, bc, warps, stages
                )
            )
    for name, fn in whole.items():
        try:
            ms[name] = cuda_ms(fn, repeats)
        except Exception as error:  # noqa: BLE001 (as above)
            ms[name] = None
            errors[name] = repr(error)[:200]
        log(f"{shape_name} {name}: {ms[name]} ms")
    floor = ms["floor: bf16-view matvec"]
    nbytes = x.numel() * 2
    return {
        "shape": shape_name,
        "n": n,
        "gbytes": round(nbytes / 1e9, 3),
        "min_ms": ms,
        "over_floor": {k: (None if v is None else round(v / floor, 2)) for k, v in ms.items()},
        "tb_per_s": {k: (None if not v else round(nbytes / v / 1e9, 2)) for k, v in ms.items()},
        "max_abs_error_vs_float64": errors,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="r50l4,r50l3", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--n", type=int, default=0, help="images per slice (default: a 4 GiB slice)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    kernels = triton_kernels()
    cases = []
    for shape_name in args.shape.split(","):
        h, w, c = SHAPES[shape_name]
        n = args.n or (4 << 30) // (h * w * c * 2)
        cases.append(shape_case(shape_name, n, args.repeats, kernels))
        torch.cuda.empty_cache()
    emit(
        {
            "benchmark": "gpu_products",
            "triton": kernels is not None,
            "cases": cases,
            "environment": environment(torch.device("cuda")),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
