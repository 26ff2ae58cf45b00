"""End-to-end fixtures: one `streamlit run app.py` on a free port of 127.0.0.1 for the session,
a fresh Chromium context per test, the extra caches built through the Python API, and
screenshots on failure (test-artifacts/).

The server starts on an empty caches folder (`VFS_CACHE_DIR`), so the Home page offers the demo
build as on a fresh install; the first test builds the demo cache through the UI. Chromium is
Debian's (`apt-get install chromium`), never a Playwright download (see ../shared/STACK.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from e2ehelpers import (
    CHROMIUM,
    DEMO,
    LARGE,
    LARGE_N,
    LITE1,
    SYNTH,
    SYNTH_N,
    VIEWPORT,
    artifact,
    build_demo,
    build_lite1,
    start_app,
    stop_app,
    write_synthetic_cache,
)

SERVER_START_S = 90


# --- each test's outcome, for the artifacts on failure ----------------------------------------------
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter):
    """Show the measured mouse-up → results times (test-artifacts/latency.json) even without -s."""
    path = artifact("latency.json")
    if getattr(terminalreporter.config, "_vfs_e2e_server_started", False) and path.exists():
        terminalreporter.section("mouse-up → results on screen (test-artifacts/latency.json)")
        terminalreporter.write_line(path.read_text().strip())


def tall_screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport to its height first."""
    try:
        height = page.evaluate(
            "() => Math.max(...[document.querySelector('[data-testid=stMain]'), document.scrollingElement]"
            ".filter(Boolean).map(e => e.scrollHeight))"
        )
        page.set_viewport_size(
            {"width": VIEWPORT["width"], "height": int(min(max(height, VIEWPORT["height"]), 12_000))}
        )
        page.wait_for_timeout(300)  # let the layout follow the new size
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)


# --- the server ------------------------------------------------------------------------------------
class Server:
    def __init__(self, url: str, cache_dir: Path, log: Path):
        self.url, self.cache_dir, self.log = url, cache_dir, log

    def cache(self, name: str) -> Path:
        return self.cache_dir / f"{name}.zarr"

    def log_tail(self, chars: int = 20_000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def server(pytestconfig):
    """`streamlit run app.py` on a free port over a fresh, empty caches folder; stopped at the end.
    Its output goes to test-artifacts/streamlit.log."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium chromium-driver")
    cache_dir = Path(tempfile.mkdtemp(prefix="vfs-e2e-caches-"))
    artifact("latency.json").unlink(missing_ok=True)
    pytestconfig._vfs_e2e_server_started = True
    log = artifact("streamlit.log")
    try:
        proc, url = start_app(cache_dir, log, SERVER_START_S)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield Server(url, cache_dir, log)
    finally:
        stop_app(proc)
        shutil.rmtree(cache_dir, ignore_errors=True)


# --- the browser: `browser` is tests/conftest.py's, shared with the notebook tests ------------------
@pytest.fixture
def page(request, browser, server):
    """A page in a fresh browser context (so a new Streamlit session) on the session's server.

    On failure: test-artifacts/<test>-FAILED.png (the whole page), .html, the server log, JS errors.
    With VFS_E2E_SHOTS=1 a screenshot is saved after every test (test-artifacts/<test>.png).
    """
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    js_errors: list[str] = []
    pg.on("pageerror", lambda e: js_errors.append(str(e)))
    yield pg
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )
    name = request.node.name
    try:
        if failed or os.environ.get("VFS_E2E_SHOTS") == "1":
            tall_screenshot(pg, artifact(f"{name}{'-FAILED' if failed else ''}.png"))
        if failed:
            artifact(f"{name}-FAILED.html").write_text(pg.content())
            artifact(f"{name}-FAILED-server.log").write_text(server.log_tail())
            if js_errors:
                artifact(f"{name}-FAILED-js-errors.txt").write_text("\n".join(js_errors))
    except Exception as e:  # noqa: BLE001 - never hide the test's own failure
        print(f"could not save the artifacts of {name}: {e}", file=sys.stderr)
    finally:
        context.close()


# --- caches the UI does not build ------------------------------------------------------------------
@pytest.fixture
def demo_cache(server) -> Path:
    """The demo cache: built through the UI by the Home test, or through the API when that one did not run."""
    return build_demo(server.cache(DEMO))


def _timed(what: str, make: Callable[[], Path]) -> Path:
    """Make a cache and say how long it took (shown in the test log)."""
    t0 = time.perf_counter()
    out = make()
    print(f"\n{what} in {time.perf_counter() - t0:.1f} s")
    return out


@pytest.fixture(scope="session")
def lite1_cache(server) -> Path:
    return _timed("Lite1 cache (213 images) built through the API", lambda: build_lite1(server.cache(LITE1)))


@pytest.fixture(scope="session")
def synthetic_cache(server) -> Path:
    return _timed(
        f"synthetic {SYNTH_N}-image cache written", lambda: write_synthetic_cache(server.cache(SYNTH))
    )


@pytest.fixture(scope="session")
def large_cache(server) -> Path:
    return _timed(
        f"synthetic {LARGE_N}-image cache written",
        lambda: write_synthetic_cache(server.cache(LARGE), n=LARGE_N),
    )
