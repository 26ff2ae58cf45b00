"""The dashboard's speed as a user feels it (issue 11, "App"): mouse-up → results on the Search page,
and the first paint of a freshly started server.

Writes a synthetic cache of the embedded model's default layer shape (EfficientNet-Lite0 `blocks.5`,
7×7×192 fp16, `--n` images, 224-px thumbnails, labels a / b) with the project's cache writer, starts
`streamlit run app.py` on it (the only cache, so the Search page opens on it), and drives Debian's
Chromium through Playwright:

1. first paint: a new browser session opens `/` on the fresh server; seconds until the Home page's title
   is on screen (and until the server answered its health check, for comparison);
2. strokes: on `/search` (query image 0), `--strokes` real free-hand strokes (mouse down / move / up on
   the canvas, each lower than the last, so the region grows and the results change), `--pause-s`
   apart, as a user looks at the page before drawing again; for each, the time
   from the page's own pointerup to the new k match tiles on screen (captions and images differ from the
   previous stroke's, none stale, every image decoded), the part of it before the rerun starts, and the
   search ms the page itself reports.

Prints ONE JSON document (median / p95 / per-stroke ms, the environment with the CPU model):

    .venv/bin/python bench/app_latency.py                       # 10,000 images, 6 strokes (~1.5 min)
    .venv/bin/python bench/app_latency.py --cache-dir /tmp/vfs-bench --strokes 8   # keeps the cache
    .venv/bin/python bench/app_latency.py --cache /tmp/vfs-bench/real10k.zarr    # a real cache instead

`--cache` times an existing cache (e.g. bench/real_cache.py's: the embedded model's features of
10,000 real images, their thumbnails) in place of the synthetic one, linked as the app's only cache.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from _common import emit, environment, log

from tests.e2e.e2ehelpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    VIEWPORT,
    WATCH_RUNS,
    start_app,
    stop_app,
    timed_stroke,
    wait_idle,
)

K = 10  # the Search page's default k


def write_cache(cache_dir: Path, n: int) -> Path:
    from tests.e2e.e2ehelpers import write_synthetic_cache

    out = cache_dir / f"synth{n}.zarr"
    if out.exists():
        from vfs.cache import open_cache

        cache = open_cache(out)
        if cache.complete and cache.n == n:
            log(f"reusing {out}")
            return out
        shutil.rmtree(out)
    t = time.perf_counter()
    write_synthetic_cache(out, n)
    log(f"wrote {out} ({n} images) in {time.perf_counter() - t:.1f} s")
    return out


def describe(path: Path) -> dict:
    """What the JSON records of an existing cache: its size, shape and model."""
    from vfs.cache import open_cache

    cache = open_cache(path)
    if not cache.complete:
        raise SystemExit(f"{path} is not a complete cache")
    spec = cache.spec
    return {
        "path": str(path),
        "n": cache.n,
        "shape": [*spec.grid, spec.channels],
        "dtype": "float16",
        "synthetic": False,
        "model": spec.model,
        "layer": spec.layer,
    }


def first_paint(browser, url: str) -> dict:
    """A new session on `/`: seconds until Streamlit's frame, then the Home page's title, are on screen."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        t0 = time.perf_counter()
        page.goto(url)
        page.get_by_test_id("stApp").wait_for(state="visible", timeout=120_000)
        frame = time.perf_counter() - t0
        page.get_by_role("heading", name="Visual Feature Search").wait_for(state="visible", timeout=120_000)
        title = time.perf_counter() - t0
        page.get_by_test_id("stSidebarNav").wait_for(state="visible", timeout=120_000)
        nav = time.perf_counter() - t0
        return {"frame_s": round(frame, 3), "title_s": round(title, 3), "navigation_s": round(nav, 3)}
    finally:
        context.close()


def strokes(browser, url: str, count: int, pause_s: float) -> list[dict]:
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.add_init_script(WATCH_RUNS)
        page.goto(f"{url}/search")
        page.get_by_text("Draw on the query image to search").wait_for(state="visible", timeout=120_000)
        wait_idle(page, timeout=120_000)
        out, before = [], ""
        for n, y in enumerate(np.linspace(0.1, 0.9, count)):
            page.wait_for_timeout(pause_s * 1000)  # a user looks at the page before each stroke
            page.evaluate("() => { window.__vfs.runs = 0; window.__vfs.changed = performance.now(); }")
            t = timed_stroke(page, K, before, y=float(y), timeout_ms=60_000)
            before = t.signature
            out.append(
                {
                    "latency_ms": round(t.latency_s * 1e3, 1),
                    "to_rerun_ms": None if t.to_rerun_s is None else round(t.to_rerun_s * 1e3, 1),
                    "search_ms": t.search_ms,
                }
            )
            log(f"stroke {n + 1}: {out[-1]}  ({t.summary})")
            wait_idle(page)  # the rest of the run (table, exports) before the next stroke
        if page.get_by_test_id("stException").count():
            raise SystemExit("the app shows an exception: " + page.get_by_test_id("stException").inner_text())
        return out
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000, help="images in the synthetic cache")
    parser.add_argument("--strokes", type=int, default=6, help="strokes to time (at least 4)")
    parser.add_argument(
        "--pause-s", type=float, default=1.0, help="wait before each stroke, as a user looks (default 1 s)"
    )
    parser.add_argument(
        "--cache-dir", help="where the cache is written (and reused); default: a temporary folder"
    )
    parser.add_argument("--cache", help="time this existing cache instead of a synthetic one")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.cache and args.cache_dir:
        parser.error("--cache runs on the cache given: no --cache-dir to write one into")
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is absent: apt-get install -y chromium")
    temporary = args.cache_dir is None
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="vfs-app-latency-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"))
    proc = None
    try:
        if args.cache:
            (cache_dir / Path(args.cache).name).symlink_to(Path(args.cache).resolve())
            described = describe(Path(args.cache))
        else:
            write_cache(cache_dir, args.n)
            described = {"n": args.n, "shape": [7, 7, 192], "dtype": "float16", "synthetic": True}
        server_log = cache_dir / "streamlit.log"
        t0 = time.perf_counter()
        proc, url = start_app(cache_dir, server_log, timeout_s=120)
        start_s = time.perf_counter() - t0
        log(f"server up in {start_s:.2f} s at {url}")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                paint = first_paint(browser, url) | {"server_health_s": round(start_s, 3)}
                log(f"first paint: {paint}")
                timed = strokes(browser, url, max(args.strokes, 4), args.pause_s)
            finally:
                browser.close()
    finally:
        if proc is not None:
            stop_app(proc)
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)
    latencies = [s["latency_ms"] for s in timed]
    searches = [s["search_ms"] for s in timed if s["search_ms"] is not None]
    emit(
        {
            "bench": "app_latency",
            "what": "mouse-up → results on the Search page (Chromium), first paint of a fresh server",
            "cache": described,
            "k": K,
            "pause_s": args.pause_s,
            "median_ms": round(float(np.median(latencies)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "max_ms": max(latencies),
            "search_median_ms": float(np.median(searches)) if searches else None,
            "strokes": timed,
            "first_paint": paint,
            "environment": env,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
