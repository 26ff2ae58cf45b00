"""ShardedSearch beside no other shards (the cluster has 2 CPUs): a shard that cannot restart is
named with its cause, then started again; `vfs search --shards` prints what an in-process search does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from clusterhelpers import job
from test_sharded_search import MASKS, assert_same_answer

from vfs import ShardedSearch, search_regions
from vfs.cli import main
from vfs.cluster.sharded import ShardError


def test_a_shard_that_cannot_restart_is_named_then_started_again(cluster, reference, tmp_path):
    location = tmp_path / "moved.zarr"
    shutil.copytree(reference.location, location)
    query = reference.rows(np.array([3]))[0]  # features: the driver reads no row of the hidden cache
    with ShardedSearch(location, shards=2) as s:
        hidden = tmp_path / "hidden.zarr"
        location.rename(hidden)  # the restarted shard cannot read its rows …
        os.kill(s.status()[1]["pid"], signal.SIGKILL)
        with pytest.raises(ShardError, match=r"shard 1 \(rows 18..34 .*\) is down: .*no cache at"):
            s.search(query, MASKS["block"], k=4)
        hidden.rename(location)  # … until the cache is back: the next search starts it again
        assert_same_answer(
            s.search(query, MASKS["block"], k=4),
            search_regions(reference, query, MASKS["block"], k=4),
            reference,
        )


def search_args(reference, folder) -> list[str]:
    """`vfs search` of image 2 with the block mask (saved in `folder`), as the tests here run it."""
    np.save(folder / "m.npy", MASKS["block"])
    return ["search", reference.location, "--query-index", "2", "--mask", str(folder / "m.npy")]


def test_cli_search_with_shards(cluster, reference, tmp_path, capsys, monkeypatch):
    """The same JSON as a search here; Ray's own lines ("(raylet) A worker died…", printed by the
    driver at any moment) go to stderr, not into the JSON (trial)."""
    args = [*search_args(reference, tmp_path), "--k", "5", "--json"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    search = ShardedSearch.search

    def noisy(self, *a, **kw):
        print("(raylet) A worker died or was killed while executing a task")  # as Ray's driver does
        return search(self, *a, **kw)

    monkeypatch.setattr(ShardedSearch, "search", noisy)
    assert main([*args, "--shards", "2"]) == 0
    out, err = capsys.readouterr()
    sharded = json.loads(out)
    assert "(raylet) A worker died" in err
    assert local.pop("elapsed_ms") >= 0 and sharded.pop("elapsed_ms") >= 0
    assert sharded == local
    assert main([*args, "--address", "auto"]) == 2  # not silently searched in this process
    assert "--address is for a search on a Ray cluster: add --shards N" in capsys.readouterr().err
    assert main([*args, "--shards", "2", "--memory-budget", "1KB"]) == 2  # it was silently ignored
    assert "--memory-budget is for a search on this machine" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["", "ray://"])
@pytest.mark.parametrize("command", ["search", "build"])
def test_an_address_nothing_answers_at_is_refused_at_once(reference, manifest, tmp_path, scheme, command):
    """A fresh process (this one's Ray is up): `ray.init` would retry a dead address for minutes,
    deaf to SIGTERM; VFS refuses it within seconds, and a build leaves no cache behind."""
    with socket.socket() as s:  # a port nothing listens at
        s.bind(("127.0.0.1", 0))
        address = f"{scheme}127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "c.zarr"
    args = {
        "search": [*search_args(reference, tmp_path), "--shards", "2"],
        "build": [
            "build",
            "--data",
            str(manifest),
            "--layer",
            "blocks.5",
            "--image-size",
            "128",
            "--out",
            str(out),
            "--engine",
            "ray",
        ],
    }[command]
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "vfs", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],  # the repository: `-m vfs` as its README runs it
    )
    refused = (
        "a build cannot run through Ray Client"
        if command == "build" and scheme
        else "no Ray cluster answers at"
    )
    assert done.returncode == 2 and f"error: {refused}" in done.stderr, done.stderr
    assert time.perf_counter() - t0 < 60 and not out.exists()


def test_an_address_that_answers_but_not_as_ray_is_refused_at_once(cluster, monkeypatch):
    """A web server (the dashboard's port, given for the cluster's) or a server that never speaks
    kept `ray.init` retrying for minutes (trial: 5 min, then killed); the cluster's own GCS port and
    a gRPC server pass, also behind an HTTP proxy, which Ray's own channels bypass (review)."""
    import grpc
    import ray

    from vfs.cluster import REACH_TIMEOUT_S, check_reachable

    web = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in its backlog; nothing is ever sent
    try:
        for scheme in ("", "ray://"):
            for port, waited in (
                (web.server_address[1], 2.0),
                (silent.getsockname()[1], REACH_TIMEOUT_S + 2),
            ):
                t0 = time.perf_counter()
                with pytest.raises(RuntimeError, match="answers, but not as a Ray cluster does"):
                    check_reachable(f"{scheme}127.0.0.1:{port}")
                assert time.perf_counter() - t0 < waited
    finally:
        web.shutdown()
        silent.close()

    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy nothing answers at
    check_reachable(ray.get_runtime_context().gcs_address)
    server = grpc.server(ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        check_reachable(f"ray://127.0.0.1:{port}")
    finally:
        server.stop(None)


def test_shards_the_cluster_cannot_hold_are_refused_and_a_relative_path_is_the_drivers(
    cluster, reference, manifest, tmp_path
):
    """Shards the 2 CPUs cannot hold — more than the CPUs, or more than those other shards leave
    free — are refused at once (Ray would wait for them forever); so is a cluster build then (it
    waited silently, its cache created: trial). A relative cache path reaches the shards as the
    absolute path the driver means."""
    from vfs import build_cache

    with pytest.raises(ValueError, match="cannot hold 3 search shards"):
        ShardedSearch(reference.location, shards=3)
    relative = os.path.relpath(reference.location)
    with ShardedSearch(relative, shards=2) as both:
        assert both._args[0] == os.path.abspath(reference.location)
        with pytest.raises(ValueError, match="1 search shards .* the cluster has 0 CPU free"):
            ShardedSearch(reference.location, shards=1)
        with pytest.raises(ValueError, match="extractor actors .* the cluster has 0 CPU free"):
            build_cache(job(manifest, tmp_path / "b.zarr", engine="ray"))
        assert not (tmp_path / "b.zarr").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: the Ray cluster has no GPU"):
            build_cache(job(manifest, tmp_path / "g.zarr", engine="ray", device="cuda"))
        assert not (tmp_path / "g.zarr").exists()


def test_shards_of_a_cache_rebuilt_since_they_started_refuse_to_answer(cluster, reference, tmp_path):
    """The shards hold the old rows, the driver read the query's row from the new cache: answers
    of neither, silently (trial). The search now says the cache was rebuilt."""
    location = tmp_path / "c.zarr"
    shutil.copytree(reference.location, location)
    s = ShardedSearch(location, shards=2)
    assert_same_answer(
        s.search(2, MASKS["block"], k=4), search_regions(reference, 2, MASKS["block"], k=4), reference
    )
    group = zarr.open_group(location, mode="r+")
    group.attrs["created"] = "2026-12-01T00:00:00+0000"  # as a build into the same place writes it
    with pytest.raises(ShardError, match="was rebuilt since its shards started: make a new"):
        s.search(2, MASKS["block"], k=4)
    assert s._shards == []  # stopped: their CPUs are free for the new one
    with pytest.raises(ShardError, match="make a new ShardedSearch"):
        s.search(2, MASKS["block"], k=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a cluster without a GPU")
def test_a_shard_that_cannot_start_says_why_once(cluster, reference):
    """A constructor's error (no GPU for device='cuda') came as 'down …; the next search starts it
    again', which no search could (trial): now why it could not start."""
    with pytest.raises(ShardError, match=r"shard 0 \(rows 0..17\) could not start: .*device 'cuda'"):
        ShardedSearch(reference.location, shards=2, device="cuda")


def test_auto_with_no_cluster_running_says_how_to_start_one(monkeypatch):
    """`--address auto` with no cluster on this machine blamed a token (trial)."""
    import ray

    import vfs.cluster

    def no_cluster(**options):
        raise ConnectionError(
            "Could not find any running Ray instance. Please specify the one to connect to."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(vfs.cluster, "check_reachable", lambda address: None)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(RuntimeError, match="start one with `ray start --head`, or give no address") as raised:
        vfs.cluster.connect("auto")
    assert "token" not in str(raised.value)
