"""The widget in a real JupyterLab: paint with the mouse in Chromium, see the matches come back.

JupyterLab runs on a free port of 127.0.0.1 (token, no browser) over a copy of search_widget.ipynb,
with the session's 40-image cache; Chromium is Debian's, as in tests/e2e. The mouse-up → results
times go to test-artifacts/notebook-latency.json; a screenshot to test-artifacts/notebook-widget.png.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.e2ehelpers import CHROMIUM, ROOT, VIEWPORT, answers, artifact, free_port

pytestmark = pytest.mark.browser

NOTEBOOK = Path(__file__).with_name("search_widget.ipynb")
LAB_START_S = 90
WIDGET_S = 120  # the kernel starts and imports torch before the widget shows
SETTINGS = {  # JupyterLab's user settings: start the notebook's kernel without asking; no news, offline
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


@pytest.fixture(scope="module")
def lab(demo_cache, tmp_path_factory):
    """`jupyter lab` over a temporary folder holding the test notebook; yields the notebook's URL."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    pytest.importorskip("jupyterlab")
    home = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, home)
    for name, values in SETTINGS.items():
        (home / ".settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (home / ".settings" / name).write_text(json.dumps(values))
    token, port = secrets.token_hex(16), free_port()
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / ".runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / ".workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / ".settings"),
        "IPYTHONDIR": str(home / ".ipython"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "VFS_NOTEBOOK_CACHE": demo_cache.location,
    }
    log = artifact("jupyterlab.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.token={token}",
                f"--ServerApp.root_dir={home}",
                "--allow-root",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LAB_START_S
        while not answers(f"{base}/api/status?token={token}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield f"{base}/lab/tree/{NOTEBOOK.name}?token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def page(lab, browser):  # the session's Chromium (tests/conftest.py)
    pg = browser.new_page(viewport=VIEWPORT)
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        pg.screenshot(path=str(artifact("notebook-widget.png")), full_page=True)
        pg.close()


def revision(page) -> int:
    return int(page.locator(".vfs-matches").first.get_attribute("data-revision"))


def drag(page, box: dict, points: list[tuple[float, float]], release: bool = True) -> None:
    """Press, drag the mouse through `points` (fractions of `box`, a canvas's), release."""
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=12)
    if release:
        page.mouse.up()


def stroke(page, points: list[tuple[float, float]]) -> float:
    """Drag the mouse through `points` (fractions of the canvas); seconds from mouse-up to Python's answer."""
    before = revision(page)
    drag(page, page.locator(".vfs-paint").first.bounding_box(), points, release=False)
    t0 = time.perf_counter()
    page.mouse.up()
    page.wait_for_function(
        "r => Number(document.querySelector('.vfs-matches').dataset.revision) > r", arg=before
    )
    return time.perf_counter() - t0


def matches(page) -> list[tuple[int, float]]:
    """(image index, score) of every match the first view shows, in rank order."""
    view = page.locator(".vfs-matches").first
    indices = [int(i) for i in view.locator(".vfs-match").evaluate_all("ts => ts.map(t => t.dataset.index)")]
    return list(zip(indices, map(float, view.locator(".vfs-score").all_inner_texts())))


def answered(page, act) -> None:
    """Do `act()` and wait for Python's answer to it."""
    before = revision(page)
    act()
    page.wait_for_function(
        "r => Number(document.querySelector('.vfs-matches').dataset.revision) > r", arg=before
    )


def click_and_wait(page, name: str) -> None:
    answered(page, page.get_by_role("button", name=name, exact=True).click)


def press_and_wait(page, keys: str) -> None:
    answered(page, lambda: page.keyboard.press(keys))


def test_paint_in_jupyterlab(page, lab):
    page.goto(lab)
    page.wait_for_selector(".jp-Notebook")
    # The status bar names the kernel once its session is connected (before, a run is dropped).
    page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
    page.keyboard.press("Shift+Enter")
    page.locator(".vfs-paint").wait_for(state="visible", timeout=WIDGET_S * 1000)
    assert page.locator(".vfs-view").evaluate("img => img.complete && img.naturalWidth") > 0

    first_s = stroke(page, [(0.35, 0.35), (0.5, 0.45), (0.65, 0.4)])  # across the face
    first = matches(page)
    assert len(first) >= 5 and page.locator(".vfs-error").is_hidden()
    scores = [s for _, s in first]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert " results from " in page.locator(".vfs-status").inner_text()  # SearchResult.caption
    assert page.locator(".vfs-mask img").is_visible()

    page.get_by_role("button", name="Rectangle", exact=True).click()
    second_s = stroke(page, [(0.02, 0.7), (0.3, 0.97)])  # a corner of the background
    second = matches(page)
    assert len(second) >= 5 and second != first

    click_and_wait(page, "Undo")  # back to the first stroke alone: its results again
    assert matches(page) == first
    click_and_wait(page, "Redo")  # and the rectangle again
    assert matches(page) == second
    cells = page.locator(".jp-Cell").count()
    press_and_wait(page, "Control+z")  # the Redo click left the focus on the canvas: the keys undo there
    assert matches(page) == first
    press_and_wait(page, "Control+Shift+z")
    assert matches(page) == second and page.locator(".jp-Cell").count() == cells  # JupyterLab kept its cells

    code_cells = page.locator(".jp-CodeCell").count()
    page.locator(".vfs-k input").click()
    page.keyboard.press("Control+a")
    page.keyboard.type("3")  # not JupyterLab's "heading 3" shortcut
    press_and_wait(page, "Enter")  # Enter sets k, as leaving the box does
    assert matches(page) == second[:3]
    before = revision(page)
    page.keyboard.press("Control+z")  # the box's own undo: not the drawing's
    page.wait_for_timeout(1500)
    assert revision(page) == before and matches(page) == second[:3]
    assert page.locator(".jp-CodeCell").count() == code_cells and page.locator(".jp-Cell").count() == cells
    for bad in ("0", "5000", "2.5"):  # not a count, or a typo's thousands of tiles: the box takes k back
        page.locator(".vfs-k input").click()
        page.keyboard.press("Control+a")
        page.keyboard.type(bad)
        page.keyboard.press("Enter")
        page.wait_for_timeout(500)
        assert page.locator(".vfs-k input").input_value() == "3" and revision(page) == before

    view = page.locator(".vfs-view").get_attribute("src")
    painted = (
        "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 == 3 && v)"
    )
    page.locator(".jp-CodeCell .jp-InputArea-editor").nth(1).click()
    press_and_wait(page, "Shift+Enter")  # w.set_query(3): the drawing stays and is searched from there
    assert page.locator(".vfs-view").get_attribute("src") != view and page.locator(".vfs-paint").evaluate(
        painted
    )
    page.locator(".vfs-matches").scroll_into_view_if_needed()  # JupyterLab leaves unseen cells undrawn
    third = matches(page)
    assert len(third) == 3 and third != second[:3] and page.locator(".vfs-error").is_hidden()
    click_and_wait(page, "Clear")
    assert matches(page) == [] and "Paint over" in page.locator(".vfs-status").inner_text()
    redo = page.get_by_role("button", name="Redo", exact=True)  # nothing to redo after a clear
    assert redo.is_disabled() and float(redo.evaluate("b => getComputedStyle(b).opacity")) < 1  # looks it

    # The keys paint the grid's cells (the painter's keyboard painting, as in the dashboard). The Clear
    # click left the focus on the canvas, for Ctrl+Z: there the keys do not paint; Tab brings the cursor.
    page.keyboard.press("ArrowRight")
    assert page.locator(".vfs-cell-cursor").is_hidden()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    page.locator(".vfs-cell-cursor").wait_for(state="visible")
    assert page.locator(".vfs-stage .vfs-said").inner_text() == "row 4 of 7, column 4 of 7"
    page.keyboard.press("Shift+ArrowRight")
    press_and_wait(page, "Space")
    assert len(matches(page)) == 3 and page.locator(".vfs-error").is_hidden()
    assert page.locator(".vfs-mask figcaption").inner_text().startswith("2 of 49 feature cells selected")

    # A second view of the widget (its variable shown by another cell): a stroke there is this view's
    # too, and Undo here takes it back — this view's history was reset by another view's change.
    shown = matches(page)
    page.locator(".jp-CodeCell .jp-InputArea-editor").nth(2).click()
    page.keyboard.press("Shift+Enter")
    second_view = page.locator(".vfs-paint").nth(1)
    second_view.wait_for(state="visible", timeout=WIDGET_S * 1000)
    second_view.scroll_into_view_if_needed()
    box = second_view.bounding_box()
    answered(page, lambda: drag(page, box, [(0.1, 0.1), (0.3, 0.2)]))
    page.locator(".vfs-matches").first.scroll_into_view_if_needed()
    assert matches(page) != shown
    undo = page.get_by_role("button", name="Undo", exact=True).first
    assert undo.is_enabled()
    answered(page, undo.click)
    assert matches(page) == shown

    # A restarted kernel leaves the widget without its Python: a stroke says so, not "Searching…" for ever.
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.get_by_role("menuitem", name="Kernel", exact=True).click()
    page.get_by_role("menuitem", name="Restart Kernel…").click()
    page.locator(".jp-Dialog .jp-mod-accept").click()  # "Restart"
    page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    page.locator(".vfs-paint").first.scroll_into_view_if_needed()
    drag(page, page.locator(".vfs-paint").first.bounding_box(), [(0.4, 0.4), (0.6, 0.5)])
    error = page.locator(".vfs-error").first
    error.wait_for(state="visible", timeout=10_000)
    assert "lost its kernel" in error.inner_text() and "run its cell again" in error.inner_text()
    assert "Searching" not in page.locator(".vfs-status").first.inner_text() and errors == []

    figures = {"first_stroke_s": round(first_s, 3), "second_stroke_s": round(second_s, 3)}
    artifact("notebook-latency.json").write_text(json.dumps(figures) + "\n")
    print(f"\nmouse-up → results in the notebook: {figures}")
