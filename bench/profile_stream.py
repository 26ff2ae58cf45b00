"""Where a memory-budgeted (streamed) search spends its time, on a cache written by
`search_bench.py --out-of-core --keep` (warm page cache: this isolates CPU costs from the disk).

Times, interleaved: (a) iterating `FeatureCache.chunks(cpu, budget)` alone (prefetch thread; local
uncompressed chunk files are mapped, so their pages are only touched by the scoring), (b) a raw read of the same chunk files, (c) the scoring alone on the same
data held in memory (`ArrayFeatures`, chunk by chunk as in a resident search), (d) the whole
streamed `search_regions`, (e) `FeatureCache.rows` of the re-scored images.
If prefetching overlapped perfectly, (d) ≈ max(a, c) + (e).

    .venv/bin/python bench/search_bench.py --out-of-core --cache-gb 1 --memory-budget 400MB --keep
    .venv/bin/python bench/profile_stream.py /tmp/vfs-bench/ooc_r50l4_1GB.zarr --memory-budget 400MB
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import _common  # noqa: F401
import numpy as np
import torch
from _common import CpuMeter, emit, environment, log, summary, wait_quiet
from search_bench import K, chunk_files, make_mask

from vfs.devices import memory_bytes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--memory-budget", default="400MB")
    ap.add_argument("--mask", default="square3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from vfs.cache import open_cache
    from vfs.search import search_regions
    from vfs.sources import ArrayFeatures

    budget = memory_bytes(args.memory_budget)
    cpu = torch.device("cpu")
    env = environment(cpu)
    cache = open_cache(args.cache)
    n, h, w, c = cache.shape
    mask = make_mask(args.mask, (h, w))
    q = n // 3
    files = chunk_files(Path(args.cache))
    nbytes = sum(p.stat().st_size for p in files)
    mem = ArrayFeatures(cache.features[:n])
    res = search_regions(cache, q, mask, k=K, exclude=q, device=cpu, memory_budget=budget)
    near = np.sort(np.argsort(-res.scores)[: max(1, res.rescored)])  # as many images as the search re-scored

    def chunks_only():
        rows = 0
        for _, _x, s in cache.chunks(cpu, budget):  # mapped chunk files come as a list of tensors
            rows += len(s)
        return rows

    def raw():
        buf = bytearray(16 << 20)
        mv = memoryview(buf)
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(mv):
                    pass

    fns = {
        "(a) FeatureCache.chunks(cpu, budget) only": chunks_only,
        "(b) raw read of the chunk files": raw,
        "(c) scoring in memory (ArrayFeatures, same data)": lambda: search_regions(
            mem, q, mask, k=K, exclude=q, device=cpu
        ),
        "(d) streamed search_regions(cache, memory_budget)": lambda: search_regions(
            cache, q, mask, k=K, exclude=q, device=cpu, memory_budget=budget
        ),
        f"(e) FeatureCache.rows of the {len(near)} re-scored images": lambda: cache.rows(near),
    }
    times = {k: [] for k in fns}
    share = {k: [] for k in fns}
    for f in fns.values():
        f()
    for r in range(args.repeats):
        if args.quiet_wait:
            wait_quiet(args.quiet_wait, window_s=1.0)
        for k, f in fns.items():
            with CpuMeter() as m:
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
            share[k].append(m.result["foreign_cpu_frac"])
        log(f"rep {r}: " + ", ".join(f"{k[:3]} {v[-1]:.0f} ms" for k, v in times.items()))
    out = {
        "benchmark": "profile_stream",
        "args": vars(args),
        "cache": {
            "n": n,
            "shape": [n, h, w, c],
            "bytes": nbytes,
            "zarr_chunk_rows": cache.features.chunks[0],
        },
        "memory_budget_bytes": budget,
        "rescored": int(res.rescored),
        "method": res.method,
        "timings": {
            k: summary(v, share[k]) | {"gb_per_s": round(nbytes / (min(v) * 1e-3) / 1e9, 2)}
            for k, v in times.items()
        },
    }
    out["environment"] = env | {"loadavg_at_end": list(os.getloadavg())}
    emit(out, args.out)


if __name__ == "__main__":
    main()
