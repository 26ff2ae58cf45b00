"""Load test: N concurrent searches (threads, as app sessions share one server process and one
opened cache through `st.cache_resource`) against one cache; every result is checked against a
single-threaded reference, and latency percentiles are reported per concurrency level.

The cache is a real zarr cache, either an existing one (`--cache caches/demo.zarr`, e.g. built
from embedded:skimage with `python -m vfs build cache_jobs/demo.toml`) or a synthetic one written
with `vfs.cache.CacheWriter` (post-ReLU fp16 features, `--n` images of `--shape`). Queries are
`--queries` different (image index, soft mask) pairs — from one cell to the whole grid — with a
top-k of 10 and the query image excluded; half of them ask for one result per domain when the
cache has domains. Each concurrency level runs `--searches` searches from `--threads` threads on
one shared `FeatureCache`; with `--memory-budget` the cache is streamed from disk instead of
resident. A result counts as verified when its scores, placements and top table are identical
to the reference's (bit for bit).

Prints ONE JSON document on stdout (progress on stderr):

    .venv/bin/python bench/load_test.py                                  # synthetic 2000 × 7×7×192, ~1 min
    .venv/bin/python bench/load_test.py --cache caches/demo.zarr --threads 1,4,8,16
    .venv/bin/python bench/load_test.py --memory-budget 8MB --threads 1,4   # streamed
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import pandas as pd
import torch
from _common import CpuMeter, emit, environment, log, resolve, wait_quiet

from vfs.cache import CacheSpec, CacheWriter, open_cache
from vfs.data import DataSpec
from vfs.devices import memory_bytes
from vfs.models import Preprocess
from vfs.search import search_regions

K = 10


def synthetic_cache(path: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    h, w, c = shape
    spec = CacheSpec(
        model="synthetic",
        layer="relu",
        input_size=32 * h,
        grid=(h, w),
        channels=c,
        preprocess=Preprocess(32 * h, 32 * h),
        data=DataSpec("synthetic", "label", "domain"),
    )
    cand = pd.DataFrame(
        {
            "path": [f"img/{i:06d}.png" for i in range(n)],
            "label": [f"c{i % 10}" for i in range(n)],
            "domain": [f"d{i % 4}" for i in range(n)],
        }
    )
    rng = np.random.default_rng(seed)
    writer = CacheWriter.open(path, spec, cand, 8)
    thumb = np.zeros((8, 8, 3), np.uint8)
    for start in range(0, n, 256):
        block = np.maximum(rng.standard_normal((min(256, n - start), h, w, c), dtype=np.float32), 0).astype(
            np.float16
        )
        for i, f in enumerate(block):
            writer.add(start + i, f, thumb)
    writer.finish(cand)


def make_queries(
    n_images: int, grid: tuple[int, int], count: int, domains: bool, seed: int = 1
) -> list[dict]:
    rng = np.random.default_rng(seed)
    h, w = grid
    out = []
    for q in range(count):
        m = np.zeros(grid, np.float32)
        if q % 5 == 0:
            m[:] = 1  # the whole grid
        elif q % 5 == 1:
            m[rng.integers(h), rng.integers(w)] = 1  # one cell
        else:  # a soft blob, like a drawn stroke area-averaged onto the grid
            y, x = rng.integers(h), rng.integers(w)
            dy, dx = rng.integers(1, max(2, h // 2) + 1), rng.integers(1, max(2, w // 2) + 1)
            m[y : y + dy, x : x + dx] = rng.uniform(0.1, 1.0, size=m[y : y + dy, x : x + dx].shape)
        index = int(rng.integers(n_images))
        out.append({"index": index, "mask": m, "per_domain": 2 if domains and q % 2 else None})
    return out


def search(cache, q: dict, device: torch.device, budget: int | None):
    return search_regions(
        cache,
        q["index"],
        q["mask"],
        k=K,
        exclude=q["index"],
        per_domain=q["per_domain"],
        device=device,
        memory_budget=budget,
    )


def identical(a, b) -> bool:
    return (
        np.array_equal(a.scores, b.scores)
        and np.array_equal(a.placements, b.placements)
        and a.top.equals(b.top)
    )


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="an existing cache (path or URL); default: a synthetic one")
    p.add_argument("--n", type=int, default=2000, help="synthetic cache: images")
    p.add_argument("--shape", default="7x7x192", help="synthetic cache: h x w x C (default: Lite0 blocks.5)")
    p.add_argument("--threads", default="1,2,4,8", help="concurrency levels, comma-separated")
    p.add_argument("--searches", type=int, default=64, help="searches per concurrency level")
    p.add_argument("--queries", type=int, default=16, help="distinct (index, mask) queries, cycled")
    p.add_argument(
        "--memory-budget", type=memory_bytes, help="stream the cache within this budget (e.g. 8MB)"
    )
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--quiet-wait", type=float, default=0, help="wait up to S seconds for an idle machine per level"
    )
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()

    device = resolve(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tmp = None
    if args.cache:
        location = args.cache
    else:
        tmp = Path(tempfile.mkdtemp(prefix="vfs-load-"))
        location = str(tmp / "synthetic.zarr")
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        log(f"writing a synthetic cache {args.n} × {shape} to {location}")
        synthetic_cache(Path(location), args.n, shape)
    try:
        probe = open_cache(location)
        n, grid = probe.n, probe.spec.grid
        qs = make_queries(n, grid, args.queries, probe.domain_col is not None)
        log(f"reference: {len(qs)} queries, one at a time, each on a freshly opened cache")
        reference = [search(open_cache(location), q, device, args.memory_budget) for q in qs]

        levels = []
        for threads in (int(t) for t in args.threads.split(",")):
            shared = open_cache(location)  # one object for all threads, as the app shares it
            search(shared, qs[0], device, args.memory_budget)  # warm: resident load / first read not timed
            tasks = [i % len(qs) for i in range(args.searches)]
            latencies, verified, mismatches = [0.0] * len(tasks), 0, []
            lock = threading.Lock()

            def one(t: int) -> None:
                nonlocal verified
                q = tasks[t]
                t0 = time.perf_counter()
                result = search(shared, qs[q], device, args.memory_budget)
                latencies[t] = (time.perf_counter() - t0) * 1e3
                ok = identical(result, reference[q])
                with lock:
                    if ok:
                        verified += 1
                    else:
                        mismatches.append(q)

            if args.quiet_wait:
                wait_quiet(args.quiet_wait)
            with CpuMeter() as meter, ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(len(tasks))))
            wall = meter.result["wall_s"]
            level = {
                "threads": threads,
                "searches": len(tasks),
                "verified": verified,
                "mismatched_queries": sorted(set(mismatches)),
                **percentiles(latencies),
                "throughput_per_s": round(len(tasks) / wall, 2),
                "cpu": meter.result,
            }
            log(
                f"{threads:>3} threads: p50 {level['p50_ms']} ms, p90 {level['p90_ms']}, p99 {level['p99_ms']}, "
                f"{level['throughput_per_s']} searches/s, verified {verified}/{len(tasks)}"
            )
            levels.append(level)

        doc = {
            "benchmark": "load_test",
            "environment": environment(device),
            "cache": {
                "location": location if args.cache else "synthetic",
                "n": n,
                "grid": list(grid),
                "channels": probe.spec.channels,
                "nbytes_features": probe.nbytes,
                "path": "streamed"
                if args.memory_budget and not probe.fits(device, args.memory_budget)
                else "resident",
                "memory_budget": args.memory_budget,
            },
            "k": K,
            "queries": len(qs),
            "torch_threads": torch.get_num_threads(),
            "levels": levels,
            "all_verified": all(lv["verified"] == lv["searches"] for lv in levels),
        }
        emit(doc, args.out)
        if not doc["all_verified"]:
            raise SystemExit("some concurrent results differ from the single-threaded reference")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
