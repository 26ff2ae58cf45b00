"""Exact region search: the cosine similarity of a masked query window against every
placement of that window in every dataset image, each image keeping its best placement.

Every image is scored fast (`vfs.scoring`: fp16, bf16 or fp32 operands, a proven bound on each
score's error; bf16's wider one narrowed by fp16 scores of the images it cannot rule out);
the fast top-k is re-scored in float64, then every image whose upper bound reaches the exact k-th
score, so the returned top-k and its scores are exact (to float32, in which scores are returned);
other images keep fast scores.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeGuard

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .devices import memory_bytes, resolve_device, working_bytes
from .masks import mask_values
from .scoring import (
    ExactScore,
    FastBound,
    FastOutputs,
    QueryGeometry,
    RegionQuery,
    Scorer,
    exact_device,
    exact_scorer,
    exact_scores,
    fast_dtype,
    plan_query,
    uses_pairs,
)
from .sources import ArrayFeatures, BeyondFp16, FeatureSource, UnpreparedArray, fp16_with_norms, some_images
from .sources import prepared as prepared_array

__all__ = ["RegionQuery", "SearchResult", "search_regions"]

Exclude = int | Iterable[int] | np.ndarray | torch.Tensor | None
"""Images kept out of a ranking: an index, several, or a boolean array of one entry per image."""
Candidates = np.ndarray | torch.Tensor | None
"""Images that may be ranked: a boolean array of one entry per image (numpy, or torch on any device)."""
MaskLike = np.ndarray | torch.Tensor | Sequence[Sequence[float]]
"""A soft mask on the feature grid: (h, w) weights ≥ 0 (`vfs.grid_mask` makes one of a drawing)."""
QueryLike = np.ndarray | torch.Tensor | int | np.integer | RegionQuery | str | Path | Image.Image
"""What a search is for: a query image's (h, w, C) features, the index of an image in the source,
a `RegionQuery` (its mask with it), or — searching a feature cache — an image: a path, a PIL image
or 8-bit pixels, made into features by the cache's own model."""

_REFINE_ALL_SHARE = 0.5
"""Past this share of the images to refine, one fp16 pass over all costs less than gathering them
(a gathered image costs ≈ 1.5 of a pass's per image: its copy, then the same product)."""
_REFINE_MIN_VALUES = 1 << 18
"""Images to refine holding fewer feature values than this are re-scored in float64 directly:
≈ 1 ms, what a refining round costs besides its products (measured on 13 Lite0 images)."""
_SETTLE_MARGIN = 1e-9
"""A window's float64 score settles its image only where the runner-up bound lies below it by more
than its own rounding (≈ K·C·2⁻⁵³ of it, < 1e-10 for 10⁶ terms): a tie at an earlier placement
must never settle, whatever bound comes (today's carry 5% slack above their worst case)."""
_STALE = 1e-5
"""A ranked image's best placement scored anew differs from its search's exact score by more than
this only where its features changed: both are float64 sums of the same values, rounded to float32."""
_BLOCK_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}
"""Images re-scored at once hold at most this in the type they are scored in (fp16 or float64),
in one buffer reused across blocks. On a CPU fresh temporaries cost their page faults, which on
some VMs exceed the arithmetic; on a GPU every block costs launches and a wait for its copy back
(16 MiB blocks of 14×14×1024 images, 10 at a time, took 262 ms for 5,662 images on an H200)."""


@dataclass(frozen=True)
class FastPass:
    """Per image: its best fast score and that placement (y, x), the largest upper bound over its
    placements, and the largest over the others (see `_FastScoring`). Re-scoring replaces scores
    and placements in place."""

    scores: np.ndarray  # (N,) float32
    placements: np.ndarray  # (N, 2) int
    upper: np.ndarray  # (N,) float32
    runner_up: np.ndarray  # (N,) float32


