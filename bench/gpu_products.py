"""The fast pass's products on a GPU, each way they can run, against the read floor of the same
bytes: which one reaches the memory speed (issue 11: the cells product ran 1.6–2.1 TB/s on an H200,
the floor 4.1). One resident slice of each shape (as `vfs.sources.resident_slices` cuts them):
- cuBLAS through torch: (K, C)·(C, M) and (M, C)·(C, K), fp32 outputs (`out_dtype`) or fp16 ones,
  K as the mask has it or padded to 16; the whole-grid form's batched product per cell;
- Triton (where it imports): `vfs.triton_products`' kernels — the rows product (cells and band
  forms) and the whole grid's per-cell sums — at their tiles and at others.
Prints one JSON document.

    python bench/gpu_products.py --shape r50l4 --n 16667
"""

from __future__ import annotations

import argparse
import importlib.util

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import emit, environment, log
from search_bench import SHAPES

from vfs import triton_products

ROW_TILES = ((128, 128, 4, 3), (128, 64, 4, 3), (256, 64, 8, 3), (64, 128, 4, 4), (128, 64, 4, 5))
"""(rows, channels, warps, stages) of the rows product: the first is `vfs.triton_products`' own."""
CELL_TILES = ((16, 256, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3))
"""(images, channels, warps, stages) of the cell sums: the first is `vfs.triton_products`' own."""


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


def shape_case(shape_name: str, n: int, repeats: int, triton: bool) -> dict:
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
        for bm, bc, warps, stages in ROW_TILES if triton else ():
            variants[f"K={k} triton rows {bm}×{bc} warps={warps} stages={stages}"] = (
                lambda bm=bm, bc=bc, warps=warps, stages=stages, wk=wk: triton_products.rows_product(
                    wk, rows, row_block=bm, channel_block=bc, warps=warps, stages=stages
                )
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
    for bn, bc, warps, stages in CELL_TILES if triton else ():
        whole[f"triton cell sums {bn}×{bc} warps={warps} stages={stages}"] = (
            lambda bn=bn, bc=bc, warps=warps, stages=stages: triton_products.cell_sums(
                wc.view(-1, c), cells3, image_block=bn, channel_block=bc, warps=warps, stages=stages
            )
        )
    for name, fn in whole.items():
        try:
            ms[name] = cuda_ms(fn, repeats)
        except Exception as error:  # noqa: BLE001 (as above)
            ms[name] = None
            errors[name] = repr(error)[:200]
        log(f"{shape_name} {name}: {ms[name]} ms")
    floor = min(ms["floor: bf16-view matvec"], ms["floor: fp32-accumulating sum"])
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
    triton = importlib.util.find_spec("triton") is not None
    cases = []
    for shape_name in args.shape.split(","):
        h, w, c = SHAPES[shape_name]
        n = args.n or (4 << 30) // (h * w * c * 2)
        cases.append(shape_case(shape_name, n, args.repeats, triton))
        torch.cuda.empty_cache()
    emit(
        {
            "benchmark": "gpu_products",
            "triton": triton,
            "cases": cases,
            "environment": environment(torch.device("cuda")),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
