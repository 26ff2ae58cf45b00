"""VFS on a Ray cluster: cache builds by Ray Data (`build`) and sharded exact search (`sharded`).

Ray is imported only inside these modules' functions, so `vfs` stays importable (and the app
runs) without it; `requirements-ray.txt` installs it. Without an address, `connect` starts a
local cluster, so everything here runs on one machine exactly as on many.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

RAY_MISSING = "Ray is not installed: pip install -r requirements-ray.txt"
REACH_TIMEOUT_S = 5.0
"""How long `connect` waits for a cluster's address to answer before refusing it."""


def check_reachable(address: str | None) -> None:
    """Refuse at once a "host:port" or "ray://host:port" address that nothing answers at: `ray.init`
    retries one for minutes, deaf to SIGTERM meanwhile. Other forms ("auto", none) are Ray's own."""
    if address is None:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        raise RuntimeError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start one there "
            "(ray start --head) or give its address"
        ) from e


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
    ray.init(
        address=address,
        num_cpus=num_cpus,
        include_dashboard=False if address is None else None,
        runtime_env={
            "py_modules": [str(Path(__file__).resolve().parents[1])],
            "env_vars": {k: os.environ[k] for k in ("VFS_FAST_DTYPE",) if k in os.environ},
        },
        log_to_driver=False,
    )