@dataclass(frozen=True)
class SearchResult:
    """Every image's best score and placement, and the ranked top-k."""

    scores: np.ndarray  # (N,) float32, each image's best score
    placements: np.ndarray  # (N, 2) int, top-left grid cell (y, x) of each image's best window
    top_indices: np.ndarray  # (k,) int64, the ranked images, best first
    query: RegionQuery
    grid: tuple[int, int]
    method: str
    device: str
    elapsed_ms: float
    rescored: int  # images re-scored exactly because the fast bound could not rank them
    excluded: np.ndarray  # (sorted) the images `exclude` kept out of the ranking, e.g. the query
    ranked: int  # the images that could be returned: `candidates` (e.g. a label filter) less `exclude`
    filtered: bool  # whether `candidates` limited them
    asked: int  # k
    per_domain: int | None  # the cap on results per domain, if any
    source: FeatureSource = field(repr=False)

    @cached_property
    def top(self) -> pd.DataFrame:
        """The ranked table: rank, index, score, grid_box (and pixel_box, path, label, domain where
        the source knows them). Built when first read, not by the search: 0.5–0.8 ms of pandas after
        the features' pass has emptied the CPU's caches, which a caller of scores alone (statistics,
        a loop over queries) need not pay."""
        return _top_table(self.scores, self.placements, self.query.mask.shape, self.top_indices, self.source)

    def grid_box(self, index: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), end-exclusive, of image `index`'s best window on the grid."""
        (index,) = image_indices(index, len(self.scores), "image")
        return _grid_box(self.placements[index], self.query.mask.shape)

    def grid_boxes(self) -> list[tuple[int, int, int, int]]:
        """Every image's `grid_box`, in one pass: the per-image exports' column (a call per image
        checked its index each time, seconds at a million images)."""
        (mh, mw), p = self.query.mask.shape, self.placements
        return list(zip(*(c.tolist() for c in (p[:, 0], p[:, 1], p[:, 0] + mh, p[:, 1] + mw)), strict=True))

    def images_ranked(self) -> str:
        """What was searched: "300 images", or "83 of 300 images" under `candidates` (a label filter)."""
        n = len(self.scores)
        return f"{self.ranked} of {n} images" if self.filtered else f"{n} images"

    def summary(self) -> str:
        """One line: what was ranked, how, and in what time."""
        (mh, mw), (h, w) = self.query.mask.shape, self.grid
        return (
            f"top {len(self.top_indices)} of {self.images_ranked()} for a {mh}×{mw}-cell region of the "
            f"{h}×{w} grid ({self.method}, {self.device}, {self.elapsed_ms:.1f} ms, "
            f"{self.rescored} re-scored exactly)"
        )

    def caption(self) -> str:
        """The line a page, the notebook widget and the CLI show over the ranked results: e.g. "10
        results from 213 images in 23 ms (pairs, cpu); 1 image left out", "… from 83 of 300 images
        …" under `candidates`; and why, where fewer than the k asked came back (4 of 5 at one per
        domain read as a search that lost one)."""
        found = len(self.top_indices)
        why = ""
        if found < self.asked:
            # images were left unranked: the cap held them
            capped = self.per_domain is not None and self.ranked > found
            limit = f"at most {self.per_domain} per domain" if capped else "no more images to rank"
            why = f" — {found} of the {self.asked} asked: {limit}"
        left_out = len(self.excluded)  # the query, the images sharing its patient, …: ranked nowhere
        out = f"; {left_out} image{'' if left_out == 1 else 's'} left out" if left_out else ""
        results = f"{found} result{'' if found == 1 else 's'} from {self.images_ranked()}"
        return f"{results} in {self.elapsed_ms:.0f} ms ({self.method}, {self.device}){out}{why}"

    def __repr__(self) -> str:  # not the arrays: a notebook cell ending in a search printed pages of them
        return f"SearchResult: {self.summary()}\n{self.top.to_string(index=False)}"

    def _repr_html_(self) -> str:  # Jupyter's: the summary over the ranked table
        return f"<p>SearchResult: {html.escape(self.summary())}</p>{self.top.to_html(index=False)}"

    def grid_mask(self) -> np.ndarray:
        """(h, w) the region's weights on the grid (peak 1), as searched."""
        mask = np.zeros(self.grid, dtype=np.float32)
        y0, x0, y1, x1 = self.query.mask.query_box()
        mask[y0:y1, x0:x1] = self.query.mask.weights
        return mask

    def figure(
        self,
        query_view: np.ndarray | Image.Image | int,
        columns: int = 5,
        title: str | None = None,
        query_caption: str | None = None,
    ) -> Image.Image:
        """The paper's figure as a PIL image (`.save("figure.png")`; the app's "Download figure"):
        the query with the region over it — `query_view`, its view as the model saw it, or its index in
        the cache searched ("query #3" under it, or `query_caption`) — then the matches, best windows
        outlined, ranked, scored and tagged. Needs the images: a feature cache's thumbnails."""
        from .render import ranked_matches, results_figure

        thumbs_at = getattr(self.source, "thumbs_at", None)
        if thumbs_at is None:
            raise TypeError("a figure needs the images: search a feature cache (plain features hold none)")
        if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
            raise ValueError(f"columns is a whole number ≥ 1 of matches a row, not {columns!r}")
        sides = {thumbs_at([]).shape[1], getattr(getattr(self.source, "spec", None), "input_size", 0)} - {0}
        view, caption = _query_view(query_view, thumbs_at, sides)
        matches = ranked_matches(self.top, thumbs_at(self.top["index"].to_numpy()))
        caption = caption if query_caption is None else query_caption
        return results_figure(view, self.grid_mask(), matches, self.grid, columns, title, caption)

    def placement_scores(self, index: int) -> np.ndarray:
        """(Ph, Pw) exact scores of every placement in one image: the Search page's heat map, read
        from the features the search read. Where those are an array written in place since (searched
        as it is, or viewed in fp16), a ranked image whose best score no longer matches is refused
        rather than shown beside its old score."""
        (index,) = image_indices(index, len(self.scores), "image")
        scores = exact_scores(self.source.rows(np.array([index])), self.query)[0]
        if index in self.top_indices and abs(scores.max() - self.scores[index]) > _STALE:
            raise ValueError(
                f"image {index}'s features changed since this search (its best score was "
                f"{self.scores[index]:.6f}, now {scores.max():.6f}): search again"
            )
        return scores


def _query_view(
    query_view: object, thumbs_at: Callable[[list[int]], np.ndarray], sides: set[int]
) -> tuple[np.ndarray, str]:
    """A figure's query tile and its caption: the view at an index of the cache ("query #3"), or
    one given — square, as the model sees it, of its input size or its thumbnails' (`sides`): a
    photo's region would be drawn out of place, and a square photo is no view either (PACS's)."""
    how = "for an image query, its view: cache.spec.preprocess.view(image)"
    if isinstance(query_view, (int, np.integer)) and not isinstance(query_view, bool):
        return thumbs_at([int(query_view)])[0], f"query #{int(query_view)}"
    if not isinstance(query_view, (np.ndarray, Image.Image)):
        raise TypeError(
            "query_view is the query's index in the cache searched or its view as the model saw it "
            f"(an (H, W, 3) uint8 array or a PIL image, e.g. cache.thumb(i)), not {query_view!r}; {how}"
        )
    view = np.asarray(query_view.convert("RGB") if isinstance(query_view, Image.Image) else query_view)
    if view.ndim != 3 or view.shape[2] != 3 or view.shape[0] != view.shape[1] or view.dtype != np.uint8:
        raise ValueError(
            f"query_view must be the square view the model saw, (H, H, 3) uint8, not {view.shape} "
            f"{view.dtype} — the photo itself? The region would be drawn out of place; {how}"
        )
    if view.shape[0] not in sides:
        raise ValueError(
            f"query_view is {view.shape[0]} px square, where the model's view is "
            f"{' or '.join(f'{side} px' for side in sorted(sides, reverse=True))} (its input, its "
            f"thumbnail) — the photo itself? The region would be drawn out of place; {how}"
        )
    return view, "query"


