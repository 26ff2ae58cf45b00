"""Ray figures for docs/scale.md: cluster builds against the single-process build, the sharded
search's added time per query, and what each actor holds.

    .venv/bin/python bench/cluster_bench.py build  [--job cache_jobs/chest_xray.toml] [--workers 1,2]
    .venv/bin/python bench/cluster_bench.py search CACHE [--shards 2] [--queries 60]
    .venv/bin/python bench/cluster_bench.py writer [--rows 1024] [--shape 7,7,2048]

`build` runs the job single-process, then with `--engine ray` at each worker count, on a local
cluster of this machine's CPUs, into fresh temporary caches, and checks every cache bitwise against
the single-process one. `search` times the same queries (random images, random rectangles) in
process and through `ShardedSearch` (both warm: resident, shards started). `writer` times the one
`CacheWriter` on rows of a large layer (the ceiling of a one-writer cluster build). Prints ONE JSON
document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import pandas as pd
import torch
from _common import ROOT, emit, environment, log, wait_quiet

from vfs import BuildJob, ShardedSearch, build_cache, open_cache, search_regions
from vfs.cache import CacheSpec, CacheWriter
from vfs.cluster import connect
from vfs.data import DataSpec
from vfs.models import Preprocess


def _same(a, b) -> bool:
    names = ("features", "sqnorm", "thumbs", "source_index")
    return (
        all(a.group[n][:].tobytes() == b.group[n][:].tobytes() for n in names)
        and a.manifest.equals(b.manifest)
        and a.report == b.report
    )


def _percentiles(ms: list[float]) -> dict:
    p50, p95 = np.percentile(ms, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "max": round(max(ms), 2), "n": len(ms)}


def bench_build(args) -> dict:
    base = BuildJob.from_toml(args.job)
    connect(None)  # a local cluster of every CPU here
    out, runs, reference = Path(tempfile.mkdtemp(prefix="vfs-cluster-bench-")), [], None
    try:
        for engine, workers in [("local", 0), *(("ray", int(w)) for w in args.workers.split(","))]:
            job = replace(base, out=str(out / f"{engine}{workers}.zarr"), engine=engine, workers=workers)
            seen: list = []
            t0 = time.perf_counter()
            cache = build_cache(job, progress=lambda p, seen=seen: seen.append((time.perf_counter(), p)))
            wall = time.perf_counter() - t0
            (t1, first), (t2, last) = seen[0], seen[-1]
            steady = (last.done - first.done) / (t2 - t1) if t2 > t1 else None
            reference = reference or cache
            runs.append(
                {
                    "engine": engine,
                    "workers": workers,
                    "images": cache.n,
                    "wall_s": round(wall, 2),
                    "images_per_s": round(last.done / wall, 2),
                    "steady_images_per_s": round(steady, 2) if steady else None,
                    "first_batch_s": round(t1 - t0, 2),
                    "identical_to_local": _same(cache, reference),
                }
            )
            log(runs[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"job": str(args.job), "batch_size": base.batch_size, "runs": runs}


def bench_search(args) -> dict:
    cache = open_cache(args.cache)
    n, h, w, _ = cache.shape
    rng = np.random.default_rng(0)
    queries = []
    for _ in range(args.queries):
        y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
        mask = np.zeros((h, w))
        mask[y0 : rng.integers(y0 + 1, h + 1), x0 : rng.integers(x0 + 1, w + 1)] = 1
        queries.append((int(rng.integers(n)), mask))
    connect(None, num_cpus=args.shards)
    with ShardedSearch(args.cache, shards=args.shards) as sharded:
        for i, mask in queries[:3]:  # warm: resident caches, loaded code paths
            search_regions(cache, i, mask, k=args.k, exclude=i), sharded.search(i, mask, k=args.k, exclude=i)
        log(f"machine busy fraction before timing: {wait_quiet(120):.2f}")
        local, remote, engine, same = [], [], [], 0
        for i, mask in queries:
            t0 = time.perf_counter()
            a = search_regions(cache, i, mask, k=args.k, exclude=i)
            t1 = time.perf_counter()
            b = sharded.search(i, mask, k=args.k, exclude=i)
            t2 = time.perf_counter()
            local.append((t1 - t0) * 1e3)
            remote.append((t2 - t1) * 1e3)
            engine.append(max(sharded.shard_ms))
            same += a.top.equals(b.top)
        status = sharded.status()
    ray_ms = [total - inside for total, inside in zip(remote, engine)]
    return {
        "cache": args.cache,
        "shape": [n, h, w, cache.spec.channels],
        "shards": args.shards,
        "k": args.k,
        "queries": len(queries),
        "identical_top": same,
        "in_process_ms": _percentiles(local),
        "sharded_ms": _percentiles(remote),
        "slowest_shard_engine_ms": _percentiles(engine),
        "ray_and_merge_ms": _percentiles(ray_ms),
        "actors": status,
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def bench_writer(args) -> dict:
    h, w, c = (int(v) for v in args.shape.split(","))
    spec = CacheSpec(
        model="bench",
        layer="bench",
        input_size=224,
        grid=(h, w),
        channels=c,
        preprocess=Preprocess(224, 256),
        data=DataSpec("bench"),
    )
    records = pd.DataFrame({"path": [f"{i}.png" for i in range(args.rows)]})
    rng = np.random.default_rng(0)
    rows = rng.random((64, h, w, c), dtype=np.float32).astype(np.float16)
    thumb = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    out = Path(tempfile.mkdtemp(prefix="vfs-writer-bench-")) / "w.zarr"
    try:
        writer = CacheWriter.open(out, spec, records, 224)
        t0 = time.perf_counter()
        for i in range(args.rows):
            writer.add(i, rows[i % 64], thumb)
        writer.finish(records)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    mb = args.rows * h * w * c * 2 / 1e6
    return {
        "rows": args.rows,
        "shape": [h, w, c],
        "fsync": os.environ.get("VFS_FSYNC", "1") != "0",
        "wall_s": round(wall, 2),
        "rows_per_s": round(args.rows / wall, 1),
        "feature_mb_per_s": round(mb / wall, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build")
    b.add_argument("--job", default=str(ROOT / "cache_jobs" / "chest_xray.toml"))
    b.add_argument("--workers", default="1,2")
    s = sub.add_parser("search")
    s.add_argument("cache")
    s.add_argument("--shards", type=int, default=2)
    s.add_argument("--queries", type=int, default=60)
    s.add_argument("--k", type=int, default=10)
    wr = sub.add_parser("writer")
    wr.add_argument("--rows", type=int, default=1024)
    wr.add_argument("--shape", default="7,7,2048")
    for p in (b, s, wr):
        p.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    doc = {"environment": environment(torch.device("cpu"))}
    doc[args.what] = {"build": bench_build, "search": bench_search, "writer": bench_writer}[args.what](args)
    doc["environment"]["loadavg_at_end"] = list(os.getloadavg())
    emit(doc, args.out)


if __name__ == "__main__":
    main()
