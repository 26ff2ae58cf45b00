"""The pairs kernel alone (`vfs/kernel.c`): its multiply-add rate on the grid's shapes and masks,
on one thread and on all, against the rate of a plain loop of 512-bit (or 256-bit) FMAs that keep
16 independent sums in registers — the issue rate a core reaches, measured here, not assumed.

    .venv/bin/python bench/kernel_bench.py                      # grid shapes, all masks, 1 and 2 threads
    .venv/bin/python bench/kernel_bench.py --flags "-march=native -mno-avx512f"   # the AVX2 build

`--flags` compiles the kernel with other flags than `-march=native` (e.g. its AVX2 build on an
AVX-512 machine: a proxy for AVX2-only CPUs with the same FMA pipes). One JSON document on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from _common import emit, environment, log, summary
from search_bench import MASKS, SHAPES, make_mask, synthetic

from vfs.kernel import PairKernel, build, compiler
from vfs.masks import crop_mask

SHAPES_N = {"lite0": ((7, 7, 192), 10_000)} | {k: (v, 2_000) for k, v in SHAPES.items()}

PEAK_LOOP = r"""
#include <immintrin.h>
#include <stdint.h>
#if defined(__AVX512F__)
typedef __m512 vf;
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define SET1 _mm512_set1_ps
#define FIRST(v) _mm512_cvtss_f32(v)
#define LANES 16
#else
typedef __m256 vf;
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define SET1 _mm256_set1_ps
#define FIRST(v) _mm256_cvtss_f32(v)
#define LANES 8
#endif
/* 16 independent chains of FMAs, all operands in registers: `iters` × 16 vector FMAs. */
float peak(int64_t iters) {
    vf a[16], x = SET1(1.0f), w = SET1(1e-7f);
    for (int i = 0; i < 16; i++) a[i] = SET1((float)i);
    for (int64_t it = 0; it < iters; it++) {
        __asm__("" : "+v"(x), "+v"(w));
        for (int i = 0; i < 16; i++) a[i] = FMA(x, w, a[i]);
    }
    vf s = a[0]; /* never through memory: sums whose address is taken stay in memory */
    for (int i = 1; i < 16; i++) s = ADD(s, a[i]);
    return FIRST(s);
}
int lanes(void) { return LANES; }
"""


def peak_rate(flags: tuple[str, ...], threads: int) -> dict:
    """Vector FMAs per second of `PEAK_LOOP` on `threads` threads at once (its lanes in `lanes`)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, so = Path(tmp) / "peak.c", Path(tmp) / "peak.so"
        src.write_text(PEAK_LOOP)
        subprocess.run(
            [compiler() or "cc", "-O3", *flags, "-shared", "-fPIC", str(src), "-o", str(so)],
            check=True,
        )
        lib = ctypes.CDLL(str(so))
    lib.peak.argtypes, lib.peak.restype = [ctypes.c_int64], ctypes.c_float
    iters = 20_000_000
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL
        list(pool.map(lambda _: lib.peak(iters // 10), range(threads)))
        t = time.perf_counter()
        list(pool.map(lambda _: lib.peak(iters), range(threads)))
        seconds = time.perf_counter() - t
    return {
        "threads": threads,
        "lanes": lib.lanes(),
        "g_vector_fma_per_s": round(16 * iters * threads / seconds / 1e9, 3),
    }


def kernel_case(lib, shape: str, x: torch.Tensor, mask_name: str, threads: int, repeats: int) -> dict:
    """One mask's numerator on `x`, (n, h, w, C) fp16 features of `shape`."""
    n, h, w, c = x.shape
    m = make_mask(mask_name, (h, w))
    box = crop_mask(m).weights  # the mask's bounding box: the region's cells and its placements
    cells = tuple((int(y), int(x_)) for y, x_ in np.argwhere(box > 0))
    placements = (h - box.shape[0] + 1, w - box.shape[1] + 1)
    weights = torch.randn(len(cells), c, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kernel = PairKernel.create(lib, torch.float16, weights, cells, (h, w), placements)
    pairs = len(kernel.query_cell)
    vectors = pairs * -(-c // lib.lanes) * n  # vector multiply-adds per call
    torch.set_num_threads(threads)
    kernel.numerator([x])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        kernel.numerator([x])
        times.append((time.perf_counter() - t) * 1e3)
    best = min(times)
    return {
        "shape": shape,
        "grid": [h, w, c],
        "n": n,
        "mask": mask_name,
        "cells": len(cells),
        "placements": list(placements),
        "pairs_per_image": pairs,
        "threads": threads,
        "g_vector_fma_per_s": round(vectors / best / 1e6, 3),
        "gb_per_s": round(x.numel() * 2 / best / 1e6, 2),  # fp16 bytes read
    } | summary(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="all", help=f"{','.join(SHAPES_N)} or all")
    ap.add_argument("--mask", default="all", help=f"{','.join(MASKS)} or all")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    ap.add_argument("--n", type=int, default=None, help="images (default: the grid's N per shape)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--flags", default="-march=native", help="compiler flags of the kernel's build")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    flags = tuple(args.flags.split())
    lib = build(flags)
    if lib is None:
        raise SystemExit("the pairs kernel does not build here (no C compiler, or no AVX2 + F16C + FMA)")
    shapes = list(SHAPES_N) if args.shape == "all" else args.shape.split(",")
    masks = list(MASKS) if args.mask == "all" else args.mask.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    peaks = [peak_rate(flags, t) for t in threads]
    log("FMA issue rate:", peaks)
    cases = []
    for shape in shapes:
        grid, default_n = SHAPES_N[shape]
        x = synthetic(args.n or default_n, grid, features="signed")  # once per shape: up to 0.8 GB
        for mask_name in masks:
            for t in threads:
                case = kernel_case(lib, shape, x, mask_name, t, args.repeats)
                peak = next(p for p in peaks if p["threads"] == t)["g_vector_fma_per_s"]
                case["share_of_peak"] = round(case["g_vector_fma_per_s"] / peak, 3)
                log(
                    f"{shape} {mask_name} {t} thread(s): {case['min_ms']:.1f} ms, "
                    f"{case['g_vector_fma_per_s']:.2f} G vector FMA/s ({case['share_of_peak']:.0%} of peak)"
                )
                cases.append(case)
    env = environment(torch.device("cpu"))
    env["kernel_flags"] = list(flags)
    env["kernel_lanes"] = lib.lanes
    emit(
        {"benchmark": "kernel", "args": vars(args), "peak": peaks, "cases": cases, "environment": env},
        args.out,
    )


if __name__ == "__main__":
    main()
