"""The feature cache (format versions 1 and 2): a zarr v3 group of one layer's feature maps of a dataset.

The rooms: `format` (what a cache is of, its limits and tables), `rows` (how an array's rows are
read: through zarr or straight from chunk files), `damage` (what a cache lost or has garbled since
it was written), `reader` (`open_cache` → `FeatureCache`), `watch` (whether another cache stands
at an open one's place, asked in the background), `writer` (`CacheWriter`: append chunk by chunk,
resumable) and `lock` (one build per cache).
"""

from .format import CHUNK_BYTES, FORMAT, FORMAT_VERSION, FORMAT_VERSIONS, CacheError, CacheSpec
from .lock import BuildLock
from .reader import CacheCheck, FeatureCache, cache_name, cache_row, list_caches, open_cache
from .watch import ReplacementWatch
from .writer import AlreadyComplete, CacheWriter

__all__ = [
    "AlreadyComplete",
    "BuildLock",
    "CacheCheck",
    "CHUNK_BYTES",
    "CacheError",
    "CacheSpec",
    "CacheWriter",
    "FORMAT",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "FeatureCache",
    "ReplacementWatch",
    "cache_name",
    "cache_row",
    "list_caches",
    "open_cache",
]
