"""Whether two caches can be compared image by image (two models, two layers, two checkpoints).

Comparing rankings only means something when index i is the same image in both caches: the same
number of stored images and the same paths in the same order (a build that skipped an unreadable
image shifts every index after it). The dataset sources may be named differently — a manifest given
by another relative path, or the same dataset on another machine — which is said, not refused,
unless the caches show the same view of their images (one preprocessing: two layers, or an original
and an edited checkpoint) and a sample of their thumbnails differs: then they are other images under
the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from .models import PROBE_TOLERANCE, probe_difference

if TYPE_CHECKING:
    from .cache.format import CacheSpec


class _Cache(Protocol):
    """What the check reads of a cache (a `vfs.cache.FeatureCache` or a stand-in)."""

    spec: CacheSpec
    n: int

    @property
    def manifest(self) -> pd.DataFrame: ...

    def thumbs_at(self, indices: list[int]) -> np.ndarray: ...


SAMPLED = 16  # thumbnails compared where two differently named datasets show the same view
ALIKE = 4.0  # mean |difference| (of 255) two decodings of one image stay below (resizers' rounding)


def comparison_refusal(a: _Cache, b: _Cache) -> str | None:
    """Why caches `a` and `b` do not hold the same images in the same order (None when they do)."""
    other = _other_sources(a, b)
    if a.n != b.n:
        why = f"are they of {other}?" if other else "was one built with a limit, or did it skip images?"
        return f"they hold different numbers of images ({a.n} and {b.n}): {why}"
    paths_a, paths_b = a.manifest["path"].to_numpy(), b.manifest["path"].to_numpy()
    differ = np.flatnonzero(paths_a != paths_b)
    if differ.size:
        i = int(differ[0])
        if sorted(paths_a) == sorted(paths_b):
            why = (  # the same paths: of other datasets the pixels may differ too (review)
                "they list the same paths in another order (ranks compare image by image): "
                "build both from one order"
            )
        else:
            why = f"they are of {other}" if other else "one build skipped an image the other kept"
        return f"image {i} differs ({paths_a[i]!r} and {paths_b[i]!r}): {why}"
    unlike = _first_unlike(a, b) if other and a.spec.preprocess == b.spec.preprocess else None
    if unlike is not None:
        return f"image {unlike} ({paths_a[unlike]!r}) shows other pixels in each: they are of {other}"
    return None


def _first_unlike(a: _Cache, b: _Cache) -> int | None:
    """The first of SAMPLED evenly spaced images whose thumbnails differ, where both caches show
    one view of their images; None when all look alike."""
    sample = sorted({int(i) for i in np.linspace(0, a.n - 1, min(SAMPLED, a.n))})
    for i, x, y in zip(sample, a.thumbs_at(sample), b.thumbs_at(sample)):
        if x.shape != y.shape or np.abs(x.astype(np.int16) - y.astype(np.int16)).mean() > ALIKE:
            return i
    return None


def comparison_note(a: _Cache, b: _Cache) -> str | None:
    """What a user comparing `a` and `b` should know though they compare (None when nothing): that
    they were built from differently named dataset sources, taken as one by their paths; that one
    model spec gave other weights (a checkpoint rewritten between the builds), or the same features."""
    notes = []
    other = _other_sources(a, b)
    if other is not None:
        notes.append(
            f"built from {other}, their {a.n} images have the same paths in the same order: "
            "taken as one dataset"
        )
    x, y = a.spec, b.spec
    if x.model == y.model and x.weights and y.weights and x.weights != y.weights:
        notes.append(
            f"one model spec ({x.model}) with other weights ({short_weights(x)} and {short_weights(y)}): "
            "its checkpoint changed between the builds"
        )
    apart = None if x.probe is None or y.probe is None else probe_difference(x.probe, y.probe)
    same = ("model", "weights", "layer", "preprocess")
    if x.weights and (apart or 0) <= PROBE_TOLERANCE and all(getattr(x, n) == getattr(y, n) for n in same):
        notes.append("the same model, weights, layer and view: both hold the same features")
    if (  # (the probe image is made at the input size: at two sizes one model's probes differ)
        x.weights
        and x.weights == y.weights
        and (x.layer, x.input_size) == (y.layer, y.input_size)
        and apart is not None
        and apart > PROBE_TOLERANCE
    ):
        notes.append(
            f"the same weights compute other features at {x.layer} ({x.model} and {y.model}): another "
            "architecture took them (a near relative, e.g. efficientnet_lite0 for tf_efficientnet_lite0), "
            "not an edit of the weights, makes the difference"
        )
    return "; ".join(notes) or None


def short_weights(spec: CacheSpec) -> str:
    """The weights' digest as a listing shows it: its first 8 hex digits, or "not recorded" (a cache
    built before VFS kept it)."""
    return spec.weights.removeprefix("sha256:")[:8] if spec.weights else "not recorded"


def _other_sources(a: _Cache, b: _Cache) -> str | None:
    """ "differently named datasets ('x' and 'y')", or None where both name one source (the same
    file by another relative path too)."""
    source_a, source_b = a.spec.data.source, b.spec.data.source
    if source_a == source_b or Path(source_a).resolve() == Path(source_b).resolve():
        return None
    return f"differently named datasets ({source_a!r} and {source_b!r})"
