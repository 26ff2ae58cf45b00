"""Exact region search over a cache split across Ray actors, each holding its share resident.

The cache's images are cut into contiguous ranges, one actor (a shard) per range. A shard reads
its rows straight from the store — local path, shared file system or URL — so the driver never
holds the features, and keeps them on its GPU (or in its RAM) between queries. A query is
prepared once on the driver and put in the object store once; every shard runs the engine
(`search_regions`, exact re-scoring included) on its rows and returns its exact top-k and every
one of its images' scores; the driver concatenates the scores and picks the top-k from the
shards' top-ks.

That pick is the whole cache's exact top-k: an image in it is in its own shard's top-k (a shard
ranks its images as the whole cache does, with fewer rivals; under `per_domain` a shard's greedy
pick passes at most as many images of each domain before it as the whole cache's does), and the
greedy pick over a list holding every image it would pick picks the same ones. Scores outside
the top-k are the engine's fast scores (within its proven bound of the exact ones) or exact
ones, as in an in-process search — a shard re-scores exactly the images its own bound cannot
rule out, a superset of the whole cache's.

A shard whose process dies is restarted by Ray, and a query it was answering is retried there;
one that cannot be restarted fails the query with `ShardError` naming it and the cause — never
a partial result — and the next query starts it again.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cache import FeatureCache, open_cache
from ..devices import resolve_device
from ..errors import error_line
from ..search import (
    Candidates,
    Exclude,
    MaskLike,
    QueryLike,
    RegionQuery,
    SearchResult,
    checked_k,
    checked_per_domain,
    eligible_images,
    excluded_images,
    region_query,
    search_regions,
    select_top,
)
from ..settings import is_url
from . import alive_nodes, check_free, check_placeable, connect
from .rows import CacheRows

RESTARTS = 3
"""Restarts Ray makes of a shard whose process died (each reloads its rows), and retries of the
query it was answering."""


class ShardError(RuntimeError):
    """A shard could not answer: names the shard, its rows and the cause."""


@dataclass(frozen=True)
class ShardAnswer:
    """One shard's part of a search; `top` holds the cache's row indices (its scores: when asked)."""

    scores: np.ndarray | None
    placements: np.ndarray | None
    top: pd.DataFrame
    method: str
    device: str
    rescored: int
    elapsed_ms: float  # the engine's time in the shard


class Shard:
    """A shard's actor: rows start..stop-1 of the cache, resident on its device, searched by the engine."""

    def __init__(self, location: str, start: int, stop: int, device: str, allow_partial: bool):
        self.rows = CacheRows(
            open_cache(location, allow_partial=allow_partial), start, stop, resolve_device(device)
        )

    def search(
        self,
        query: RegionQuery,
        k: int,
        per_domain: int | None,
        candidates: Candidates,
        all_scores: bool,
        all_exact: bool,
    ) -> ShardAnswer:
        r = search_regions(
            self.rows,
            query,
            k=k,
            per_domain=per_domain,
            candidates=candidates,
            device=self.rows.device,
            all_exact=all_exact,
        )
        top = r.top.assign(index=r.top["index"] + self.rows.start)
        scores, placements = (r.scores, r.placements) if all_scores else (None, None)
        return ShardAnswer(scores, placements, top, r.method, r.device, r.rescored, r.elapsed_ms)

    def status(self) -> dict[str, Any]:
        """What this shard holds, and what its process has cost (docs/scale.md)."""
        return {
            "pid": os.getpid(),
            "rows": (self.rows.start, self.rows.stop),
            "device": str(self.rows.device),
            "resident_bytes": self.rows.nbytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


class ShardedSearch:
    """`search_regions` over a cache held by `shards` Ray actors; the same `search(...)` → `SearchResult`.

    `cache` is an opened cache (opened with `allow_partial=True`, it is searched so) or its location.
    `address` is the Ray cluster ("auto", "ray://host:10001"); None joins this machine's running
    cluster, else starts a local one. Shards ask for `cpus_per_shard` CPUs and `gpus_per_shard` GPUs
    each (default: an even share of the cluster's GPUs, at most one, so several shards can share a
    GPU; none on a CPU cluster).
    """

    def __init__(
        self,
        cache: str | Path | FeatureCache,
        shards: int = 4,
        address: str | None = None,
        device: str = "auto",
        allow_partial: bool = False,
        cpus_per_shard: float = 1.0,
        gpus_per_shard: float | None = None,
    ):
        cache_location = cache.location if isinstance(cache, FeatureCache) else cache
        if isinstance(cache, FeatureCache):  # opened with allow_partial: so it is searched (review)
            allow_partial = allow_partial or cache.allow_partial
        self.cache = open_cache(cache_location, allow_partial=allow_partial)  # its attributes, a query's row
        n = self.cache.shape[0]
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= n:
            raise ValueError(f"shards must be 1..{n} (the cache's images), not {shards!r}")
        connect(address)  # after the checks: a bad cache or count starts no cluster
        import ray

        edges = [round(i * n / shards) for i in range(shards + 1)]
        self.ranges = list(zip(edges[:-1], edges[1:]))
        gpus = (
            min(1.0, ray.cluster_resources().get("GPU", 0.0) / shards)
            if gpus_per_shard is None
            else gpus_per_shard
        )
        wanted, what = [{"CPU": cpus_per_shard, "GPU": gpus}] * shards, f"{shards} search shards"
        check_placeable(wanted, alive_nodes(), f"{what} (cpus_per_shard, gpus_per_shard)")
        check_free(wanted, what)
        self._actor = ray.remote(Shard).options(
            num_cpus=cpus_per_shard, num_gpus=gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS
        )
        location = str(cache_location)  # a local path as the driver means it, whatever a worker's folder
        self._args = (location if is_url(location) else str(Path(location).resolve()), device, allow_partial)
        self._down: set[int] = set()
        self.shard_ms: list[float] = []  # the engine's time in each shard in the last search (the rest: Ray)
        self._shards = [self._start(i) for i in range(shards)]
        self._gather([s.status.remote() for s in self._shards], starting=True)  # every shard holds its rows

    def _start(self, i: int) -> Any:
        location, device, allow_partial = self._args
        return self._actor.remote(location, *self.ranges[i], device, allow_partial)

    def _gather(self, refs: list, starting: bool = False) -> list:
        """Every shard's answer, or an error naming the first shard that could not answer (every
        answer is collected first: Ray reports an error no one collected as unhandled). `starting`:
        a shard whose constructor fails is said to be unable to start (no search would restart it);
        later, a restart that fails is a shard down (the next search tries again)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        out, errors = [], []
        for i, ref in enumerate(refs):
            a, b = self.ranges[i]
            try:
                out.append(ray.get(ref))
            except RayTaskError as e:  # raised by the engine: a user's error comes back as itself
                user = isinstance(e.cause, ValueError)  # bad query, mask, k …; CacheError
                errors.append(
                    e.cause
                    if user
                    else ShardError(
                        f"shard {i} (rows {a}..{b - 1}) failed: {type(e.cause).__name__}: {e.cause}"
                    )
                )
            except RayActorError as e:
                if starting and getattr(e, "actor_init_failed", False):  # its first constructor raised
                    why = error_line(e, "last")
                    errors.append(ShardError(f"shard {i} (rows {a}..{b - 1}) could not start: {why}"))
                    continue
                self._down.add(i)
                errors.append(
                    ShardError(
                        f"shard {i} (rows {a}..{b - 1} of {self.cache.location}) is down: "
                        f"{error_line(e, 'last')}; the next search starts it again"
                    )
                )
        if errors:
            raise errors[0]
        return out

    def status(self) -> list[dict[str, Any]]:
        """Each shard's pid, rows, device and memory."""
        return self._gather([s.status.remote() for s in self._shards])

    def search(
        self,
        query: QueryLike,
        mask: MaskLike | None = None,
        k: int | np.integer = 10,
        exclude: Exclude = None,
        per_domain: int | None = None,
        candidates: Candidates = None,
        all_scores: bool = True,
        all_exact: bool = False,
    ) -> SearchResult:
        """As `vfs.search_regions(cache, ...)`: the same top-k, ranks and scores (see the module's doc;
        other images' scores may differ in the last bit without `all_exact`: each shard re-scores
        exactly the images its own bound cannot rule out).

        `all_scores=False` brings back only the shards' top-ks: every other image's score is NaN and
        its placement (-1, -1). At 1.28 M images the scores and placements are 26 MB a query, the
        largest cost of a search whose caller shows only the ranked table (docs/scale.md).
        `all_exact=True`: every shard re-scores all its images in float64 (see `search_regions`)."""
        import ray

        t0 = time.perf_counter()
        if not self._shards:
            raise ShardError(
                "this cache's search shards were stopped (the cache was rebuilt, or close() was called): "
                "make a new ShardedSearch"
            )
        if self.cache.replaced_on_disk():  # the shards' rows are the old cache's; a query's row the new
            self.close()
            raise ShardError(
                f"the cache at {self.cache.location} was rebuilt since its shards started: "
                "make a new ShardedSearch"
            )
        for i in sorted(self._down):  # shards a previous query found dead
            self._shards[i] = self._start(i)
        self._down.clear()
        k, per_domain = checked_k(k), checked_per_domain(per_domain, self.cache)  # here, not once per shard
        n, h, w, _ = self.cache.shape
        rq = region_query(self.cache, query, mask)
        eligible = eligible_images(n, candidates, exclude)
        shared = ray.put(rq)
        answers: list[ShardAnswer] = self._gather(
            [
                s.search.remote(
                    shared,
                    k,
                    per_domain,
                    None if eligible[a:b].all() else eligible[a:b],
                    all_scores,
                    all_exact,
                )
                for s, (a, b) in zip(self._shards, self.ranges)
            ]
        )
        self.shard_ms = [a.elapsed_ms for a in answers]
        found = [a.top for a in answers if len(a.top)] or [answers[0].top]  # empty tables lose the dtypes
        tops = pd.concat(found, ignore_index=True).sort_values("index", ignore_index=True)
        domains = tops["domain"].to_numpy() if per_domain is not None else None
        every = np.ones(len(tops), dtype=bool)
        picked = select_top(tops["score"].to_numpy(), every, k, domains, per_domain)
        if all_scores:
            scores = np.concatenate([a.scores for a in answers])
            placements = np.concatenate([a.placements for a in answers])
        else:
            scores, placements = np.full(n, np.nan, dtype=np.float32), np.full((n, 2), -1, dtype=np.int64)
            scores[tops["index"]] = tops["score"]
            placements[tops["index"]] = [box[:2] for box in tops["grid_box"]]
        return SearchResult(
            scores,
            placements,
            tops["index"].to_numpy(np.int64)[picked],  # its table as the cache describes these rows
            rq,
            (h, w),
            answers[0].method,
            answers[0].device,
            (time.perf_counter() - t0) * 1e3,
            sum(a.rescored for a in answers),
            excluded_images(n, exclude),
            int(eligible.sum()),
            candidates is not None,
            k,
            per_domain,
            self.cache,
        )

    def close(self) -> None:
        """Stop the shards (they also stop when this object is garbage-collected)."""
        import ray

        for s in self._shards:
            ray.kill(s)
        self._shards = []

    def __enter__(self) -> ShardedSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
