"""What is loaded once per server, and what a session remembers.

Caches, extractors and thumbnails are `st.cache_resource` objects shared by every session, keyed
by their spec strings (and, for local caches, the time their metadata last changed, so a rebuilt
cache is reopened). Small per-session results (the last search, an upload's features) live in
`st.session_state` through `memo`, so a rerun that changes nothing recomputes nothing. The light
helpers (settings, how errors reach the user, `bind`, `memo`) live in `base.py`, imported again here
for the pages.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from vfs.background import BuildRegistry
from vfs.cache import (
    CacheError,
    FeatureCache,
    ReplacementWatch,
    cache_name,
    cache_row,
    list_caches,
    open_cache,
)
from vfs.cluster import ClusterFull
from vfs.cluster.sharded import ShardedSearch
from vfs.data import open_dataset
from vfs.devices import resolve_device
from vfs.models import Extractor, LayerInfo, Preprocess, list_layers, load_extractor
from vfs.render import jpeg_data_url, outlined_match
from vfs.search import search_regions
from vfs.settings import CACHE_SUFFIX, is_url
from vfs.stats import column_groups, grouping_columns, repeated_columns

from .base import bind, kept_key, memo, settings, user_errors

ROOT = Path(__file__).resolve().parent.parent
DEMO_JOB = ROOT / "cache_jobs" / "demo.toml"
CACHE = "vfs.cache"  # the location of the cache the user works with, shared by the pages
OPENED = "vfs.opened"  # caches this session opened by path or URL (Home page)
__all__ = ["bind", "kept_key", "memo", "settings", "user_errors"]  # from .base, for the pages


# --- builds ---------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def build_registry() -> BuildRegistry:
    """The server's background builds: one registry for every session, so reruns and other users see them."""
    return BuildRegistry()


# --- caches ---------------------------------------------------------------------------------------
def _stamp(location: str) -> int:
    """Changes whenever a local cache's metadata is rewritten (progress, completion, a rebuild), and
    whenever the cache behind a URL is found replaced (`_url_stamp`); -1 for a local one gone."""
    if is_url(location):
        return _url_stamp(location)
    try:
        return (Path(location) / "zarr.json").stat().st_mtime_ns
    except OSError:
        return -1


@st.cache_resource(max_entries=16, show_spinner="Opening the cache…")
def _open_cache(location: str, stamp: int) -> FeatureCache:
    return open_cache(location)


REMOTE_CHECK_S = 5.0
"""How often a cache behind a URL is asked whether another stands there now (one read of its metadata)."""
REMOTE_WAIT_S = 0.25
"""How long a page's run waits for that answer. A server slower than that, or one that hangs, is
answered for in the background: the page goes on with the cache it has in memory, and a later run
takes the new one."""
_url_generations: dict[str, int] = {}
"""Per URL: how many times this server found its cache replaced."""
_url_watches: dict[str, ReplacementWatch] = {}
"""Per URL: whether the cache opened at its latest generation was replaced (one question at a time,
however slow the server)."""
_state_lock = threading.Lock()
"""Guards what this module keeps of caches across sessions: the URLs' generations and watches, the
local caches' latest stamps."""


def _url_stamp(location: str) -> int:
    """The cache behind a URL as this server has seen it: one more each time its `ReplacementWatch`
    found it rebuilt or finished since it was opened. A URL's stamp was 0 for good: a cache rebuilt
    behind it was searched as it was (features in memory) until the server restarted, or, with
    shards, not at all (review)."""
    with _state_lock:
        generation = _url_generations.get(location, 0)
    try:
        cache = _open_cache(location, generation)
    except CacheError:  # not reachable now: opening it says why
        return generation
    with _state_lock:
        watch = _url_watches.get(location)
        if watch is None or watch.cache is not cache:  # first opened, or opened again (evicted)
            watch = _url_watches[location] = ReplacementWatch(cache)
    if not watch.replaced(REMOTE_CHECK_S, REMOTE_WAIT_S):
        return generation
    with _state_lock:  # another session's run may have counted this replacement already
        if _url_generations.get(location, 0) == generation:
            _url_generations[location] = generation + 1
        latest = _url_generations[location]
    _open_cache.clear(location, generation)  # the old cache's rows: no session searches them again
    return latest


def get_cache(location: str) -> FeatureCache:
    """The cache at `location`, opened once per server (and again after it is rewritten); a
    CacheError that says so when it was deleted or moved since it was picked (another session's
    Build page, or the disk)."""
    stamp = _stamp(location)
    if stamp == -1:
        raise CacheError(f"no cache at {location} (deleted or moved?): pick another one")
    cache = _open_cache(location, stamp)
    if not is_url(location):
        _forget_older(location, stamp, cache.built)
        return cache
    with _state_lock:
        replaced = _url_generations.get(location, 0) != stamp
    if replaced:  # found replaced since this run read its stamp: what it just opened is not kept
        _open_cache.clear(location, stamp)  # under the old one (a second copy of the cache's rows)
    return cache


