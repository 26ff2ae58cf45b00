"""Shared pieces of the browser tests: where things are, the caches the UI does not build, artifacts.

(A module of its own, not conftest.py: tests/app has a conftest.py too, and `import conftest`
would be ambiguous.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}

DEMO = "demo"  # the Home page's one-click cache: <VFS_CACHE_DIR>/demo.zarr
DEMO_N = 213
LITE1 = "lite1"  # the same embedded dataset through EfficientNet-Lite1, for the Compare page
SYNTH = "synth1000"  # 1,000 images of 7×7×192 random features, for the latency check
SYNTH_N = 1000
LARGE = "synth10000"  # 10,000 images of the same shape: strokes on a cache of the size
LARGE_N = 10_000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether a local server answers `url` with 200 (Streamlit's health check, Jupyter's status)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_app(cache_dir: Path, log_path: Path, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on a free local port over `cache_dir` (no hosted/remote settings from
    the environment), output to `log_path`; returns once its health check answers. Raises
    RuntimeError with the log's tail if it exits or does not answer within `timeout_s`."""
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("VFS_HOSTED", "VFS_ALLOW_BUILD", "VFS_REMOTE_CACHES")
    }
    env |= {"VFS_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    address = ["--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1"]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "app.py",
                *address,
                "--browser.gatherUsageStats",
                "false",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not answers(f"{url}/_stcore/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_app(proc)
            raise RuntimeError(
                f"streamlit did not answer {url}/_stcore/health (exit code {proc.returncode}):\n"
                f"{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.05)
    return proc, url


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def record_latency(key: str, value) -> None:
    """Merge a figure into test-artifacts/latency.json (emptied when the server fixture starts)."""
    path = artifact("latency.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1) + "\n")


def build_demo(out: Path) -> Path:
    """The demo cache exactly as the Home page's button builds it (cache_jobs/demo.toml); kept when complete."""
    from vfs.cache import open_cache
    from vfs.jobs import BuildJob, build_cache

    try:
        if open_cache(out).complete:
            return out
    except Exception:  # noqa: BLE001 - absent or partial: (re)build / resume it
        pass
    build_cache(BuildJob.from_toml(ROOT / "cache_jobs" / "demo.toml", out=str(out)))
    return out


def build_lite1(out: Path) -> Path:
    """EfficientNet-Lite1 blocks.5 over the whole embedded demo dataset: the demo cache's images, in its order."""
    from vfs.jobs import BuildJob, build_cache

    build_cache(
        BuildJob(
            model="embedded:efficientnet_lite1",
            layer="blocks.5",
            data="embedded:skimage",
            label_col="label",
            domain_col="source",
            out=str(out),
        )
    )
    return out


def write_synthetic_cache(out: Path, n: int = SYNTH_N, seed: int = 0) -> Path:
    """A real, complete cache of `n` images with Lite0 blocks.5's shape (7×7×192): random features,
    blocky colour thumbnails (they compress; each one different: its index is written in its first
    row), labels "a" / "b". Written with `vfs.cache.CacheWriter`, so the app opens and searches it like
    any built cache; 10,000 images in about 20 s instead of a build of minutes."""
    import numpy as np
    import pandas as pd

    import vfs.cache.writer
    from vfs.cache import CacheSpec, CacheWriter
    from vfs.data import DataSpec
    from vfs.models import Preprocess, load_extractor

    d = load_extractor("embedded:efficientnet_lite0", "blocks.5").describe()
    h, w = d["grid"]
    spec = CacheSpec(
        model=d["spec"],
        layer=d["layer"],
        input_size=d["input_size"],
        grid=(h, w),
        channels=d["channels"],
        preprocess=Preprocess.from_dict(d["preprocess"]),
        data=DataSpec(f"synthetic:{n}", "label", None),
    )
    candidates = pd.DataFrame(
        {
            "path": [f"synthetic/{i:05d}.png" for i in range(n)],
            "label": np.where(np.arange(n) % 2 == 0, "a", "b"),
        }
    )
    rng = np.random.default_rng(seed)
    size = min(224, d["input_size"])  # as a build stores thumbnails (vfs.jobs.THUMB_MAX)
    block = -(-size // h)
    colours = rng.integers(0, 256, (97, h, w, 3), dtype=np.uint8)  # 97 patterns, made once
    patterns = [np.kron(c, np.ones((block, block, 1), np.uint8))[:size, :size] for c in colours]
    bits = 1 << np.arange(16)
    fsync, vfs.cache.writer.FSYNC = vfs.cache.writer.FSYNC, False  # a throw-away cache: no power-loss safety
    try:
        writer = CacheWriter.open(out, spec, candidates, size)
        for start in range(0, n, 256):
            features = rng.standard_normal((min(256, n - start), h, w, d["channels"]), dtype=np.float32)
            for i, f in enumerate(features.astype(np.float16), start):
                thumb = patterns[i % len(patterns)].copy()
                thumb[:4, : 4 * 16] = np.repeat(np.where(i & bits, 255, 0).astype(np.uint8), 4)[None, :, None]
                writer.add(i, f, thumb)
        writer.finish(candidates)
    finally:
        vfs.cache.writer.FSYNC = fsync
    return out


# --- strokes and their timing (the dashboard tests and bench/app_latency.py) ---------------------------
# Installed in every page before the app loads: counts the app's script runs and when its run
# state last changed, and stamps the mouse-up (pointerup; capture phase, so the canvas cannot hide it).
WATCH_RUNS = """
window.__vfs = {runs: 0, changed: performance.now(), state: null, mouseup: null, starts: []};
new MutationObserver(records => {
  for (const r of records) {
    const s = r.target.getAttribute('data-test-script-state');
    if (s === window.__vfs.state) continue;
    window.__vfs.state = s;
    window.__vfs.changed = performance.now();
    if (s === 'running') { window.__vfs.runs += 1; window.__vfs.starts.push(performance.now()); }
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['data-test-script-state']});
// pointerup: the canvas prevents the default of pointerdown, so no compatibility mouseup follows
for (const type of ['pointerup', 'mouseup'])
  window.addEventListener(type, () => { window.__vfs.mouseup ??= performance.now(); }, true);
"""

# True once at least `runs` script runs happened since the reset and the app has been idle for
# `quiet` ms, or, whatever the count, once it has been idle for `fallback` ms.
IDLE = """([runs, quiet, fallback]) => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
  if (app.getAttribute('data-test-connection-state') !== 'CONNECTED') return false;
  const idle = performance.now() - window.__vfs.changed;
  return (window.__vfs.runs >= runs && idle >= quiet) || idle >= fallback;
}"""

# The match tiles on screen ("3. score 0.87 · face · lfw" under each), as one string of their captions
# and image addresses, once at least `k` are there, none stale, each image decoded, and the string is
# not `before` (the results of the previous stroke): [performance.now(), signature, summary]; else false.
RESULTS_CHANGED = r"""([k, before]) => {
  const re = /^\d+\. score -?\d+\.\d\d( · |$)/;
  const captions = [...document.querySelectorAll('[data-testid="stImageCaption"]')]
    .filter(c => re.test(c.textContent.trim()));
  if (captions.length < k || captions.some(c => c.closest('[data-stale="true"]'))) return false;
  const images = captions.map(c => c.closest('[data-testid="stImageContainer"]')?.querySelector('img'));
  if (images.some(img => !img || !img.complete || img.naturalWidth === 0)) return false;
  const signature = captions.map(c => c.textContent.trim()).join('|') + '#' + images.map(i => i.src).join('|');
  if (signature === before) return false;
  const summary = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
    .map(c => c.textContent.trim()).find(t => /^\d+ results from \d+ images in/.test(t)) || '';
  return [performance.now(), signature, summary];
}"""
SUMMARY_MS = re.compile(r"^(\d+) results from (\d+) images in (\d+) ms")


def wait_idle(
    page, runs: int = 1, quiet_ms: int = 300, fallback_ms: int = 2500, timeout: int = 60_000
) -> None:
    """Wait for the app to finish: `runs` script runs since the last reset, then `quiet_ms` idle."""
    page.wait_for_function(IDLE, arg=[runs, quiet_ms, fallback_ms], timeout=timeout, polling=50)


def stroke(page, y: float = 0.45, x0: float = 0.3, x1: float = 0.7) -> None:
    """A real free-hand stroke across the canvas (fractions of its size): move, press, drag, release."""
    canvas = page.locator("canvas.vfs-paint")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + (y + 0.04) * box["height"], steps=25)
    page.mouse.up()


@dataclass
class StrokeTiming:
    latency_s: float  # mouse-up (the page's own pointerup) → the new results on screen
    to_rerun_s: float | None  # mouse-up → the rerun the stroke triggered starts
    search_ms: int | None  # the search time the page itself reports
    signature: str  # the results on screen (captions and images), to tell the next stroke's apart
    summary: str


def timed_stroke(page, k: int, before: str = "", y: float = 0.45, timeout_ms: int = 30_000) -> StrokeTiming:
    """Draw one stroke and wait until k match tiles other than `before` are on screen."""
    page.evaluate("() => { window.__vfs.mouseup = null; window.__vfs.starts = []; }")
    stroke(page, y)
    shown, signature, summary = page.wait_for_function(
        RESULTS_CHANGED, arg=[k, before], timeout=timeout_ms, polling="raf"
    ).json_value()
    mouseup, starts = page.evaluate("() => [window.__vfs.mouseup, window.__vfs.starts]")
    if mouseup is None:
        raise AssertionError("the page saw no mouse-up")
    start = next((t for t in starts if t >= mouseup), None)  # the rerun the stroke triggered
    m = SUMMARY_MS.match(summary)
    return StrokeTiming(
        latency_s=(shown - mouseup) / 1000,
        to_rerun_s=None if start is None else (start - mouseup) / 1000,
        search_ms=int(m.group(3)) if m else None,
        signature=signature,
        summary=summary,
    )