SAME_IMAGE = 1 - 1e-5
"""The whole-map cosine above which a query image is taken for one of the searched images: the same
file gives the same features up to their fp16 rounding and another machine's arithmetic (≈ 1 − 1e-7);
another picture, or the same one saved again as a JPEG, lies well below."""


def image_searched(
    search: Callable[..., SearchResult], query: QueryLike, grid: tuple[int, int]
) -> int | None:
    """The searched image a query image is, if any (an upload, or a file of the dataset, named by
    its path), found by `search` (`search_regions` on a source, a sharded search's) of the whole
    grid for its features: searched as a query image, it ranked among the others with a score of
    about 1 — and was counted in statistics said to leave the query out. None too where nothing was
    ranked (a cache of no images)."""
    result = search(query, np.ones(grid), k=1)
    if not len(result.top_indices):
        return None
    best = int(result.top_indices[0])
    return best if result.scores[best] >= SAME_IMAGE else None


def _grid_box(placement: np.ndarray, mask_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    (y, x), (mh, mw) = placement, mask_shape
    return int(y), int(x), int(y + mh), int(x + mw)


def select_top(
    scores: np.ndarray, eligible: np.ndarray, k: int, domains: np.ndarray | None, per_domain: int | None
) -> np.ndarray:
    """Indices of the top k eligible images, best first, with at most `per_domain` per domain."""
    order = np.flatnonzero(eligible)
    neg = -scores[order]  # ascending, stable: best first, ties by index, NaN (an overflowed fast score) last
    if (per_domain is None or domains is None) and len(order) > k:
        # Only what can be in the top k is sorted (argsort of 50,000 scores takes ms): every
        # score ≥ the k-th largest, ties included, so ties still rank by index.
        kth = _kth_smallest(neg, k)
        if not np.isnan(kth):
            order, neg = order[neg <= kth], neg[neg <= kth]
    order = order[np.argsort(neg, kind="stable")]
    if per_domain is None or domains is None:
        return order[:k]
    taken: dict[object, int] = {}
    picked = []
    for i in order:
        d = domains[i]
        if taken.get(d, 0) < per_domain:
            taken[d] = taken.get(d, 0) + 1
            picked.append(i)
            if len(picked) == k:
                break
    return np.asarray(picked, dtype=np.int64)


_SAMPLE = 4096
"""`_kth_smallest` looks for its value among this many evenly spaced values first."""


def _kth_smallest(values: np.ndarray, k: int) -> float:
    """The k-th smallest of `values`, NaN ordered last (as `np.partition` orders): found among the
    values at most the k-th smallest of an evenly spaced sample — at least k values, and every one
    that can be the k-th — where the values are many (a partition of 50,000 takes 0.46 ms on Zen 4,
    twice per search; of the sample and the few left, ≈ 0.1)."""
    if len(values) >= 4 * _SAMPLE:
        sample = values[:: len(values) // _SAMPLE]
        bound = np.partition(sample, k - 1)[k - 1] if len(sample) >= k else np.nan
        if not np.isnan(bound):
            values = values[values <= bound]
    return float(np.partition(values, k - 1)[k - 1])


def search_regions(
    source: FeatureSource | np.ndarray | torch.Tensor,
    query: QueryLike,
    mask: MaskLike | None = None,
    k: int | np.integer = 10,
    exclude: Exclude = None,
    per_domain: int | None = None,
    candidates: Candidates = None,
    device: str | torch.device = "auto",
    memory_budget: int | str | None = None,
    all_exact: bool = False,
) -> SearchResult:
    """Rank every image of `source` by its best placement of the masked query region.

    `source`: a feature cache (`vfs.open_cache`), an `ArrayFeatures`, or an (N, h, w, C) numpy
    array or torch tensor of any real type (channels last: permute a CNN's (N, C, h, w) first; a
    view costs nothing), searched as it is now on every call — never stale after writes (but for
    those that bypass a GPU tensor's version counter, through `.data` or DLPack: README).

    `query` (see `QueryLike`): an image's (h, w, C) features, the index of an image in `source`, or —
    searching a cache — an image (a path, a PIL image, 8-bit pixels) made into features by the
    cache's model; with `mask`, the (h, w) soft weights on the grid (numpy, torch or lists;
    `vfs.grid_mask` makes them of a drawing). Or a `RegionQuery`, which carries its mask.

    `candidates` (bool, N) limits which images may be returned (e.g. a label filter); `exclude`
    removes images: an index, several, or a boolean array (N). The query image is not left out
    unless excluded (the app and the CLI leave it out). `per_domain=n` keeps at most n results per
    domain (needs a source with domains: a cache's domain column, `ArrayFeatures(…, domains=…)`).
    `all_exact=True` re-scores every image in float64, not only those the bound cannot rule out
    of the top-k: statistics over every image's score (the Distributions page's) then read alike on
    every machine, whatever its fast pass ran (0.05–0.25 s more at 10,000 × 7×7×192 on 2 cores).
    `device`: "auto" (cuda, then mps, then cpu) or a torch device. `memory_budget`: bytes or text
    ("2GB") a cache may take in memory before it is streamed from disk.

    Returns a `SearchResult`: every image's best score and placement, the ranked images
    (`top_indices`) and their `top` table, and `placement_scores(i)`, one image's scores at every
    placement. The top-k's scores are exact.
    """
    t0 = time.perf_counter()
    k = checked_k(k)
    if not hasattr(source, "chunks") and not isinstance(source, (np.ndarray, torch.Tensor)):
        raise TypeError(
            "source must be a feature cache (vfs.open_cache), a FeatureSource or an (N, h, w, C) numpy "
            f"array or torch tensor, not {type(source).__name__}"
        )
    per_domain = checked_per_domain(per_domain, source)
    budget = None if memory_budget is None else memory_bytes(memory_budget)
    options = _Options(k, exclude, per_domain, candidates, budget, all_exact)
    dev = resolve_device(device)
    dtype = fast_dtype(dev, source.shape[-1])
    if dtype == torch.float32 and not _ieee_fp32(dev):
        dtype = torch.float16  # fp32 products would run in bf16 / TF32, outside fp32's bound
    if isinstance(source, UnpreparedArray):  # e.g. a result's `source`: its array, on any device, in any type
        source = source.array
    if isinstance(source, (np.ndarray, torch.Tensor)):
        # A copy in another type than fp16 costs its page faults on the first call (67–145 ms for
        # 200 MB on a VM) and the memory of a second array: where the pairs kernel reads fp16
        # (1.2–1.4× its bf16 time on Zen 4, with a tighter bound), an array is searched as it is —
        # an fp32 one too where the kernel's fp32 run beats oneDNN's, rounded to fp16 as it is read
        # (its fp16 copy took 9× the search: 75–90 ms for 1,000 × 7×7×2048 on Zen 4). One whose
        # copy loses values (`BeyondFp16`) is prepared anew, scaled, on every call: kept, its
        # preparation would have the blind spots that searching it as it is has not.
        c = source.shape[-1]
        pairs = dev.type == "cpu" and uses_pairs(dev, torch.float16, c)
        if pairs and UnpreparedArray.takes(source):
            unprepared = UnpreparedArray(source)
            if uses_pairs(dev, unprepared.array.dtype, c):
                try:
                    return _search(unprepared, unprepared.array.dtype, dev, query, mask, options, t0)
                except BeyondFp16:
                    return _search(ArrayFeatures(source), torch.float16, dev, query, mask, options, t0)
        array = prepared_array(source, dtype if dev.type == "cpu" and not pairs else torch.float16)
        if dev.type == "cpu":  # bf16 or fp32 where the preparation is kept for the next calls
            dtype = array.cpu_dtype
        source = array
    return _search(source, dtype, dev, query, mask, options, t0)


def checked_k(k: object) -> int:
    """`k` as a number of results, or a ValueError that says what it is instead."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a whole number of results ≥ 1, not {k!r}")
    return int(k)


def checked_per_domain(per_domain: object, source: object) -> int | None:
    """`per_domain` as the most results a domain may have (None: no limit) in a search of `source`,
    or a ValueError: not a whole number ≥ 1, or a source without domains (a cache without a domain
    column, an array)."""
    if per_domain is None:
        return None
    if isinstance(per_domain, bool) or not isinstance(per_domain, (int, np.integer)) or per_domain < 1:
        raise ValueError(f"per_domain must be a whole number ≥ 1 (or None for no limit), not {per_domain!r}")
    if getattr(source, "domains", None) is None:
        location = getattr(source, "location", None)
        where = f"the cache at {location}" if location else "this source"
        raise ValueError(f"per_domain needs a dataset with a domain column; {where} has none")
    return int(per_domain)


@dataclass(frozen=True)
class _Options:
    """What `search_regions` was asked for beyond its source and query."""

    k: int
    exclude: Exclude
    per_domain: int | None
    candidates: Candidates
    memory_budget: int | None
    all_exact: bool


def _search(
    source: FeatureSource,
    dtype: torch.dtype,
    dev: torch.device,
    query: QueryLike,
    mask: MaskLike | None,
    options: _Options,
    t0: float,
) -> SearchResult:
    """`search_regions` of a source, its fast products in `dtype` on `dev`."""
    k, exclude, per_domain, candidates = options.k, options.exclude, options.per_domain, options.candidates
    memory_budget, all_exact = options.memory_budget, options.all_exact
    n, h, w, c = source.shape
    rq = region_query(source, query, mask)
    if rq.features.shape[-1] != c:
        raise ValueError(
            f"the query has {rq.features.shape[-1]} channels, the dataset {c}: different layers?"
        )
    geometry = QueryGeometry.create(rq, (h, w))
    if geometry.ph == geometry.pw == 1 and source.resident_on(dev) is not None:
        # One placement: the pairs kernel's fp16 run (fp32-tight bound) or torch's fp16 gemv, each
        # at about the read speed, with a bound 2⁵ tighter than bf16's at least; past the gemv's
        # `_WHOLE_MAX_TERMS`, the band form in fp16 too (in bf16 its bound needed a second pass on
        # packed scores: 97 ms against 52 at 2,000 × 14×14×768 without the kernel, Zen 4).
        dtype = torch.float16
    fast = _FastScoring(rq, geometry, dev, source.nonnegative)

    found, sqnorm = _fast_pass(source, fast, dev, memory_budget, dtype)
    scores, upper = found.scores, found.upper
    eligible = eligible_images(n, candidates, exclude)
    domains = source.domains
    picked = select_top(scores, eligible, k, domains, per_domain)
    if sqnorm is not None and len(picked):
        # A bf16 bound is 2⁵ wider than fp16's: the images it cannot rule out get fp16 scores and
        # bounds first, so that few reach the float64 re-scoring — gathered, or where they are
        # most of the images (scores packed within the bound) and the fp16 features are held on
        # the device, in one more pass over all in fp16 (never a second copy of a cache).
        # A few go straight to the float64 re-scoring, which costs them less than a refining round.
        reach = np.flatnonzero(eligible & (upper >= scores[picked].min()))
        if len(reach) > _REFINE_ALL_SHARE * n and source.resident_on(dev) is not None:
            found, _ = _fast_pass(source, fast, dev, memory_budget, torch.float16)
            scores, upper = found.scores, found.upper
        elif len(reach) * h * w * c > _REFINE_MIN_VALUES:
            _refine(source, fast, dev, reach, sqnorm, found)
        picked = select_top(scores, eligible, k, domains, per_domain)
    exact = np.zeros(n, dtype=bool)
    rescore = _ExactScoring(source, rq, geometry, dev)
    overflowed = np.flatnonzero(~np.isfinite(scores))
    if len(overflowed):
        # Not a number: products beyond fp16's range (oneDNN's fp16 outputs, where the kernel does
        # not run), or features damaged since they were checked — float64 tells which.
        rescore(overflowed, found, exact)
        _check_finite(source, scores)
        picked = select_top(scores, eligible, k, domains, per_domain)
    if len(picked):
        # The fast top-k exactly, then every image whose bound reaches its k-th exact score: no
        # other image can enter the top-k (and under per_domain the greedy pick never reaches one).
        # The first round also takes the images whose bound reaches the fast k-th score: nearly all
        # that the second would, so the second (a fixed ≈ 1 ms) is usually empty.
        reach = np.flatnonzero(eligible & (upper >= scores[picked].min()))
        rescore(np.union1d(picked, reach), found, exact)
        kth = scores[picked].min()
        rescore(np.flatnonzero(eligible & ~exact & (upper >= kth)), found, exact)
        picked = select_top(scores, eligible, k, domains, per_domain)
    if all_exact:  # their bounds are below the k-th exact score: the top-k stays as it is
        rescore(np.flatnonzero(~exact), found, exact)

    elapsed_ms = (time.perf_counter() - t0) * 1e3
    return SearchResult(
        scores,
        found.placements,
        picked.astype(np.int64),
        rq,
        (h, w),
        fast.method or plan_query(rq, (h, w), dev, dtype).method,
        str(dev),
        elapsed_ms,
        int(exact.sum()),
        excluded_images(n, exclude),
        int(eligible.sum()),
        candidates is not None,
        k,
        per_domain,
        source,
    )


class _FastScoring:
    """Fast scores and their proven upper bounds for chunks in any of FAST_DTYPES (a source may
    hold its features in bf16 but stream them in fp16): a plan, scorer and bound per type, made
    once — the cheaper form differs between operand types."""

    def __init__(
        self, query: RegionQuery, geometry: QueryGeometry, device: torch.device, nonnegative: bool | None
    ):
        self.query, self.geometry, self.device = query, geometry, device
        self.nonnegative_source = nonnegative
        self._by_dtype: dict[torch.dtype, tuple[Scorer, FastBound]] = {}
        self.method = ""  # the form of the first chunk's scoring, for the result

    def __call__(
        self,
        x: torch.Tensor | list[torch.Tensor],
        sqnorm: torch.Tensor,
        out: FastOutputs | None = None,
        fill: bool = False,
    ) -> FastOutputs:
        """Per image of a chunk (into `out` where given): its best fast score, that placement's
        index (y·Pw + x), the largest upper bound over its placements, and the largest over its
        other placements (−∞ for one placement; ∞ where not computed: the fused GPU epilogue); a
        placement that overflowed bounds nothing (inf). `fill`: `sqnorm` is where the norms go, taken
        by the pairs kernel as it reads an `UnpreparedArray`'s slice (`search_regions` searches one
        only where the kernel runs on its type; in another form — forced by a test, or Triton's
        interpreted on the CPU — its fp16 copy is)."""
        dtype = _operand_dtype(x)
        if dtype not in self._by_dtype:
            plan = plan_query(self.query, self.geometry.grid, self.device, dtype)
            self._by_dtype[dtype] = (
                Scorer.fast(self.geometry, plan, self.device, dtype),
                FastBound.create(self.query, self.geometry, plan, dtype, self.device),
            )
            self.method = self.method or plan.method
        scorer, bound = self._by_dtype[dtype]
        # Unknown (None) where the kernel takes the norms: the bound for either sign, wider than the
        # relative one by eps·(1 − score); with its fp32 sums eps ≈ 1.4e-4 for a 3×3 region at 2,048
        # channels, growing with the region's cells (1.7e-4 for 14×14).
        nonnegative = bool(self.nonnegative_source) and bound.nonnegative_weights
        n = _images_in(x)
        if out is None:
            dev = self.device  # fp32 whatever torch's default type (the kernel writes fp32)
            out = (
                torch.empty(n, dtype=torch.float32, device=dev),
                torch.empty(n, dtype=torch.int64, device=dev),
                torch.empty(n, dtype=torch.float32, device=dev),
                torch.empty(n, dtype=torch.float32, device=dev),
            )
        if fill and scorer.pairs is None:  # another form than the kernel's: the slice's fp16 copy
            assert isinstance(x, torch.Tensor)
            fp16, norms = fp16_with_norms(x)
            sqnorm.copy_(norms)  # checked after the pass, as the kernel's are
            return self(fp16, sqnorm, out)
        if scorer.fuses(x):
            return scorer.best_placements(x, sqnorm, bound, nonnegative, out, fill)
        wnorm = scorer.window_norms(sqnorm)
        scores = scorer.scores(x, wnorm)
        upper = bound.upper(scores, wnorm, nonnegative)  # NaN or ±∞ exactly where the score is
        upper.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)
        torch.max(scores.flatten(0, 1), 0, out=out[:2])
        bounds = upper.flatten(0, 1)
        torch.amax(bounds, 0, out=out[2])
        bounds.scatter_(0, out[1].unsqueeze(0), -math.inf)  # the best placement's own bound out
        torch.amax(bounds, 0, out=out[3])
        return out


def _ieee_fp32(device: torch.device) -> bool:
    """Whether fp32 products on `device` round as fp32 (no TF32 / bf16 passes): `torch.
    set_float32_matmul_precision("high" | "medium")`, common in training code, lets oneDNN and
    cuBLAS use them."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backend = torch.backends.mkldnn if device.type == "cpu" else torch.backends.cuda
    return getattr(getattr(backend, "matmul", None), "fp32_precision", "ieee") in ("ieee", "none")


def _fast_pass(
    source: FeatureSource,
    fast: _FastScoring,
    device: torch.device,
    memory_budget: int | None,
    dtype: torch.dtype,
) -> tuple[FastPass, torch.Tensor | None]:
    """Every image's fast results over the source's chunks in `dtype`; and, where some chunk came
    in bf16 (coarser than the features as stored), every cell's squared norm, for refining (a few
    MB: n·h·w fp32). An `UnpreparedArray`'s norms are taken by the kernel, then checked."""
    n, h, w, _ = source.shape
    best = torch.empty(n, dtype=torch.float32, device=device)  # on the device: one copy back, no sync
    where = torch.empty(n, dtype=torch.int64, device=device)
    upper = torch.empty(n, dtype=torch.float32, device=device)
    runner = torch.empty(n, dtype=torch.float32, device=device)
    sqnorm = torch.empty((n, h, w), device=device) if dtype == torch.bfloat16 else None
    taken = torch.empty((n, h, w), dtype=torch.float32) if isinstance(source, UnpreparedArray) else None
    coarse = False
    with torch.inference_mode():
        for start, x, sq in source.chunks(device, memory_budget, dtype):
            stop = start + _images_in(x)
            out = (best[start:stop], where[start:stop], upper[start:stop], runner[start:stop])
            if taken is not None:
                fast(x, taken[start:stop], out, fill=True)
            else:
                assert sq is not None
                fast(x, sq, out)
            if sqnorm is not None and sq is not None:  # every chunk's: a refined image may come from any
                sqnorm[start:stop] = sq
                coarse = coarse or _operand_dtype(x) == torch.bfloat16
    if isinstance(source, UnpreparedArray):
        assert taken is not None
        source.check_norms(taken)
    placements = _grid_placements(where.cpu().numpy(), fast.geometry.pw)
    found = FastPass(best.cpu().numpy(), placements, upper.cpu().numpy(), runner.cpu().numpy())
    return found, sqnorm if coarse else None


def _grid_placements(where: np.ndarray, pw: int) -> np.ndarray:
    """(n, 2) int64 top-left cells (y, x) of placement indices y·pw + x: one pass, no stacked copy."""
    placements = np.empty((len(where), 2), dtype=np.int64)
    np.divmod(where, pw, out=(placements[:, 0], placements[:, 1]))
    return placements


def _operand_dtype(x: torch.Tensor | list[torch.Tensor]) -> torch.dtype:
    return (x[0] if isinstance(x, list) else x).dtype


def _images_in(x: torch.Tensor | list[torch.Tensor]) -> int:
    return sum(len(part) for part in x) if isinstance(x, list) else len(x)


def _refine(
    source: FeatureSource,
    fast: _FastScoring,
    device: torch.device,
    indices: np.ndarray,
    sqnorm: torch.Tensor,
    found: FastPass,
) -> None:
    """Replace some images' coarse fast results by fp16 ones (the features as stored, their squared
    norms as the first pass had them), 2⁵ tighter."""
    _, h, w, c = source.shape
    for part, x in _row_blocks(source, indices, device, 2 * h * w * c):
        with torch.inference_mode():
            index = torch.as_tensor(part, dtype=torch.long, device=device)
            best, where, upper, runner = fast(x, sqnorm.index_select(0, index))
            found.scores[part] = best.cpu().numpy()
            found.placements[part] = _grid_placements(where.cpu().numpy(), fast.geometry.pw)
            found.upper[part] = upper.cpu().numpy()
            found.runner_up[part] = runner.cpu().numpy()


def _check_finite(source: FeatureSource, scores: np.ndarray) -> None:
    """Refuse scores that are not numbers: stored features damaged since they were checked (a
    cache's bytes changed on disk; its squared norms, checked on every read, were not)."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(f"the stored features of {some_images(bad)} contain NaN or inf: {_damaged(source)}")


def region_query(source: FeatureSource, query: QueryLike, mask: MaskLike | None) -> RegionQuery:
    """The query of `search_regions` prepared, checked as it checks it (sharded searches share it)."""
    if isinstance(query, RegionQuery):
        if mask is not None:
            raise ValueError("a RegionQuery carries its own mask: pass no mask with it")
        return query
    if mask is None:
        raise ValueError("a mask is needed with a query feature map or index (see vfs.masks.grid_mask)")
    mask = mask_values(mask)
    if isinstance(query, (bool, np.bool_)):
        raise TypeError("the query is an image index, a feature map or a RegionQuery, not a bool")
    if isinstance(query, (np.ndarray, torch.Tensor)) and query.ndim == 0:  # np.argmax's, torch.argmax's
        value = query.item()
        if isinstance(value, bool):
            raise TypeError("the query is an image index, a feature map or a RegionQuery, not a bool")
        if not isinstance(value, int):
            raise TypeError(f"an image index is a whole number, not {value!r}")
        query = value
    if isinstance(query, (float, np.floating)):
        raise TypeError(f"an image index is a whole number, not {query!r}")
    n, h, w, c = source.shape
    if _is_image(query, (h, w)):
        query = _image_features(source, query)
    if mask.shape == (w, c) != (h, w):
        raise ValueError(
            f"the features look channels-first, (N, C, h, w) = {tuple(source.shape)}: search "
            "array.transpose(0, 2, 3, 1) (a tensor: .permute(0, 2, 3, 1)), a view that copies nothing"
        )
    if isinstance(query, (int, np.integer)):
        index = image_indices(int(query), source.shape[0], "query index")
        stored = source.rows(index)[0]
        if not np.isfinite(stored).all():
            raise ValueError(
                f"the stored features of the query image {int(query)} contain NaN or inf: {_damaged(source)}"
            )
        return RegionQuery.create(stored, mask)
    if not isinstance(query, (np.ndarray, torch.Tensor)):
        raise TypeError(
            "the query is an image index, (h, w, C) features, a RegionQuery or (searching a cache) an "
            f"image, not a {type(query).__name__}"
        )
    grid, cells = tuple(query.shape[:2]), tuple(source.shape[1:3])
    if query.ndim == 3 and grid != cells:
        image = ""
        if query.shape[0] in (3, 4) and query.dtype == np.uint8 and c not in (3, 4):
            image = " Or a channels-first image? Pass it as (H, W, 3): image.transpose(1, 2, 0)."
        elif query.shape[2] in (3, 4) and c not in (3, 4):
            image = (
                f" Or an image? A query image is 8-bit pixels ((H, W, 3) uint8) or a PIL image: this "
                f"{query.dtype} array was taken as features."
            )
        raise ValueError(
            f"the query's feature grid {grid} is not the dataset's {cells}: another layer or input "
            f"size?{image}"
        )
    return RegionQuery.create(query, mask)


def _damaged(source: FeatureSource) -> str:
    """What to do about damaged stored features: a cache's build repairs them when rerun."""
    location = getattr(source, "location", None)
    return (
        "the features are damaged"
        if location is None
        else f"{location} is damaged; rerun its build to repair it"
    )


def _is_image(query: object, grid: tuple[int, int]) -> TypeGuard[str | Path | Image.Image | np.ndarray]:
    """A query image rather than features: a path, a PIL image, or 8-bit pixels — (H, W) or
    (H, W, 3 | 4) uint8 off the feature grid (uint8 features on it are features)."""
    pixels = (
        isinstance(query, np.ndarray)
        and query.dtype == np.uint8
        and (query.ndim == 2 or (query.ndim == 3 and query.shape[2] in (3, 4)))
        and query.shape[:2] != grid
    )
    return isinstance(query, (str, Path, Image.Image)) or pixels


def _image_features(source: FeatureSource, image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """A query image's features by the cache's own model, layer and preprocessing: never a model
    that is code (a `python:` spec a cache may name), which the caller runs knowingly, as the CLI's
    `--trust-model-code` does."""
    from .cache import FeatureCache
    from .models import model_kind

    if not isinstance(source, FeatureCache):
        raise TypeError(
            "an image query needs a feature cache (vfs.open_cache), whose model makes its features; "
            "searching features of your own, pass the query image's (h, w, C) features"
        )
    if model_kind(source.spec.model).runs_user_code:
        raise ValueError(
            f"the cache's model {source.spec.model!r} is code that would run here: if you trust whoever "
            "built the cache, make the query's features yourself, cache.extractor().features(image)"
        )
    return source.extractor().features(image)


def eligible_images(n: int, candidates: Candidates, exclude: Exclude) -> np.ndarray:
    """(n,) which images may be returned: `candidates` (all when None) less `exclude`."""
    if isinstance(candidates, torch.Tensor):  # on a GPU too, as `exclude`
        candidates = candidates.cpu().numpy()
    if candidates is not None and np.asarray(candidates).dtype != np.bool_ and np.size(candidates):
        raise TypeError(
            f"candidates is a boolean array, one entry per image ({n}; True: may be returned), not "
            f"{np.asarray(candidates).dtype} values; of indices make one: np.isin(np.arange({n}), indices)"
        )
    eligible = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).copy()
    if eligible.shape != (n,):
        raise ValueError(f"candidates must be a boolean array of length {n}")
    eligible[excluded_images(n, exclude)] = False
    return eligible


def excluded_images(n: int, exclude: Exclude) -> np.ndarray:
    """The sorted indices of the images `exclude` names: an index, several, a boolean array of one
    entry per image (True: left out, as `candidates` takes one), or None: none."""
    if exclude is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(exclude, torch.Tensor):
        exclude = exclude.cpu().numpy()
    if isinstance(exclude, (int, np.integer, float, np.floating, np.ndarray, Sequence)) or hasattr(
        exclude, "to_numpy"
    ):
        excluded = np.asarray(exclude)  # not through a list: 1.28 M bools would take 45 ms
    elif isinstance(exclude, Iterable):  # a set, a generator
        excluded = np.asarray(list(exclude))
    else:
        raise TypeError(f"exclude names images by index (whole numbers) or a boolean mask, not {exclude!r}")
    if excluded.dtype == np.bool_:
        if excluded.shape != (n,):
            raise ValueError(f"a boolean exclude has one entry per image ({n}), not shape {excluded.shape}")
        return np.flatnonzero(excluded)
    if excluded.size and excluded.dtype.kind not in "iu":
        raise TypeError(f"exclude names images by index (whole numbers), not {excluded.dtype} values")
    if n > 2 and excluded.shape == (n,) and np.isin(excluded, (0, 1)).all():
        raise ValueError(
            f"exclude holds {n} zeros and ones, one per image: a mask? Pass it as booleans "
            "(mask.astype(bool)); indices of images to leave out: np.flatnonzero(mask)"
        )
    return np.unique(image_indices(excluded, n, "excluded image"))


def image_indices(indices: int | Iterable[int], n: int, what: str) -> np.ndarray:
    """`indices` as an int64 array, or a ValueError naming `what` and the range of the `n` images
    (numpy would wrap a negative index round to the end)."""
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    outside = index[(index < 0) | (index >= n)]
    if len(outside):
        where = f"outside 0..{n - 1}" if n else "not there: the source holds no images"
        raise ValueError(f"{what} {outside[0]} is {where}")
    return index


def _row_blocks(
    source: FeatureSource, indices: np.ndarray, device: torch.device, image_bytes: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """`indices` in consecutive blocks, each with its images' fp16 features on `device`, in one
    buffer: gathered from features the source holds on `device`, no host round trip from a GPU, else
    read from the source. A block holds at most `_BLOCK_BYTES` at `image_bytes` an image (what the
    caller makes of a block). One operation per block: many small ones wait on every busy core."""
    if not len(indices):
        return
    _, h, w, c = source.shape
    limit = working_bytes(_BLOCK_BYTES, device, free_share=8)
    per_block = min(len(indices), max(1, limit // image_bytes))
    resident = source.resident_on(device)
    buffer = torch.empty((per_block, h * w * c), dtype=torch.float16, device=device)
    flat = None if resident is None else resident.reshape(len(resident), -1)
    for start in range(0, len(indices), per_block):
        part = indices[start : start + per_block]
        block = buffer[: len(part)]
        if flat is None:
            block.copy_(torch.from_numpy(source.rows(part)).reshape(len(part), -1))
        else:
            torch.index_select(flat, 0, torch.as_tensor(part, dtype=torch.long, device=device), out=block)
        yield part, block.view(len(part), h, w, c)


class _ExactScoring:
    """Exact (float64) scores for the images the fast bound cannot rank. First at each image's
    fast-best placement alone, one window: where no other placement's upper bound reaches that
    exact score it is the image's best, and the best placement too (a tie would need a bound that
    reaches it) — nearly always. The other images at every placement. A window is mh·mw cell
    products, every placement h·w·K in the cells form (72 against 9,408 for a 48-cell blob on 14×14)."""

    def __init__(
        self, source: FeatureSource, query: RegionQuery, geometry: QueryGeometry, device: torch.device
    ):
        self.source, self.query, self.geometry = source, query, geometry
        self.device = exact_device(device)

    @cached_property
    def every_placement(self) -> ExactScore:
        return exact_scorer(self.geometry, self.device)

    @cached_property
    def window(self) -> ExactScore:
        """The region's window as a grid of its own: one placement, the same float64 definition."""
        return exact_scorer(QueryGeometry.create(self.query, self.query.mask.shape), self.device)

    def __call__(self, indices: np.ndarray, found: FastPass, exact: np.ndarray) -> None:
        """Replace some images' fast scores and placements in `found` by exact ones (those not
        exact yet: an overflowed image's bound stays ∞ after its re-scoring)."""
        indices = np.sort(indices[~exact[indices]])
        if self.geometry.ph * self.geometry.pw == 1:  # the window is every placement
            hopeful = indices[:0]
        else:  # ∞: not computed (fused on a GPU)
            hopeful = indices[found.runner_up[indices] < math.inf]
        settled = np.zeros(len(indices), dtype=bool)
        (mh, mw), pw = self.query.mask.shape, self.geometry.pw
        (h, w), c = self.geometry.grid, self.geometry.channels
        # an fp16 row, and its window in fp16, fp32 and float64 (the exact scorer's conversions)
        image_bytes = (2 * h * w + (2 + 4 + 8) * mh * mw) * c
        for part, x in _row_blocks(self.source, hopeful, self.device, image_bytes):
            py, px = (torch.as_tensor(found.placements[part][:, i], device=x.device) for i in (0, 1))
            rows = torch.arange(len(part), device=x.device)[:, None, None]
            ys = (py[:, None] + torch.arange(mh, device=x.device))[:, :, None]
            xs = (px[:, None] + torch.arange(mw, device=x.device))[:, None, :]
            best = self.window(x[rows, ys, xs]).reshape(-1)
            alone = found.runner_up[part] < best - _SETTLE_MARGIN * np.abs(best)
            found.scores[part[alone]] = best[alone]
            exact[part[alone]] = True
            settled[np.searchsorted(indices, part[alone])] = True
        # fp16 rows, each converted by the exact scorer via fp32 (half the time of fp16 → float64)
        for part, x in _row_blocks(self.source, indices[~settled], self.device, (2 + 4 + 8) * h * w * c):
            s = self.every_placement(x).reshape(len(part), -1)
            found.scores[part] = s.max(1)
            found.placements[part] = _grid_placements(s.argmax(1), pw)
            exact[part] = True


def _top_table(
    scores: np.ndarray,
    placements: np.ndarray,
    mask_shape: tuple[int, int],
    picked: np.ndarray,
    source: FeatureSource,
) -> pd.DataFrame:
    """The ranked table: what the pages show and the CLI prints."""
    boxes = [_grid_box(placements[i], mask_shape) for i in picked]
    columns = {
        "rank": np.arange(1, len(picked) + 1),
        "index": picked.astype(np.int64),
        "score": scores[picked].astype(float),
        "grid_box": boxes,
    }
    return pd.DataFrame(columns | source.describe_rows(picked, boxes))