_local_latest: dict[str, tuple[int, tuple[Any, ...]]] = {}
"""Per local cache: the stamp and the build (`FeatureCache.built`) it was last opened at."""


def _forget_older(location: str, stamp: int, built: tuple[Any, ...]) -> None:
    """Opened anew after its metadata was rewritten (rebuilt, repaired, copied over), a local cache's
    older entries go, and its rows in memory with them once no session holds it: each kept its
    features resident for good. A run that read its stamp before the disk's latest change opened
    an entry under a stamp no other run asks for: it goes too."""
    with _state_lock:
        before = _local_latest.get(location)
        stale = before is not None and before[0] != stamp and _stamp(location) != stamp
        if not stale:
            _local_latest[location] = (stamp, built)
    if stale:
        _open_cache.clear(location, stamp)
        return
    if before is None or before[0] == stamp:
        return
    _open_cache.clear(location, before[0])
    _warm_up.clear(location, before[0])
    if before[1] != built:
        _tiles.clear(location, before[1])


def rerun_if_rebuilt(*caches: FeatureCache) -> None:
    """For a fragment, which reruns with the caches its page's last full run opened: where one was
    rebuilt since (another build stands at its place) or is gone, the whole page runs again and
    picks it anew, rather than search the old one's rows and show the new one's thumbnails."""
    for cache in caches:
        try:
            rebuilt = get_cache(cache.location).built != cache.built
        except CacheError:  # gone: the page's full run says so
            rebuilt = True
        if rebuilt:
            st.rerun()


@st.cache_resource(max_entries=4, show_spinner="Starting the cache's search shards on the Ray cluster…")
def _shards(location: str, stamp: int, address: str, shards: int) -> ShardedSearch:
    search = ShardedSearch(location, shards=shards, address=address)
    with _shards_lock:
        _shards_started[location, address, shards] = (stamp, weakref.ref(search))
    return search


_shards_started: dict[tuple[str, str, int], tuple[int, weakref.ref[ShardedSearch]]] = {}
"""The cache's stamp when its latest shards started, and them (not kept alive here: an evicted
entry's shards stop once no session holds them)."""
_shards_lock = threading.Lock()


@st.cache_resource(max_entries=16, show_spinner=False)
def _warm_up(location: str, stamp: int) -> threading.Thread:
    cache = get_cache(location)
    mask = np.zeros(cache.spec.grid)
    mask[0, 0] = 1.0

    def search() -> None:
        try:
            search_regions(cache, 0, mask, k=1)
        except Exception:  # noqa: BLE001 - a warm-up only: the user's own search reports any problem
            pass

    thread = threading.Thread(target=search, name=f"vfs-warm-up-{Path(location).name}", daemon=True)
    thread.start()
    return thread


def warm_up(cache: FeatureCache) -> None:
    """Run one small search on the cache in the background, once per opened cache, when the page shows
    it: its features load into memory (seconds on a large cache) while the user picks a query and
    draws, not after the first stroke. A cache too large for memory (searched streaming from storage)
    and searches on a Ray cluster need none."""
    if not (cache.complete and cache.n) or sharded_search(cache) is not None:
        return
    if cache.fits(resolve_device("auto"), None):
        _warm_up(cache.location, _stamp(cache.location))


NO_ROOM_RETRY_S = 60.0
"""How long a cache whose shards found no room on the cluster is searched in this process before
its shards are tried again."""
_no_room: dict[tuple[str, str, int], float] = {}


def sharded_search(cache: FeatureCache) -> ShardedSearch | None:
    """The cache's shards on the Ray cluster when `VFS_RAY_ADDRESS` and `VFS_RAY_SHARDS` are set (started
    once per server and kept between queries), else None: searches run in this process — also while
    the cluster has no room for them (other caches' shards hold its CPUs, e.g. on Compare: told once,
    tried again after NO_ROOM_RETRY_S)."""
    s = settings()
    if not (s.ray_address and s.ray_shards) or not cache.complete:
        return None
    key, stamp = (cache.location, s.ray_address, s.ray_shards), _stamp(cache.location)
    with _shards_lock:
        refused = _no_room.get(key)
    if refused is not None and time.monotonic() - refused < NO_ROOM_RETRY_S:
        return None
    try:
        return _started_shards(key, stamp)
    except ClusterFull as full:
        with _shards_lock:
            _no_room[key] = time.monotonic()
        st.toast(f"{cache_name(cache.location)} is searched on this machine: {full}", icon="⚠️")
        return None


