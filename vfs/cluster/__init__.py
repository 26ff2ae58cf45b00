"""VFS on a Ray cluster: cache builds by Ray Data (`build`) and sharded exact search (`sharded`).

Ray is imported only inside these modules' functions, so `vfs` stays importable (and the app
runs) without it; `requirements-ray.txt` installs it. Without an address, `connect` joins the
cluster `ray start` runs on this machine, if any, else starts a local one, so everything here runs
on one machine exactly as on many.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

RAY_MISSING = "Ray is not installed: pip install -r requirements-ray.txt"
REACH_TIMEOUT_S = 5.0
"""How long `connect` waits for a cluster's address to answer before refusing it."""
FREE_WAIT_S = 15.0
"""How long `check_free` waits for resources that actors just closed are giving back."""
OOM_RETRIES = 5
"""How many times a task that Ray's memory monitor killed runs again, unless `RAY_task_oom_retries`
says otherwise (the owner of a task decides, so this process's setting holds on any cluster).
Ray's default is forever: a batch that takes more memory than its node has made a build stall,
its progress still, until stopped by hand. Ray waits 1, 2, 4, 8, 16 s between the runs, so memory
held for half a minute by something else is waited out."""


def check_reachable(address: str | None) -> None:
    """Refuse at once a "host:port" or "ray://host:port" address that nothing answers at, or that
    answers but not as Ray does (no gRPC: a web server such as the dashboard's port, a silent one):
    `ray.init` retries either for minutes, deaf to SIGTERM meanwhile. Other forms ("auto", none)
    are Ray's own."""
    if address is None:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdecimal():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        raise RuntimeError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start one there "
            "(ray start --head) or give its address"
        ) from e
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # the check below speaks plain gRPC
        return
    if not _speaks_grpc(f"{host}:{port}", REACH_TIMEOUT_S):
        raise RuntimeError(
            f"{address} answers, but not as a Ray cluster does (no gRPC there: a web page, such as the "
            "dashboard's port 8265, or another server): give the cluster's address, the port "
            "`ray start --head` printed (6379 unless --port said otherwise), or ray://host:10001"
        )


def _speaks_grpc(target: str, timeout_s: float) -> bool:
    """Whether an HTTP/2 (gRPC) connection to `target` ("host:port") is set up within `timeout_s`,
    as it is at a Ray cluster's GCS and Ray Client ports; False as soon as the server refuses the
    handshake. Like Ray's own channels, it bypasses an HTTP proxy unless RAY_grpc_enable_http_proxy
    says otherwise (a proxy would answer for the cluster). (grpc comes with Ray.)"""
    import grpc

    ready, answered = [False], threading.Event()

    def changed(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            ready[0] = state is grpc.ChannelConnectivity.READY
            answered.set()

    proxy = os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true")
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", int(proxy))])  # as Ray's
    try:
        channel.subscribe(changed, try_to_connect=True)
        answered.wait(timeout_s)
        channel.unsubscribe(changed)
    finally:
        channel.close()
    return ready[0]


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each node of the connected cluster that is up ("CPU", "GPU", …)."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


class ClusterFull(ValueError):
    """The cluster's free resources cannot hold some actors now (others hold the rest)."""


def check_free(requests: list[dict[str, float]], what: str) -> None:
    """Refuse actors that the cluster's free resources cannot hold now (others, e.g. the shards of
    another `ShardedSearch`, hold the rest): Ray would wait for them as long as those live."""
    import ray

    wanted = {key: sum(r.get(key, 0.0) for r in requests) for key in ("CPU", "GPU")}
    deadline = time.monotonic() + FREE_WAIT_S
    while True:  # actors just closed give their resources back within moments
        free = ray.available_resources()
        short = [k for k, v in wanted.items() if v > free.get(k, 0.0) + 1e-9]
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if short:
        key = short[0]
        raise ClusterFull(
            f"{what} ask for {wanted[key]:g} {key} and the cluster has {free.get(key, 0.0):g} {key} free "
            f"after {FREE_WAIT_S:g} s (other actors hold the rest, e.g. another search's shards): close "
            "those, or ask for less"
        )


def check_placeable(requests: list[dict[str, float]], nodes: list[dict[str, float]], what: str) -> None:
    """Refuse actors (each one's resource request) that the cluster's nodes cannot all hold at once:
    Ray would wait for them forever, silently. Placed largest first, each on the node with the most
    room left (a heuristic: a refusal says what the nodes have, and how to ask for less)."""
    room = [dict(n) for n in nodes]
    for request in sorted(requests, key=lambda r: sorted(r.items(), reverse=True), reverse=True):
        fits = [n for n in room if all(n.get(k, 0.0) + 1e-9 >= v for k, v in request.items() if v > 0)]
        if not fits:
            have = (
                "; ".join(", ".join(f"{n.get(k, 0.0):g} {k}" for k in ("CPU", "GPU")) for n in nodes)
                or "no nodes"
            )
            want = ", ".join(f"{v:g} {k}" for k, v in request.items() if v > 0)
            raise ValueError(
                f"the cluster cannot hold {what} ({len(requests)} asking for {want} each); "
                f"its nodes have: {have}"
            )
        node = max(fits, key=lambda n: n.get("CPU", 0.0))
        for k, v in request.items():
            node[k] = node.get(k, 0.0) - v


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ("auto", "ray://host:10001", …) or start a local one (with
    `num_cpus`); once per process. The cluster's workers import this process's `vfs` (shipped as a
    runtime-env module), so driver and workers always run the same code; an operand type forced
    here (`VFS_FAST_DTYPE`) is forced there too, while `auto` lets each worker measure its own CPU."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(RAY_MISSING) from e
    if ray.is_initialized():
        return
    check_reachable(address)
    os.environ.setdefault("RAY_task_oom_retries", str(OOM_RETRIES))  # read as Ray starts here
    try:
        ray.init(
            address=address,
            num_cpus=num_cpus,
            include_dashboard=False if address is None else None,
            runtime_env={
                "py_modules": [str(Path(__file__).resolve().parents[1])],
                "env_vars": {k: os.environ[k] for k in ("VFS_FAST_DTYPE",) if k in os.environ},
            },
            log_to_driver=False,
            logging_level=logging.WARNING,  # not its INFO lines (a local instance started, a package pushed)
        )
    except ConnectionError as e:  # the port answers, but not to us: most often token authentication
        if "Could not find any running Ray instance" in str(e):  # `auto` with no cluster on this machine
            raise RuntimeError(
                f"{e} — start one with `ray start --head`, or give no address to start a local one"
            ) from e
        raise RuntimeError(
            f"{e} — a cluster started by `ray start --head` may require its token: set RAY_AUTH_MODE=token "
            "and give this machine the cluster's token (docs/cluster.md, 'A cluster of several machines')"
        ) from e
