"""For the tests that write caches by hand (their spec), datasets of findings, or read caches over
HTTP (a server)."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

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
def served(folder: Path, stalled: threading.Event | None = None) -> Iterator[str]:
    """`folder` over HTTP on this machine, quietly, while the block runs: its base URL. While
    `stalled` is set, a request for a `zarr.json` gets no answer (a server that hangs)."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            while stalled is not None and stalled.is_set() and self.path.endswith("/zarr.json"):
                time.sleep(0.02)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


FINDINGS = [
    "Cardiomegaly|Effusion",
    "No Finding",
    "Cardiomegaly",
    "Effusion",
    "No Finding",
    "Cardiomegaly|Edema",
]


def write_findings(folder: Path, copies: int = 1, seed: int = 0, finding_column: bool = False) -> Path:
    """A small manifest dataset shaped like the NIH X-ray sample: `FINDINGS` × `copies` as '|'-joined
    findings in `label`, a view, and with `finding_column` a true/false `cardiomegaly` column; random
    48 px pictures. Returns the manifest."""
    rng = np.random.default_rng(seed)
    labels = FINDINGS * copies
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png"
        )
    columns = {
        "path": [f"images/{i}.png" for i in range(len(labels))],
        "label": labels,
        "view": ["PA", "AP"] * (3 * copies),
    }
    if finding_column:
        columns["cardiomegaly"] = ["true" if "Cardiomegaly" in v else "false" for v in labels]
    manifest = folder / "manifest.csv"
    pd.DataFrame(columns).to_csv(manifest, index=False)
    return manifest
