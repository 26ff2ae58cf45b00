"""Visual Feature Search: what a vision model thinks is similar, region by region.

Build a feature cache of one layer for an image dataset, draw a region on a query image,
and rank the dataset's regions by the cosine similarity of their masked features.

The names below are imported on first use (`vfs.open_cache`, `from vfs import search_regions`):
`import vfs.settings` and other light modules do not load PyTorch, so the app draws its first page
before the engine has loaded.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import CacheError, CacheSpec, FeatureCache, open_cache
    from .cluster.sharded import ShardedSearch
    from .jobs import BuildJob, BuildProgress, build_cache
    from .masks import grid_mask, load_mask
    from .models import DEFAULT_MODEL, extractor_from_module, load_extractor
    from .search import RegionQuery, SearchResult, search_regions
    from .sources import ArrayFeatures

_EXPORTS = {
    "ArrayFeatures": ".sources",
    "BuildJob": ".jobs",
    "BuildProgress": ".jobs",
    "CacheError": ".cache",
    "CacheSpec": ".cache",
    "DEFAULT_MODEL": ".models",
    "FeatureCache": ".cache",
    "RegionQuery": ".search",
    "SearchResult": ".search",
    "ShardedSearch": ".cluster.sharded",  # imports Ray only when one is made
    "build_cache": ".jobs",
    "extractor_from_module": ".models",
    "grid_mask": ".masks",
    "load_extractor": ".models",
    "load_mask": ".masks",
    "open_cache": ".cache",
    "search_regions": ".search",
}
__all__ = [
    "ArrayFeatures",
    "BuildJob",
    "BuildProgress",
    "CacheError",
    "CacheSpec",
    "DEFAULT_MODEL",
    "FeatureCache",
    "RegionQuery",
    "SearchResult",
    "ShardedSearch",
    "build_cache",
    "extractor_from_module",
    "grid_mask",
    "load_extractor",
    "load_mask",
    "open_cache",
    "search_regions",
]
__version__ = "0.1.0"


_SUBMODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def __getattr__(name: str) -> Any:
    """An exported name, or a submodule (`vfs.models.load_model` after `import vfs`, as in numpy)."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'vfs' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
