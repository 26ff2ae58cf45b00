"""For the tests that write caches by hand (their spec) or read them over HTTP (a server)."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vfs.cache import CacheSpec
from vfs.data import DataSpec
from vfs.models import Preprocess


def synthetic_spec(
    grid: tuple[int, int],
    channels: int,
    input_size: int = 32,
    source: str = "x",
    label_col: str | None = None,
    domain_col: str | None = None,
    model: str = "embedded:efficientnet_lite0",
    layer: str = "blocks.5",
) -> CacheSpec:
    return CacheSpec(
        model=model,
        layer=layer,
        input_size=input_size,
        grid=grid,
        channels=channels,
        preprocess=Preprocess(input_size, input_size),
        data=DataSpec(source, label_col, domain_col),
    )


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """`folder` over HTTP on this machine, quietly, while the block runs: its base URL."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
