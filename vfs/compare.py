"""Whether two caches can be compared image by image (two models, two layers, two checkpoints).

Comparing rankings only means something when index i is the same image in both caches: the same
dataset source, the same number of stored images, and the same paths in the same order (a build
that skipped an unreadable image shifts every index after it).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from .cache.format import CacheSpec


class _Cache(Protocol):
    """What the check reads of a cache (a `vfs.cache.FeatureCache` or a stand-in)."""

    spec: CacheSpec
    n: int

    @property
    def manifest(self) -> pd.DataFrame: ...


def comparison_refusal(a: _Cache, b: _Cache) -> str | None:
    """Why caches `a` and `b` do not hold the same images in the same order (None when they do)."""
    source_a, source_b = a.spec.data.source, b.spec.data.source
    if source_a != source_b:
        return f"they are of different datasets ({source_a!r} and {source_b!r})"
    if a.n != b.n:
        return (
            f"they hold different numbers of images ({a.n} and {b.n}): "
            "was one built with a limit, or did it skip images?"
        )
    paths_a, paths_b = a.manifest["path"].to_numpy(), b.manifest["path"].to_numpy()
    differ = np.flatnonzero(paths_a != paths_b)
    if differ.size:
        i = int(differ[0])
        return (
            f"image {i} differs ({paths_a[i]!r} and {paths_b[i]!r}): "
            "one build skipped an image the other kept"
        )
    return None