def _started_shards(key: tuple[str, str, int], stamp: int) -> ShardedSearch:
    """The shards of `key` (location, address, shards) for the cache as it is at `stamp`."""
    location, address, shards = key
    with _shards_lock:
        started = _shards_started.get(key)
    if started is not None and started[0] < stamp:  # rebuilt: its old shards hold the CPUs new ones need
        _shards.clear(location, started[0], address, shards)
        old = started[1]()
        if old is not None:
            old.close()  # a search still on them fails; the session's next one finds the new shards
    elif started is not None and started[0] > stamp:  # read before a rebuild another session has seen
        stamp = started[0]
    return _shards(location, stamp, address, shards)


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
    found = root.glob(f"*{CACHE_SUFFIX}") if root.is_dir() else ()
    stamps = tuple(sorted((p.name, _stamp(str(p))) for p in found))
    rows = _local_rows(str(root), stamps) if stamps else []
    listed = {_same_place(r["path"]) for r in rows}
    extra = [*s.remote_caches, *st.session_state.get(OPENED, [])]
    return rows + [_opened_row(x) for x in dict.fromkeys(extra) if _same_place(x) not in listed]


def _same_place(location: str) -> str:
    """One name for a location however it was typed (a local path resolved; a URL as it is)."""
    return location if is_url(location) else str(Path(location).expanduser().resolve())


# --- models ---------------------------------------------------------------------------------------
@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _extractor(model: str, layer: str, preprocess: Preprocess) -> Extractor:
    return load_extractor(model, layer, preprocess=preprocess)


def extractor_for(cache: FeatureCache) -> Extractor:
    """The cache's own extractor (for uploaded images), loaded once per server and checked against the
    cache."""
    settings().check_model_spec(cache.spec.model)
    extractor = _extractor(cache.spec.model, cache.spec.layer, cache.spec.preprocess)
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


TILES_KEPT = 2048  # result tiles kept per opened cache, as JPEG data URLs (≈ 5–20 KB each)


@dataclass
class _Tiles:
    lock: threading.Lock = field(default_factory=threading.Lock)
    urls: OrderedDict[tuple[int, tuple[int, int, int, int]], str] = field(default_factory=OrderedDict)


@st.cache_resource(max_entries=16, show_spinner=False)
def _tiles(location: str, built: tuple[Any, ...]) -> _Tiles:
    return _Tiles()


def outlined_tiles(cache: FeatureCache, matches: list[tuple[int, tuple[int, int, int, int]]]) -> list[str]:
    """Result tiles, each match's thumbnail (index) with its best window (grid box) outlined, as JPEG
    data URLs.

    Encoded once per server and kept: a match shown again, to this user or another, costs neither a
    thumbnail read nor an encoding, and is the same message Streamlit has already sent (it then sends
    only its hash). New matches are read in one read.
    """
    # the tiles of the cache as `cache` was built: under the disk's stamp, a session still on a cache
    # rebuilt since would store its old thumbnails for every other session of the new one
    store = _tiles(cache.location, cache.built)
    with store.lock:
        found = {m: store.urls[m] for m in matches if m in store.urls}
    missing = [m for m in dict.fromkeys(matches) if m not in found]
    for (index, box), thumb in zip(missing, thumbs(cache, [index for index, _ in missing])):
        found[index, box] = jpeg_data_url(outlined_match(thumb, box, cache.spec.grid))
    with store.lock:
        for m in matches:
            store.urls[m] = found[m]
            store.urls.move_to_end(m)
        while len(store.urls) > TILES_KEPT:
            store.urls.popitem(last=False)
    return [found[m] for m in matches]


@st.cache_data(max_entries=32, show_spinner=False)
def _groups(_cache: FeatureCache, location: str, built: tuple[Any, ...], column: str) -> pd.DataFrame:
    return column_groups(_cache.manifest, column)


def groups(cache: FeatureCache, column: str) -> pd.DataFrame:
    """Membership of every image in each group of `column` ('|'-joined values: one group per finding);
    a message, not a traceback, where the cache is gone since the page picked it."""
    with user_errors():
        return _groups(cache, cache.location, cache.built, column)


@st.cache_data(max_entries=16, show_spinner=False)
def _repeated_columns(_cache: FeatureCache, location: str, built: tuple[Any, ...]) -> list[str]:
    return repeated_columns(_cache.manifest)


def sharing_columns(cache: FeatureCache) -> list[str]:
    """The manifest columns whose values repeat (`vfs.stats.repeated_columns`): what a page can
    leave out the query's fellows by; anew for a cache rebuilt at the same place."""
    with user_errors():
        return _repeated_columns(cache, cache.location, cache.built)


@st.cache_data(max_entries=16, show_spinner=False)
def _grouping_columns(_cache: FeatureCache, location: str, built: tuple[Any, ...]) -> list[str]:
    return grouping_columns(_cache.manifest)


def group_columns(cache: FeatureCache) -> list[str]:
    """The manifest's columns worth grouping by (`vfs.stats.grouping_columns`); anew for a cache
    rebuilt at the same place."""
    with user_errors():
        return _grouping_columns(cache, cache.location, cache.built)
