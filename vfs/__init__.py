"""Visual Feature Search: what a vision model thinks is similar, region by region.

Build a feature cache of one layer for an image dataset, draw a region on a query image,
and rank the dataset's regions by the cosine similarity of their masked features.
"""

from .cache import CacheError, CacheSpec, FeatureCache, open_cache
from .cluster.sharded import ShardedSearch  # imports Ray only when one is made
from .jobs import BuildJob, BuildProgress, build_cache
from .masks import grid_mask, load_mask
from .models import DEFAULT_MODEL, extractor_from_module, load_extractor
from .search import RegionQuery, SearchResult, search_regions

__all__ = [
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
