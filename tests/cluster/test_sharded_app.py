"""The app on a Ray cluster: VFS_RAY_ADDRESS offers cluster builds on the Build page, and with
VFS_RAY_SHARDS the Search page searches through shards — with the in-process answer."""

from __future__ import annotations

import gc
import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import streamlit as st

import ui.core
from vfs import ShardedSearch
from vfs.cluster.sharded import ShardError
from vfs.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from apphelpers import box_paint, draw, no_exceptions, start_app


def test_settings_read_the_cluster():
    assert Settings.from_env({}).ray_address is None and Settings.from_env({}).ray_shards == 0
    s = Settings.from_env({"VFS_RAY_ADDRESS": "auto", "VFS_RAY_SHARDS": "4"})
    assert (s.ray_address, s.ray_shards) == ("auto", 4)
    with pytest.raises(ValueError, match="VFS_RAY_SHARDS='two'"):
        Settings.from_env({"VFS_RAY_ADDRESS": "auto", "VFS_RAY_SHARDS": "two"})
    with pytest.raises(ValueError, match="VFS_RAY_SHARDS needs VFS_RAY_ADDRESS"):
        Settings.from_env({"VFS_RAY_SHARDS": "2"})


def test_build_page_offers_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = no_exceptions(start_app().switch_page("app_pages/build.py").run())
    assert "build.where" not in [r.key for r in at.radio]
    monkeypatch.setenv("VFS_RAY_ADDRESS", "head:6379")
    at = no_exceptions(start_app().switch_page("app_pages/build.py").run())
    assert at.radio(key="build.where").options == ["This machine", "The Ray cluster at head:6379"]
    monkeypatch.setenv("VFS_RAY_ADDRESS", "ray://head:10001")  # Ray Client: BuildJob refuses it for builds
    at = no_exceptions(start_app().switch_page("app_pages/build.py").run())
    assert "build.where" not in [r.key for r in at.radio]
    assert any("ray://head:10001 is a Ray Client address" in c.value for c in at.caption)


@pytest.fixture
def shards_released():
    """The app keeps its shards as a server-wide resource: release them, or they hold the cluster's CPUs."""
    yield
    st.cache_resource.clear()
    gc.collect()


def test_search_page_searches_through_shards(cluster, reference, tmp_path, monkeypatch, shards_released):
    shutil.copytree(reference.location, tmp_path / "ref.zarr")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))

    def table():
        at = start_app().switch_page("app_pages/search.py").run()
        return no_exceptions(draw(at, box_paint(0.2, 0.1, 0.7, 0.6))).dataframe[0].value

    local = table()
    started = []

    class Recorded(ShardedSearch):
        made: list[weakref.ref[ShardedSearch]] = []  # weak: held, they would keep the cluster's CPUs

        def __init__(self, location, **options):
            started.append((location, options["shards"]))
            super().__init__(location, **options)
            self.made.append(weakref.ref(self))

    monkeypatch.setattr(ui.core, "ShardedSearch", Recorded)
    monkeypatch.setenv("VFS_RAY_ADDRESS", cluster.get_runtime_context().gcs_address)
    monkeypatch.setenv("VFS_RAY_SHARDS", "2")
    sharded = table()
    assert started == [(str(tmp_path / "ref.zarr"), 2)]
    assert len(local) == 10 and sharded.equals(local)
    first = Recorded.made[0]()
    (tmp_path / "ref.zarr" / "zarr.json").touch()  # rewritten, as a rebuild does
    assert table().equals(local) and len(started) == 2
    assert first._shards == []  # its actors stopped before the new ones started: not left holding CPUs
    with pytest.raises(
        ShardError, match="shards were stopped .* make a new ShardedSearch"
    ):  # a session still on it
        first.search(0, np.ones(first.cache.spec.grid))


def test_a_remote_cache_rebuilt_behind_its_url_gets_new_shards(
    cluster, reference, tmp_path, monkeypatch, shards_released
):
    """A URL's stamp was 0 for good: rebuilt behind its URL, the cache's shards refused ("rebuilt
    since its shards started") and then, stopped, answered no search in any session until the
    server restarted (review). New shards start, as for a local cache."""
    import zarr
    from cachehelpers import served

    shutil.copytree(reference.location, tmp_path / "served" / "ref.zarr")
    monkeypatch.setattr(ui.core, "REMOTE_CHECK_S", 0.0)
    monkeypatch.setattr(ui.core, "REMOTE_WAIT_S", 60.0)  # the answer in the same run
    started = []

    class Recorded(ShardedSearch):
        def __init__(self, location, **options):
            started.append(location)
            super().__init__(location, **options)

    monkeypatch.setattr(ui.core, "ShardedSearch", Recorded)
    with served(tmp_path / "served") as base:
        url = f"{base}/ref.zarr"
        monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "local"))
        monkeypatch.setenv("VFS_REMOTE_CACHES", url)
        monkeypatch.setenv("VFS_RAY_ADDRESS", cluster.get_runtime_context().gcs_address)
        monkeypatch.setenv("VFS_RAY_SHARDS", "2")

        def table():
            at = start_app().switch_page("app_pages/search.py").run()
            return no_exceptions(draw(at, box_paint(0.2, 0.1, 0.7, 0.6))).dataframe[0].value

        first = table()
        group = zarr.open_group(str(tmp_path / "served" / "ref.zarr"), mode="r+")
        group.attrs["created"] = "2099-01-01T00:00:00+0000"  # rebuilt: another creation
        again = table()
        assert started == [url, url] and len(first) == 10 and again.equals(first)
        assert table().equals(first) and len(started) == 2  # not replaced again: the same shards


def test_a_cache_the_cluster_has_no_room_for_is_searched_here(
    cluster, reference, tmp_path, monkeypatch, shards_released
):
    """Another cache's shards (another session's, or Compare's other side) held the 2 CPUs: every
    search waited 15 s and failed (trial). It is searched in this process, said once in a toast,
    and its shards are tried again after NO_ROOM_RETRY_S."""
    import vfs.cluster

    shutil.copytree(reference.location, tmp_path / "ref.zarr")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(vfs.cluster, "FREE_WAIT_S", 0.5)

    def table(opened=None):
        at = opened or start_app().switch_page("app_pages/search.py").run()
        return no_exceptions(draw(at, box_paint(0.2, 0.1, 0.7, 0.6))).dataframe[0].value

    local = table()
    monkeypatch.setenv("VFS_RAY_ADDRESS", cluster.get_runtime_context().gcs_address)
    monkeypatch.setenv("VFS_RAY_SHARDS", "2")
    with ShardedSearch(reference.location, shards=2):  # every CPU of the cluster
        opened = no_exceptions(start_app().switch_page("app_pages/search.py").run())
        assert any("ref is searched on this machine" in t.value for t in opened.toast)  # the page's first run
        assert table(opened).equals(local)
        assert table().equals(local)  # not tried again meanwhile: no second wait, no second toast
    assert len(ui.core._no_room) == 1
