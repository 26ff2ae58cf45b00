"""The search's two products alone, in fp16 and in bf16, against the fp16 read floor (issue 11).

On CPUs without native fp16 dot products (no AVX512-FP16 / AMX) the fp16 product runs several
times the floor while bf16's may not: this is the measurement behind `VFS_FAST_DTYPE`. Shapes of
the r50l4 target: n images of 7×7×2048, a 3×3 mask (cells form: 9 weight rows) and the band form's
per-data-row product on (n, w·C) rows. Prints one JSON document.

    .venv/bin/python bench/product_dtypes.py --n 2000
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import emit, environment, timed


def best_ms(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up (which builds the kernels)."""
    cpu = torch.device("cpu")
    fn()
    return round(min(timed(fn, cpu)[0] for _ in range(repeats)), 2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    n, h, w, c = args.n, 7, 7, 2048
    generator = torch.Generator().manual_seed(0)
    x16 = torch.randn(n, h, w, c, generator=generator).clamp_min_(0).half()
    copies = {"float16": x16, "bfloat16": x16.bfloat16()}
    cells_w = torch.randn(9, c, generator=generator)
    band_w = torch.randn(15, w * c, generator=generator)  # 3 mask rows × 5 placements
    ms = {"floor (int16-view amax)": best_ms(lambda: x16.view(torch.int16).amax(), args.repeats)}
    for name, x in copies.items():
        wc, wb = cells_w.to(x.dtype), band_w.to(x.dtype)
        ms[f"cells product, {name}"] = best_ms(lambda: wc @ x.view(-1, c).T, args.repeats)
        ms[f"band products, {name}"] = best_ms(
            lambda: [wb @ x[:, y].reshape(n, w * c).T for y in range(h)], args.repeats
        )
    floor = ms["floor (int16-view amax)"]
    emit(
        {
            "benchmark": "product_dtypes",
            "shape": [n, h, w, c],
            "min_ms": ms,
            "over_floor": {k: round(v / floor, 2) for k, v in ms.items()},
            "environment": environment(torch.device("cpu")),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
