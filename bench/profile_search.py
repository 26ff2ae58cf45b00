"""Where a vfs region search spends its time, and what the candidate fixes would save.

1. Sections: `search_regions` on a synthetic in-memory cache under cProfile (vfs functions and
   the torch/numpy calls they make, by total time) — robust to refactors of vfs.search.
2. Kernels, timed interleaved in this process on the same chunk sizes the search uses:
   - the numerator's product in the layouts vfs has used on CPU (`W @ x2d.T` since dbf2e42,
     `x2d @ W` before; fp16 output) vs `F.linear(x2d, W.T.contiguous())`, and on bf16 copies
     (one inexact copy; an exact hi + lo split) through AMX; the whole numerator of both vfs
     forms (cells, band) on this query's mask;
   - exact re-scoring of the images the fast bound cannot separate: `vfs.scoring.exact_scores`
     (float64) vs the same definition computed with one fp32 product + shift-and-add (checked
     equal to 1e-5);
   - one pass over the fp16 bytes (int16 view amax) per chunk and whole, for scale.

    .venv/bin/python bench/profile_search.py --n 2000 --shape r50l4 --mask all
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from functools import partial

import _common  # noqa: F401
import numpy as np
import torch
import torch.nn.functional as F
from _common import CpuMeter, emit, environment, log, resolve, summary
from search_bench import MASKS, SHAPES, make_mask, synthetic


def sections(search, repeats: int) -> dict:
    """`search()` (one region search, after one untimed) `repeats` times under cProfile."""
    search()
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    for _ in range(repeats):
        res = search()
    pr.disable()
    wall = (time.perf_counter() - t) * 1e3 / repeats
    st = pstats.Stats(pr, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
        where = f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({fn})"
        rows.append(
            {
                "function": where,
                "calls_per_query": round(nc / repeats, 1),
                "self_ms_per_query": round(tt * 1e3 / repeats, 2),
                "cum_ms_per_query": round(ct * 1e3 / repeats, 2),
            }
        )
    by_self = sorted(rows, key=lambda r: -r["self_ms_per_query"])[:15]
    vfs_cum = sorted(
        [r for r in rows if r["function"].startswith("vfs/")], key=lambda r: -r["cum_ms_per_query"]
    )[:12]
    return {
        "ms_per_query": round(wall, 2),
        "method": res.method,
        "rescored": int(res.rescored),
        "top_self_time": by_self,
        "vfs_functions_cumulative": vfs_cum,
    }


def exact_alt(features: np.ndarray, rq) -> np.ndarray:
    """Proposed exact re-scoring: the definition in fp32 via one product and a shift-and-add."""
    x = torch.from_numpy(features).float()  # torch's fp16→fp32 is vectorised; numpy's is not
    m, h, w, c = x.shape
    mh, mw = rq.mask.shape
    ph, pw = h - mh + 1, w - mw + 1
    kern = torch.from_numpy(rq.kernel).float().reshape(mh * mw, c)  # (K, C) fp32, m²·q
    g = (x.reshape(-1, c) @ kern.T).view(m, h, w, mh * mw)
    sq = x.square().sum(-1)
    m2 = torch.from_numpy(rq.mask.weights**2)
    num = torch.zeros(m, ph, pw)
    den = torch.zeros(m, ph, pw)
    for i in range(mh):
        for j in range(mw):
            if m2[i, j] > 0:
                num += g[:, i : i + ph, j : j + pw, i * mw + j]
                den += m2[i, j] * sq[:, i : i + ph, j : j + pw]
    return (num / (rq.norm * den.clamp_min(0).sqrt()).clamp_min(1e-12)).numpy()


def kernels(x: torch.Tensor, rq, rescored: int, repeats: int) -> dict:
    from vfs.scoring import QueryGeometry, QueryPlan, Scorer, exact_scores
    from vfs.sources import resident_slices

    n, h, w, c = x.shape
    cpu = torch.device("cpu")
    slices = resident_slices(n, h * w * c * 2, cpu)  # as a CPU search slices a resident source
    chunks = [x[a:b] for a, b in slices]
    geometry = QueryGeometry.create(rq, (h, w))
    forms = {m: Scorer.fast(geometry, QueryPlan(m), cpu) for m in ("cells", "band")}
    k = int((rq.mask.weights > 0).sum())
    W = torch.randn(c, k).half()
    Wt = W.T.contiguous()
    rows = x[: max(1, rescored)].numpy()
    # bf16 copies made once (as a resident cache would hold them): a single bf16 copy (inexact,
    # |x - bf16(x)| <= 2^-8 |x|) and an exact hi + lo split (fp16 = bf16 hi + bf16 lo, exactly).
    hi = x.bfloat16()
    lo = (x.float() - hi.float()).bfloat16()
    hi_chunks = [hi[a:b] for a, b in slices]
    lo_chunks = [lo[a:b] for a, b in slices]
    Wb = torch.cat(
        [Wt.bfloat16(), (Wt.float() - Wt.bfloat16().float()).bfloat16()]
    )  # q = q_hi + q_lo: (2K, C)
    vec = torch.randn(1, h * w * c).half()  # a full-grid kernel: the only placement
    vecb = torch.cat([vec.bfloat16(), (vec.float() - vec.bfloat16().float()).bfloat16()])
    fns = {
        f"cells product W(K={k},C) @ x2d.T (weights on the left, vfs since dbf2e42)": lambda: [
            Wt @ ch.reshape(-1, c).T for ch in chunks
        ],
        f"cells product x2d @ W(C,{k}) (vfs before dbf2e42)": lambda: [
            ch.reshape(-1, c) @ W for ch in chunks
        ],
        f"cells product F.linear(x2d, W(C,{k}).T.contiguous())": lambda: [
            F.linear(ch.reshape(-1, c), Wt) for ch in chunks
        ],
        "cells numerator (vfs: the product, a transpose, K shift-and-adds)": lambda: [
            forms["cells"].numerator(ch) for ch in chunks
        ],
        "band numerator (vfs: h products on strided (n, w·C) rows, an add per mask row)": lambda: [
            forms["band"].numerator(ch) for ch in chunks
        ],
        "cells product on a bf16 copy, F.linear(x2d_bf16, [q_hi; q_lo]) (AMX; not exact)": lambda: [
            F.linear(ch.reshape(-1, c), Wb) for ch in hi_chunks
        ],
        "cells product on an exact bf16 hi+lo split (2 products, 2x bytes)": lambda: [
            F.linear(a.reshape(-1, c), Wb) + F.linear(b.reshape(-1, c), Wb)
            for a, b in zip(hi_chunks, lo_chunks)
        ],
        "single placement as one matrix-vector product, F.linear(x.view(n, h·w·C), kernel) fp16": lambda: [
            F.linear(ch.reshape(ch.shape[0], -1), vec) for ch in chunks
        ],
        "the same on the exact bf16 hi+lo split (2 products)": lambda: [
            F.linear(a.reshape(a.shape[0], -1), vecb) + F.linear(b.reshape(b.shape[0], -1), vecb)
            for a, b in zip(hi_chunks, lo_chunks)
        ],
        "one fp16 pass, int16-view amax, per chunk": lambda: [ch.view(torch.int16).amax() for ch in chunks],
        "one fp16 pass, int16-view amax, whole": lambda: x.view(torch.int16).amax(),
        f"exact re-scoring of {len(rows)} images: vfs.scoring.exact_scores": lambda: exact_scores(rows, rq),
        f"exact re-scoring of {len(rows)} images: torch convert + product + shift-add": lambda: exact_alt(
            rows, rq
        ),
        "fp16→fp32 of those images, numpy astype": lambda: rows.astype(np.float32),
        "fp16→fp32 of those images, torch .float()": lambda: torch.from_numpy(rows).float(),
    }
    diff = float(np.abs(exact_scores(rows, rq) - exact_alt(rows, rq)).max())
    times = {name: [] for name in fns}
    for f in fns.values():
        f()
    with CpuMeter() as meter:
        for _ in range(repeats):
            for name, f in fns.items():
                t = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t) * 1e3)
    exact_split = bool(torch.equal(hi.float() + lo.float(), x.float()))
    return {
        "bf16_hi_lo_split_exact": exact_split,
        "chunk_rows": slices[0][1],
        "chunks": len(chunks),
        "timings": {k: summary(v) for k, v in times.items()},
        "exact_alt_max_abs_diff": diff,
        "machine_share": meter.result,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--shape", default="r50l4", choices=list(SHAPES))
    ap.add_argument("--mask", default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from vfs.scoring import RegionQuery
    from vfs.search import search_regions
    from vfs.sources import ArrayFeatures

    device = resolve(args.device)
    env = environment(device)
    x = synthetic(args.n, SHAPES[args.shape])
    source = ArrayFeatures(x)
    q = args.n // 3
    out = {"benchmark": "profile_search", "args": vars(args), "cases": []}
    for mask_name in list(MASKS) if args.mask == "all" else args.mask.split(","):
        mask = make_mask(mask_name, SHAPES[args.shape][:2])
        log(f"{args.shape}/{mask_name}: profiling")
        with torch.inference_mode():
            sec = sections(
                partial(search_regions, source, q, mask, k=10, exclude=q, device=device), args.repeats
            )
            rq = RegionQuery.create(x[q].float().numpy(), mask)
            ker = kernels(x, rq, sec["rescored"], args.repeats) if device.type == "cpu" else None
        out["cases"].append({"mask": mask_name, "sections": sec, "kernels": ker})
        for r in sec["top_self_time"][:6]:
            log(f"   {r['self_ms_per_query']:8.2f} ms self  {r['function']}")
        if ker:
            for name, s in ker["timings"].items():
                log(f"   {s['min_ms']:8.2f} ms min  {name}")
    out["environment"] = env | {"loadavg_at_end": list(os.getloadavg())}
    emit(out, args.out)


if __name__ == "__main__":
    main()
