"""VFS on a Ray cluster: cache builds by Ray Data (`build`) and sharded exact search (`sharded`).

Ray is imported only inside these modules' functions, so `vfs` stays importable (and the app
runs) without it; `requirements-ray.txt` installs it. Without an address, `connect` starts a
local cluster, so everything here runs on one machine exactly as on many.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_MISSING = "Ray is not installed: pip install -r requirements-ray.txt"


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
