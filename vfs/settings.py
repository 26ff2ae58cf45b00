"""Deployment settings of the app, read from the environment, and the rules a hosted app enforces.

A hosted instance (Streamlit Community Cloud, a shared server) serves strangers, so it builds
nothing, runs no user code (``python:`` model specs), reads no files outside its caches folder,
and lets no cache name point elsewhere. Streamlit-free so the rules are tested on their own.

Environment variables (on Streamlit Community Cloud, root-level secrets become variables too):

- ``VFS_CACHE_DIR``: the caches folder (default ``caches``, relative to the working directory);
- ``VFS_HOSTED``: ``1`` for a hosted instance (default ``0``);
- ``VFS_ALLOW_BUILD``: ``0`` switches building from the UI off (default ``1``; always off when hosted);
- ``VFS_MAX_UPLOAD_MB``: the largest query image accepted (default 20);
- ``VFS_REMOTE_CACHES``: comma-separated cache URLs (http, https, s3) listed beside the local ones;
- ``VFS_RAY_ADDRESS``: a Ray cluster (``auto``, ``host:6379``: builds may run there; ``ray://host:10001``,
  Ray Client: searches only) (docs/cluster.md);
- ``VFS_RAY_SHARDS``: with ``VFS_RAY_ADDRESS``, searches run on that many shards of the cache there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

CACHE_SUFFIX = ".zarr"
REMOTE_SCHEMES = ("http", "https", "s3")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    text = value.strip().lower()
    if text not in _TRUE | _FALSE:
        raise ValueError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")
    return text in _TRUE


def is_url(location: str | Path) -> bool:
    """A location with a scheme (http(s)://, s3://, file://, …: opened through fsspec) rather than a
    local path."""
    return "://" in str(location)


def is_remote(location: str) -> bool:
    """Whether a cache location is a URL a hosted app may be configured to serve (http, https, s3)."""
    return urlparse(location).scheme in REMOTE_SCHEMES


def safe_cache_path(root: str | Path, name: str) -> Path:
    """`root/<name>.zarr`, refusing any name that could leave `root` (``..``, absolute, separators)."""
    stem = name.strip().removesuffix(CACHE_SUFFIX)
    if not stem:
        raise ValueError("a cache needs a name: letters, digits, '_', '-' and '.'")
    if "/" in stem or "\\" in stem:
        raise ValueError(f"cache name {name!r}: no folder separators, please (caches live in {root})")
    if not _CACHE_NAME.fullmatch(stem) or stem in (".", ".."):
        raise ValueError(
            f"cache name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return Path(root) / f"{stem}{CACHE_SUFFIX}"


@dataclass(frozen=True)
class Settings:
    """What this instance of the app may do, and where its caches are."""

    cache_dir: Path = Path("caches")
    hosted: bool = False
    allow_build: bool = True
    max_upload_mb: int = 20
    remote_caches: tuple[str, ...] = ()
    ray_address: str | None = None
    ray_shards: int = 0  # 0: searches run in the app's process

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the ``VFS_*`` variables; a malformed value raises ValueError naming the variable."""
        env = os.environ if env is None else env
        hosted = _flag(env, "VFS_HOSTED", False)
        try:
            max_upload = int(env.get("VFS_MAX_UPLOAD_MB", "20"))
        except ValueError:
            value = env["VFS_MAX_UPLOAD_MB"]
            raise ValueError(f"VFS_MAX_UPLOAD_MB={value!r}: expected a whole number of MB") from None
        if max_upload < 1:
            raise ValueError(f"VFS_MAX_UPLOAD_MB={max_upload}: must be at least 1")
        remote = tuple(u.strip() for u in env.get("VFS_REMOTE_CACHES", "").split(",") if u.strip())
        for url in remote:
            if not is_remote(url):
                raise ValueError(f"VFS_REMOTE_CACHES: {url!r} is not an {'/'.join(REMOTE_SCHEMES)} URL")
        address = env.get("VFS_RAY_ADDRESS", "").strip() or None
        shards = env.get("VFS_RAY_SHARDS", "").strip() or "0"
        if not shards.isdecimal():  # "²" is a digit, not a number int() reads
            raise ValueError(f"VFS_RAY_SHARDS={shards!r}: expected a whole number of shards")
        if int(shards) and address is None:
            raise ValueError("VFS_RAY_SHARDS needs VFS_RAY_ADDRESS: the Ray cluster the shards run on")
        return cls(
            cache_dir=Path(env.get("VFS_CACHE_DIR") or "caches"),
            hosted=hosted,
            allow_build=_flag(env, "VFS_ALLOW_BUILD", True) and not hosted,
            max_upload_mb=max_upload,
            remote_caches=remote,
            ray_address=address,
            ray_shards=int(shards),
        )

    def cache_path(self, name: str) -> Path:
        """Where the cache called `name` lives in this instance's caches folder."""
        return safe_cache_path(self.cache_dir, name)

    def reads_dataset(self, source: str) -> bool:
        """Whether this instance may open a cache's dataset (`spec.data.source`, which whoever built
        the cache named) for a query image's own size: when hosted, only one in its caches folder or
        the images shipped with VFS."""
        from .data import EMBEDDED_DATASET  # here: the app reads its settings before PyTorch loads

        if not self.hosted or source == EMBEDDED_DATASET:
            return True
        root = Path(os.path.abspath(self.cache_dir))
        return not is_url(source) and Path(os.path.abspath(Path(source).expanduser())).is_relative_to(root)

    def check_model_spec(self, spec: str) -> None:
        """Refuse model specs that would run user code or read files outside the caches folder (hosted)."""
        from .models import KINDS, parse_model_spec  # here: the app reads its settings before PyTorch loads

        parsed = parse_model_spec(spec)
        kind = KINDS[parsed.kind]
        if not self.hosted:
            return
        if kind.runs_user_code:
            safe = [f"{other.prefix}:" for other in KINDS.values() if not other.runs_user_code]
            raise ValueError(
                f"{spec!r}: {kind.prefix}: model specs run arbitrary code and are switched off on this "
                f"server; choose a model of another kind ({', '.join(safe)})"
            )
        if kind.reads_local_file:
            root = Path(os.path.abspath(self.cache_dir))
            if not Path(os.path.abspath(Path(parsed.name).expanduser())).is_relative_to(root):
                raise ValueError(
                    f"{spec!r}: on this server a checkpoint must lie in the caches folder; "
                    "ask the server's maintainer to place it there"
                )
