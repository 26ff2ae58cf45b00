"""What is loaded once per server, what a session remembers, and how errors reach the user.

Caches, extractors and thumbnails are `st.cache_resource` objects shared by every session, keyed
by their spec strings (and, for local caches, the time their metadata last changed, so a rebuilt
cache is reopened). Small per-session results (the last search, an upload's features) live in
`st.session_state` through `memo`, so a rerun that changes nothing recomputes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import streamlit as st

from vfs.background import BuildRegistry
from vfs.cache import CacheError, FeatureCache, cache_row, list_caches, open_cache
from vfs.cluster.sharded import ShardedSearch
from vfs.data import open_dataset
from vfs.models import Extractor, LayerError, LayerInfo, list_layers, load_extractor
from vfs.settings import Settings, is_remote
from vfs.stats import label_groups

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DEMO_JOB = ROOT / "cache_jobs" / "demo.toml"
CACHE = "vfs.cache"  # the location of the cache the user works with, shared by the pages
OPENED = "vfs.opened"  # caches this session opened by path or URL (Home page)


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a failure the user can act on (bad input, missing file, no internet) as a message, not a
    traceback,
    and stop the page there."""
    try:
        yield
    except LayerError as e:  # names the page's layer list, not a Python call
        st.error(e.message("the Build page's layer list"))
        st.stop()
    except (
        ValueError,
        RuntimeError,
        OSError,
    ) as e:  # CacheError, ImageError, ModelUnavailable, DatasetUnavailable …
        st.error(str(e) or type(e).__name__)
        st.stop()


def settings() -> Settings:
    """This instance's settings, read on every run (cheap) so a changed environment applies at once."""
    with user_errors():
        return Settings.from_env()


def bind(key: str, default: Any, shared: str | None = None, options: Container | None = None) -> str:
    """Key for a widget whose value survives visits to other pages.

    Streamlit drops a widget's state when its page is left; the value is also kept under `shared`
    (a session value several pages' widgets show, e.g. the current cache) or a private name.
    """
    store = shared or f"vfs.kept.{key}"
    value = st.session_state[key] if key in st.session_state else st.session_state.get(store, default)
    if options is not None and value not in options:
        value = default
    st.session_state[key] = st.session_state[store] = value
    return key


def memo(name: str, key: object, compute: Callable[[], T]) -> T:
    """The value last computed under `name`, recomputed only when `key` changes (compared with ==; one
    slot per name)."""
    slot = st.session_state.get(f"vfs.memo.{name}")
    if slot is None or slot[0] != key:
        slot = (key, compute())
        st.session_state[f"vfs.memo.{name}"] = slot
    return slot[1]


# --- builds ---------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def build_registry() -> BuildRegistry:
    """The server's background builds: one registry for every session, so reruns and other users see them."""
    return BuildRegistry()


# --- caches ---------------------------------------------------------------------------------------
def _stamp(location: str) -> int:
    """Changes whenever a local cache's metadata is rewritten (progress, completion, a rebuild)."""
    if is_remote(location):
        return 0
    try:
        return (Path(location) / "zarr.json").stat().st_mtime_ns
    except OSError:
        return -1


@st.cache_resource(max_entries=16, show_spinner="Opening the cache…")
def _open_cache(location: str, stamp: int) -> FeatureCache:
    return open_cache(location)


def get_cache(location: str) -> FeatureCache:
    """The cache at `location`, opened once per server (and again after it is rewritten)."""
    return _open_cache(location, _stamp(location))


@st.cache_resource(max_entries=4, show_spinner="Starting the cache's search shards on the Ray cluster…")
def _shards(location: str, stamp: int, address: str, shards: int) -> ShardedSearch:
    return ShardedSearch(location, shards=shards, address=address)


def sharded_search(cache: FeatureCache) -> ShardedSearch | None:
    """The cache's shards on the Ray cluster when `VFS_RAY_ADDRESS` and `VFS_RAY_SHARDS` are set (started
    once per server and kept between queries), else None: searches run in this process."""
    s = settings()
    if not (s.ray_address and s.ray_shards) or not cache.complete:
        return None
    return _shards(cache.location, _stamp(cache.location), s.ray_address, s.ray_shards)


@st.cache_data(show_spinner=False, max_entries=8)
def _local_rows(root: str, stamps: tuple) -> list[dict]:
    return list_caches(root)


@st.cache_data(show_spinner=False, ttl=60)
def _opened_row(location: str) -> dict:
    """A cache given by URL or path, summarised like `list_caches` rows (an unreachable URL is retried
    after a minute)."""
    try:
        return cache_row(location, get_cache(location))
    except CacheError as e:
        return cache_row(location, e)


def cache_rows() -> list[dict]:
    """Every cache this session can see: the caches folder, the configured URLs, and what it opened."""
    s = settings()
    root = s.cache_dir
    stamps = tuple(sorted((p.name, _stamp(str(p))) for p in root.glob("*.zarr"))) if root.is_dir() else ()
    rows = _local_rows(str(root), stamps) if stamps else []
    extra = [*s.remote_caches, *st.session_state.get(OPENED, [])]
    return rows + [_opened_row(location) for location in dict.fromkeys(extra)]


# --- models ---------------------------------------------------------------------------------------
@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _extractor(model: str, layer: str, input_size: int) -> Extractor:
    return load_extractor(model, layer, input_size)


def extractor_for(cache: FeatureCache) -> Extractor:
    """The cache's own extractor (for uploaded images), loaded once per server and checked against the
    cache."""
    settings().check_model_spec(cache.spec.model)
    extractor = _extractor(cache.spec.model, cache.spec.layer, cache.spec.input_size)
    cache.check_extractor(extractor.describe())
    return extractor


@st.cache_data(max_entries=32, show_spinner="Listing the model's layers…")
def layers(spec: str, image_size: int | None) -> list[LayerInfo]:
    return list_layers(spec, image_size)


@st.cache_data(max_entries=16, ttl=60, show_spinner="Reading the dataset…")
def dataset_columns(source: str) -> tuple[list[str], int, str | None, str | None]:
    """A dataset's columns besides `path`, its size, and the label / domain columns it would use by
    default."""
    dataset = open_dataset(source)
    columns = [str(c) for c in dataset.records.columns if c != "path"]
    return columns, len(dataset), dataset.label_col, dataset.domain_col


# --- what the pages show of a cache ----------------------------------------------------------------
def thumbs(cache: FeatureCache, indices: Iterable[int]) -> list[np.ndarray]:
    """The thumbnails (the model-input views) of some images, in the order asked (the opened cache
    keeps recently shown ones decoded)."""
    return list(cache.thumbs_at([int(i) for i in indices]))


@st.cache_data(max_entries=32, show_spinner=False)
def _groups(location: str, stamp: int, column: str) -> pd.DataFrame:
    return label_groups(get_cache(location).manifest, column)


def groups(cache: FeatureCache, column: str) -> pd.DataFrame:
    """Membership of every image in each group of `column` ('|'-joined values: one group per finding)."""
    return _groups(cache.location, _stamp(cache.location), column)


def group_columns(cache: FeatureCache, most: int = 50) -> list[str]:
    """Manifest columns worth grouping by: between 2 and `most` groups (not paths, ids or ages)."""
    columns = [c for c in cache.manifest.columns if c != "path"]
    return [c for c in columns if 2 <= groups(cache, c).shape[1] <= most]
