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
import time
from pathlib import Path

import numpy as np
import pytest
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


def test_cli_search_with_shards(cluster, reference, tmp_path, capsys):
    args = [*search_args(reference, tmp_path), "--k", "5", "--json"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*args, "--shards", "2"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert local.pop("elapsed_ms") >= 0 and sharded.pop("elapsed_ms") >= 0
    assert sharded == local
    assert main([*args, "--address", "auto"]) == 2  # not silently searched in this process
    assert "--address is for a search on a Ray cluster: add --shards N" in capsys.readouterr().err


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


def test_shards_the_cluster_cannot_hold_are_refused_and_a_relative_path_is_the_drivers(cluster, reference):
    """Shards the 2 CPUs cannot hold — more than the CPUs, or more than those other shards leave
    free — are refused at once (Ray would wait for them forever); a relative cache path reaches the
    shards as the absolute path the driver means."""
    with pytest.raises(ValueError, match="cannot hold 3 search shards"):
        ShardedSearch(reference.location, shards=3)
    relative = os.path.relpath(reference.location)
    with ShardedSearch(relative, shards=2) as both:
        assert both._args[0] == os.path.abspath(reference.location)
        with pytest.raises(ValueError, match="1 search shards .* the cluster has 0 CPU free"):
            ShardedSearch(reference.location, shards=1)
