"""The dashboard end to end in Chromium: what a new user does, offline, on a fresh install.

In order, on one server (conftest.py): build the demo cache from the Home page; on Search draw a
real mouse stroke over a face and see k scored matches (and time mouse-up → results, on the demo
cache and on a 1,000-image cache: the issue asks ≤ 1.5 s); export CSV / JSON / PNG; the
Distributions page's box plot and group table (face / not face); Compare, Lite0 against Lite1;
at 1400 and 1024 px wide, the canvas shows whole and its buttons cover no control on any of those
pages; its undo, redo, clear and rectangle work, and its drawing follows the query to Distributions.

Last, strokes on a 10,000-image cache: each one updates the results (the stroke's timing is in
test-artifacts/latency.json; the speed itself is bench/app_latency.py's).

Each test opens a fresh browser context (a new Streamlit session). Waits follow the app's own
run state (`data-test-script-state` on the stApp element) instead of sleeping.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cachehelpers import write_findings
from e2ehelpers import (
    CHROMIUM,
    DEMO,
    DEMO_N,
    LARGE,
    LARGE_N,
    LITE1,
    RESULTS_CHANGED,
    SYNTH,
    SYNTH_N,
    VIEWPORT,
    WATCH_RUNS,
    artifact,
    record_latency,
    stroke,
    timed_stroke,
    wait_idle,
)
from PIL import Image

from vfs.cli import main as cli_main
from vfs.jobs import BuildJob, build_cache
from vfs.render import region_mask_png
from vfs.stats import GROUP_TABLE_COLUMNS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install -y chromium chromium-driver)"
    ),
]
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = playwright.expect

FACE = 20  # lfw/face_007 in the demo dataset (13 scikit-image photos, then 100 LFW faces, then 100 non-faces)
BUILD_TIMEOUT_MS = 240_000  # the demo build: ~20 s on 2 idle cores, much more on a busy machine
RESULT_TIMEOUT_MS = 30_000
LATENCY_LIMIT_S = 1.5
SCORE_CAPTION = re.compile(r"^(\d+)\. score (-?\d+\.\d\d)( · |$)")

# performance.now() as soon as `k` match tiles ("3. score 0.87 · face · lfw") are on screen, none
# stale, each image decoded; false before.
RESULTS_SHOWN = r"""(k) => {
  const re = /^\d+\. score -?\d+\.\d\d( · |$)/;
  const captions = [...document.querySelectorAll('[data-testid="stImageCaption"]')]
    .filter(c => re.test(c.textContent.trim()) && !c.closest('[data-stale="true"]'));
  if (captions.length < k) return false;
  for (const c of captions) {
    const img = c.closest('[data-testid="stImageContainer"]')?.querySelector('img');
    if (!img || !img.complete || img.naturalWidth === 0) return false;
  }
  return performance.now();
}"""


# --- helpers ------------------------------------------------------------------------------------------
def open_page(page, server, path: str = "", runs: int = 1):
    page.add_init_script(WATCH_RUNS)
    page.goto(f"{server.url}/{path}")
    expect(page.get_by_test_id("stApp")).to_be_visible(timeout=60_000)
    wait_idle(page, runs, timeout=90_000)
    return page


def reset_runs(page) -> None:
    page.evaluate("() => { window.__vfs.runs = 0; window.__vfs.changed = performance.now(); }")


def no_exception(page) -> None:
    exceptions = page.get_by_test_id("stException")
    assert exceptions.count() == 0, "the app shows an exception:\n" + "\n".join(exceptions.all_inner_texts())


def choose(page, label: str, option_prefix: str) -> None:
    """Pick the option starting with `option_prefix` in the selectbox labelled `label` (no rerun if already chosen)."""
    box = page.get_by_role("combobox", name=label, exact=True)
    expect(box).to_be_visible()
    if box.input_value().startswith(option_prefix):
        return
    reset_runs(page)
    box.click()
    page.get_by_role("option", name=re.compile("^" + re.escape(option_prefix))).click()
    expect(box).to_have_value(re.compile("^" + re.escape(option_prefix)))
    wait_idle(page)


def set_query_index(page, n_images: int, index: int) -> None:
    """Type the query image's index; a new query mounts a new canvas."""
    field = page.get_by_label(f"Image index (0–{n_images - 1})")
    if field.input_value() == str(index):
        return
    reset_runs(page)
    field.fill(str(index))
    field.press("Enter")
    wait_idle(page)
    expect(field).to_have_value(str(index))


def k_value(page, label: str = "Results (k)") -> int:
    slider = page.get_by_test_id("stSlider").filter(has=page.get_by_text(label, exact=True))
    return int(slider.get_by_test_id("stSliderThumbValue").inner_text())


def draw_and_time(page, k: int) -> float:
    """Draw on a query with no region yet; seconds from mouse-up until its k matches are on screen."""
    expect(page.get_by_text("Draw on the query image to search")).to_be_visible()
    assert score_captions(page) == [], "results on screen before the stroke"
    page.evaluate("() => { window.__vfs.mouseup = null; window.__vfs.starts = []; }")
    t0 = time.perf_counter()
    stroke(page)
    up_wall = time.perf_counter()
    shown = page.wait_for_function(
        RESULTS_SHOWN, arg=k, timeout=RESULT_TIMEOUT_MS, polling="raf"
    ).json_value()
    wall = time.perf_counter() - up_wall
    mouseup, starts = page.evaluate("() => [window.__vfs.mouseup, window.__vfs.starts]")
    assert mouseup is not None, "the page saw no mouse-up"
    latency = (shown - mouseup) / 1000
    start = next((t for t in starts if t >= mouseup), None)  # the rerun the stroke triggered
    split = (
        ""
        if start is None
        else f" = {(start - mouseup) / 1000:.3f} s to the rerun + {(shown - start) / 1000:.3f} s rerun"
    )
    print(
        f"  stroke {up_wall - t0:.2f} s; mouse-up → {k} results on screen: {latency:.3f} s{split} (test side {wall:.3f} s)"
    )
    return latency


def score_captions(page) -> list[tuple[int, float, str]]:
    out = []
    for text in page.get_by_test_id("stImageCaption").all_inner_texts():
        m = SCORE_CAPTION.match(text.strip())
        if m:
            out.append((int(m.group(1)), float(m.group(2)), text.strip()))
    return out


def assert_ranked(captions: list[tuple[int, float, str]], k: int) -> None:
    assert [r for r, _, _ in captions] == list(range(1, k + 1)), captions
    scores = [s for _, s, _ in captions]
    assert scores == sorted(scores, reverse=True), f"scores not in descending order: {scores}"
    assert all(-1.0 <= s <= 1.0 for s in scores), scores


def grid_rows(frame) -> list[list[str]]:
    """The rows of a st.dataframe, from the data grid's accessibility table (header row first)."""
    expect(frame.locator('[role="row"]').first).to_be_attached()
    rows = []
    for row in frame.locator('[role="row"]').all():
        cells = row.locator('[role="columnheader"], [role="gridcell"]').all_text_contents()
        if cells:
            rows.append([c.strip() for c in cells])
    return rows


def search_demo_face(page, server) -> int:
    """Open Search on the demo cache, take a face as the query, draw on it; returns k."""
    open_page(page, server, "search")
    choose(page, "Cache", f"{DEMO} — ")
    set_query_index(page, DEMO_N, FACE)
    k = k_value(page)
    draw_and_time(page, k)
    return k


# --- 1. Home: a fresh install builds the demo cache in one click ----------------------------------------
def test_home_builds_the_demo_cache(page, server):
    asked = []  # every URL the page fetches: none may leave the machine (README: works offline)
    page.on("request", lambda request: asked.append(request.url))
    open_page(page, server)
    expect(page.get_by_role("heading", name="Visual Feature Search")).to_be_visible()
    expect(page.get_by_text("No caches yet in")).to_be_visible()
    button = page.get_by_role("button", name="Build the demo cache")
    expect(button).to_be_visible()
    t0 = time.perf_counter()
    button.click()
    expect(page.get_by_text(re.compile(r"^demo: (starting|\d+ / 213 images|complete)"))).to_be_visible(
        timeout=30_000
    )
    expect(page.get_by_text(re.compile(rf"^demo: complete with {DEMO_N} images"))).to_be_visible(
        timeout=BUILD_TIMEOUT_MS
    )
    print(f"\ndemo cache built through the UI in {time.perf_counter() - t0:.1f} s")
    # the page reruns when the build ends: the cache list shows it complete, the button is gone
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_be_visible(timeout=30_000)
    rows = grid_rows(table)
    header, body = rows[0], rows[1:]
    demo = [dict(zip(header, r)) for r in body if r and r[0] == DEMO]
    assert demo, rows
    assert demo[0]["status"] == "complete" and demo[0]["images"] == str(DEMO_N), demo
    expect(page.get_by_role("button", name=re.compile("demo cache"))).to_have_count(0)
    expect(page.get_by_role("link", name="Search a cache")).to_be_visible()
    no_exception(page)
    elsewhere = [u for u in asked if not u.startswith((server.url, "data:", "blob:"))]
    assert not elsewhere, elsewhere  # e.g. a :material: favicon, which Streamlit fetches from Google


# --- 2. Search: a real stroke over a face, k scored matches, and the time it takes -------------------------
def test_search_stroke_on_a_face(page, server, demo_cache, synthetic_cache):
    open_page(page, server, "search")
    choose(page, "Cache", f"{DEMO} — ")
    set_query_index(page, DEMO_N, FACE)
    k = k_value(page)
    demo_latency = draw_and_time(page, k)
    captions = score_captions(page)
    assert_ranked(captions, k)
    faces = sum(" · face · " in c for _, _, c in captions)
    assert faces >= k * 0.8, f"a stroke over a face should match faces: {captions}"
    summary = page.get_by_text(re.compile(rf"^{k} results from {DEMO_N} images in \d+ ms"))
    expect(summary).to_be_visible()
    expect(page.get_by_text(re.compile(r"feature cells selected"))).to_be_visible()
    expect(page.get_by_role("heading", name="Results")).to_be_visible()
    no_exception(page)
    record_latency("demo_213_images_s", round(demo_latency, 3))

    # the same on a 1,000-image cache (7×7×192 like the demo): median of three strokes on fresh queries
    wait_idle(page)
    choose(page, "Cache", f"{SYNTH} — ")
    latencies = []
    for index in (1, 2, 3):
        set_query_index(page, SYNTH_N, index)
        latencies.append(draw_and_time(page, k))
        expect(page.get_by_text(re.compile(rf"^{k} results from {SYNTH_N} images in \d+ ms"))).to_be_visible()
        assert_ranked(score_captions(page), k)
        wait_idle(page)
    median = statistics.median(latencies)
    print(
        f"mouse-up → results: demo ({DEMO_N} images) {demo_latency:.3f} s; "
        f"{SYNTH_N} images {', '.join(f'{x:.3f}' for x in latencies)} s, median {median:.3f} s"
    )
    record_latency(f"synthetic_{SYNTH_N}_images_s", [round(x, 3) for x in latencies])
    record_latency(f"synthetic_{SYNTH_N}_images_median_s", round(median, 3))
    record_latency("load_average_1_5_15", [round(x, 2) for x in os.getloadavg()])
    no_exception(page)
    assert median <= LATENCY_LIMIT_S, (
        f"mouse-up → results on {SYNTH_N} images: median {median:.2f} s > {LATENCY_LIMIT_S} s"
    )


# --- 3. Export: CSV (and JSON, PNG) of the results ------------------------------------------------------------
def test_export_results(page, server, demo_cache, tmp_path, capsys):
    k = search_demo_face(page, server)
    shown = score_captions(page)

    for width in (1400, 1024, 800):  # each label whole at any width (four columns cut them to "Download …")
        page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
        page.wait_for_timeout(300)
        assert not page.evaluate(CUT_LABELS), (width, page.evaluate(CUT_LABELS))
    page.set_viewport_size(VIEWPORT)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download results (CSV)").click()
    download = info.value
    # the search's own name (a digest of its region and options): another search's files are told apart
    assert re.fullmatch(r"vfs-.+-[0-9a-f]{6}\.csv", download.suggested_filename), download.suggested_filename
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert rows, "empty CSV"
    assert {"rank", "score"} <= set(rows[0]), f"CSV header: {list(rows[0])}"
    assert len(rows) == k, f"{len(rows)} rows, expected {k}"
    assert [int(r["rank"]) for r in rows] == list(range(1, k + 1))
    assert [round(float(r["score"]), 2) for r in rows] == [s for _, s, _ in shown], (
        "CSV scores ≠ scores on screen"
    )

    with page.expect_download() as info:
        page.get_by_role("button", name="Download results (JSON)").click()
    data = json.loads(Path(info.value.path()).read_text())
    assert len(data["results"]) == k and data["results"][0]["rank"] == 1, data
    assert data["options"] == {"k": k, "per_domain": None, "labels": None, "exclude_same": None}  # its flags

    with page.expect_download() as info:
        page.get_by_role("button", name="Download figure (PNG)").click()
    assert Path(info.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the figure is not a PNG"

    # the painted region as a mask file: the same search again, by the CLI
    with page.expect_download() as info:
        page.get_by_role("button", name="Download region (PNG mask)").click()
    capsys.readouterr()
    argv = [
        "search",
        str(demo_cache),
        "--query-index",
        str(FACE),
        "--mask",
        str(info.value.path()),
        "--k",
        str(k),
    ]
    assert cli_main([*argv, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["results"]
    assert [r["index"] for r in again] == [int(r["index"]) for r in rows], (
        "the region does not repeat the search"
    )

    # … and back into the app: on a cleared canvas, the file gives the same paint and the same results
    region_file = tmp_path / info.value.suggested_filename  # as a browser saves it: the uploader wants .png
    assert region_file.suffix == ".png", region_file
    info.value.save_as(region_file)
    searched = page.evaluate(RESULTS_CHANGED, [k, ""])[1]
    wait_idle(page)
    page.locator(".vfs-canvas-bar").get_by_role("button", name="Clear", exact=True).click()
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    wait_idle(page)
    uploader = page.get_by_test_id("stFileUploader").filter(has_text="Load a region (PNG mask)")
    uploader.locator("input[type=file]").set_input_files(region_file)
    page.wait_for_function(RESULTS_CHANGED, arg=[k, ""], timeout=RESULT_TIMEOUT_MS)
    assert page.evaluate(RESULTS_CHANGED, [k, ""])[1] == searched
    canvas = page.locator("canvas.vfs-paint")
    saved = np.asarray(Image.open(region_file))[..., 3] > 0
    wait_painted(canvas, int(saved.sum()))
    loaded = canvas_alpha(canvas) > 0
    np.testing.assert_array_equal(loaded, saved)
    wait_idle(page)
    more = timed_stroke(page, k, searched, y=0.8, timeout_ms=RESULT_TIMEOUT_MS).signature  # paints on it
    assert canvas.evaluate(PAINTED) > loaded.sum()
    wait_idle(page)
    assert press_and_wait(page, "Control+z", k, more) == searched  # the loaded region, one step back
    np.testing.assert_array_equal(canvas_alpha(canvas) > 0, loaded)
    # a dithered mask (a thresholded saliency map, say) is drawn pixel for pixel too
    dithered = np.random.default_rng(0).random(loaded.shape) < 0.5
    (tmp_path / "dithered.png").write_bytes(region_mask_png(dithered))
    wait_idle(page)
    uploader.locator("input[type=file]").set_input_files(tmp_path / "dithered.png")
    page.wait_for_function(RESULTS_CHANGED, arg=[k, searched], timeout=RESULT_TIMEOUT_MS)
    wait_painted(canvas, int(dithered.sum()))
    np.testing.assert_array_equal(canvas_alpha(canvas) > 0, dithered)
    wait_idle(page)
    undo = page.locator(".vfs-canvas-bar").get_by_role("button", name="Undo", exact=True)
    assert click_and_wait(page, "Undo", k, page.evaluate(RESULTS_CHANGED, [k, ""])[1]) == searched
    np.testing.assert_array_equal(canvas_alpha(canvas) > 0, loaded)  # the drawing the mask replaced
    assert undo.is_disabled()  # and no further: the canvas opened with the mask
    no_exception(page)


# The download buttons whose label does not fit them.
CUT_LABELS = """() => [...document.querySelectorAll('[data-testid=stDownloadButton] button')].filter(
  b => [b, ...b.querySelectorAll('*')].some(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
).map(b => b.innerText.trim())"""


def wait_painted(canvas, n: int, timeout_s: float = 10.0) -> None:
    """Wait until the canvas holds n painted pixels: a canvas opened anew (a loaded region) draws its
    shapes as it mounts, which can come after the results it searched for are on screen — and the
    canvas it replaces can still be on the page beside it for a moment (CI, 30 Nov)."""
    end = time.monotonic() + timeout_s
    painted = None
    while canvas.count() != 1 or (painted := canvas.evaluate(PAINTED)) != n:
        assert time.monotonic() < end, f"the canvas holds {painted} painted pixels, not {n}"
        time.sleep(0.1)


def canvas_alpha(canvas) -> np.ndarray:
    """The canvas's paint (its alpha), read from the page as the PNG it would send."""
    url = canvas.evaluate("c => c.toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))[..., 3]


# --- 4. Distributions: the query drawn on Search, box plot and group table (face / not face) ------------------
def test_distributions_box_plot_and_table(page, server, demo_cache):
    search_demo_face(page, server)
    # moving to another page keeps the user's query and region
    reset_runs(page)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Distributions").click()
    expect(page.get_by_role("heading", name="Score distributions")).to_be_visible()
    wait_idle(page)
    expect(page.get_by_text("Draw on the query image to search")).to_have_count(0)
    plot = page.locator(".js-plotly-plot")
    expect(plot.first).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    traces = plot.first.evaluate("e => (e.data || []).map(t => [t.type, t.name])")
    assert ["box", "face"] in traces and ["box", "not face"] in traces, traces
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Scores of \d+ images by label: \d+ groups"))
    expect(plot.first.locator("g.trace.boxes").first).to_be_attached()

    expect(page.get_by_role("heading", name="Groups by label")).to_be_visible()
    rows = grid_rows(page.get_by_test_id("stDataFrame"))
    header, body = rows[0], rows[1:]
    assert header[:10] == list(GROUP_TABLE_COLUMNS), header
    groups = {r[0]: dict(zip(header, r)) for r in body}
    assert {"face", "not face"} <= set(groups), groups
    assert int(groups["face"]["n"]) == 99 and int(groups["not face"]["n"]) == 100, (
        groups
    )  # the query is left out
    assert body[0][0] == "face" and float(groups["face"]["auroc"]) > 0.8, (
        "a face region should detect faces best"
    )

    with page.expect_download() as info:
        page.get_by_role("button", name="Download per-image scores (CSV)").click()
    scores = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    assert len(scores) == DEMO_N - 1 and "score" in scores[0]  # the table's images: the query left out

    reset_runs(page)
    page.get_by_test_id("stRadio").filter(has_text="Plot").get_by_text("violin", exact=True).click()
    wait_idle(page)
    kinds: set[str] = set()
    deadline = time.monotonic() + 15
    while kinds != {"violin"} and time.monotonic() < deadline:  # the sync API has no expect.poll
        kinds = set(page.locator(".js-plotly-plot").first.evaluate("e => (e.data || []).map(t => t.type)"))
        time.sleep(0.1)
    assert kinds == {"violin"}, kinds
    no_exception(page)


# --- 5. Compare: Lite0 against Lite1 on one page, one stroke -------------------------------------------------
def test_compare_lite0_with_lite1(page, server, demo_cache, lite1_cache, capsys):
    open_page(page, server, "compare")
    choose(page, "Left cache", f"{DEMO} — ")
    choose(page, "Right cache", f"{LITE1} — ")
    expect(page.get_by_text("cannot be compared")).to_have_count(0)
    set_query_index(page, DEMO_N, FACE)
    k = k_value(page, "Results per side (k)")
    latency = draw_and_time(page, 2 * k)
    record_latency("compare_demo_vs_lite1_s", round(latency, 3))
    for name, model in ((DEMO, "efficientnet_lite0"), (LITE1, "efficientnet_lite1")):
        heading = page.get_by_role("heading", name=name, exact=True)
        expect(heading).to_be_visible()
        column = page.get_by_test_id("stColumn").filter(has=heading)
        expect(column).to_have_count(1)
        expect(
            column.get_by_text(
                re.compile(
                    rf"{model} \(weights [0-9a-f]{{8}}\) · blocks\.5 · grid \d+×\d+ — {k} results from {DEMO_N} images"
                )
            )
        ).to_be_visible()
        captions = [
            SCORE_CAPTION.match(t.strip()) for t in column.get_by_test_id("stImageCaption").all_inner_texts()
        ]
        ranks = [int(m.group(1)) for m in captions if m]
        assert ranks == list(range(1, k + 1)), f"{name}: {ranks}"
    expect(page.get_by_role("heading", name="Agreement")).to_be_visible()
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Compared: top-\d+ overlap \d+%, Spearman"))
    expect(page.get_by_text(f"Top-{k} overlap", exact=True)).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    # the region file: the CLI's --mask gives each side's search as the JSON has it (one file painted
    # on the image, at the image's size, moved the edge weights and swapped ranks: review). Lite0
    # (224 of 256) and Lite1 (240 of 274) show the same part of the image: one file serves both
    with page.expect_download() as info:
        page.get_by_role("button", name="Download the comparison (JSON)").click()
    saved = json.loads(Path(info.value.path()).read_text())
    expect(page.get_by_role("button", name=re.compile("side's region"))).to_have_count(0)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download region (PNG mask)").click()
    for side, cache in (("left", demo_cache), ("right", lite1_cache)):
        capsys.readouterr()
        argv = ["search", str(cache), "--query-index", str(FACE), "--mask", str(info.value.path())]
        assert cli_main([*argv, "--k", str(k), "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["mask"]["weights"] == saved[side]["mask"]["weights"], side
        assert [(r["index"], r["score"]) for r in again["results"]] == [
            (r["index"], r["score"]) for r in saved[side]["results"]
        ], side
    no_exception(page)


# --- 6. The canvas: whole on a wide and a narrow screen, its buttons work, its drawing follows the query ---
WIDTHS = (1400, 1024)  # a laptop and a tablet beside the sidebar (a phone's, 320 px, folds it: below)
CANVAS_PX = 320

# How far the page's main area can scroll sideways (a narrow window: nothing may stick out).
SIDEWAYS = """() => { const m = document.querySelector('[data-testid="stMain"]'); return m.scrollWidth - m.clientWidth; }"""

# Every Streamlit element on the page (leaf element containers) with its box and first line of text.
ELEMENT_BOXES = """() => [...document.querySelectorAll('[data-testid="stElementContainer"]')].map(e => {
  const r = e.getBoundingClientRect();
  return {x: r.x, y: r.y, width: r.width, height: r.height,
          what: (e.firstElementChild?.dataset.testid || '?') + ': '
                + (e.innerText || '').trim().split('\\n')[0]};
}).filter(b => b.width > 0 && b.height > 0)"""

# How many of the canvas's pixels hold paint (its alpha), read in the page.
PAINTED = """c => {
  const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < a.length; i += 4) n += a[i] > 0;
  return n;
}"""


def overlap(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def inside(inner: dict, outer: dict) -> bool:
    return (
        outer["x"] <= inner["x"]
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"]
        and outer["y"] <= inner["y"]
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"]
    )


def canvas_whole(page, where: str) -> None:
    """The canvas shows whole, on screen, and neither it nor its buttons (undo, redo, clear) overlap an
    element of the page but the canvas's own (screenshots: test-artifacts/)."""
    canvas = page.locator("canvas.vfs-paint")
    expect(canvas).to_be_visible()
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    bar = page.locator(".vfs-canvas-bar").bounding_box()
    page.screenshot(
        path=str(artifact(f"canvas-{where}.png")),
        clip={"x": 0, "y": max(0, bar["y"] - 200), "width": page.viewport_size["width"], "height": 760},
    )
    width = page.viewport_size["width"]
    assert box["width"] == box["height"], f"{where}: the canvas shows as {box}"
    assert box["width"] == CANVAS_PX or width < 2 * CANVAS_PX, f"{where}: the canvas shows as {box}"
    assert 0 <= box["x"] and box["x"] + box["width"] <= width and page.evaluate(SIDEWAYS) == 0, (
        f"{where}: {box}"
    )
    own = [e for e in page.evaluate(ELEMENT_BOXES) if inside(box, e) and inside(bar, e)]
    assert own, f"{where}: the canvas and its buttons are not in one element"
    for name, part in (("buttons", bar), ("canvas", box)):
        covered = [e["what"] for e in page.evaluate(ELEMENT_BOXES) if overlap(part, e) and not inside(box, e)]
        assert not covered, f"{where}: the canvas's {name} {part} overlap {covered}"


def test_the_canvas_shows_whole_and_its_buttons_cover_no_control(page, server, demo_cache, lite1_cache):
    open_page(page, server, "search")
    choose(page, "Cache", f"{DEMO} — ")
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
        for name, title in (
            ("search", "Search"),
            ("distributions", "Score distributions"),
            ("compare", "Compare two caches"),
        ):
            reset_runs(page)
            page.get_by_test_id("stSidebarNav").get_by_role("link", name=name.capitalize()).click()
            expect(page.get_by_role("heading", name=title)).to_be_visible()
            wait_idle(page)
            if name == "compare":
                choose(page, "Left cache", f"{DEMO} — ")
                choose(page, "Right cache", f"{LITE1} — ")
            canvas_whole(page, f"{name}-{width}")
    page.set_viewport_size({"width": 320, "height": VIEWPORT["height"]})  # a phone: the canvas shrinks to fit
    page.wait_for_timeout(500)
    canvas_whole(page, "compare-320")
    # … and a stroke on it paints where it is drawn, in canvas pixels
    stroke(page, y=0.45, x0=0.3, x1=0.7)
    painted = np.argwhere(canvas_alpha(page.locator("canvas.vfs-paint")) > 0)
    (y0, x0), (y1, x1) = painted.min(0), painted.max(0)
    brush = 32
    assert abs(x0 - (0.3 * CANVAS_PX - brush / 2)) <= 2 and abs(x1 - (0.7 * CANVAS_PX + brush / 2)) <= 2, (
        x0,
        x1,
    )
    assert abs(y0 - (0.45 * CANVAS_PX - brush / 2)) <= 2 and abs(y1 - (0.49 * CANVAS_PX + brush / 2)) <= 2, (
        y0,
        y1,
    )
    no_exception(page)


def click_and_wait(page, button: str, k: int, before: str) -> str:
    """Click one of the canvas's buttons; the results on screen once they differ from `before`."""
    page.locator(".vfs-canvas-bar").get_by_role("button", name=button, exact=True).click()
    return page.wait_for_function(RESULTS_CHANGED, arg=[k, before], timeout=RESULT_TIMEOUT_MS).json_value()[1]


def press_and_wait(page, keys: str, k: int, before: str) -> str:
    """Press keys (on the focused element); the results on screen once they differ from `before`."""
    page.keyboard.press(keys)
    return page.wait_for_function(RESULTS_CHANGED, arg=[k, before], timeout=RESULT_TIMEOUT_MS).json_value()[1]


HISTORY = ("Undo", "Redo", "Clear")  # the canvas's buttons
NO_REGION = "Draw on the query image to search"


def button_states(page) -> dict[str, bool]:
    """Which of the canvas's buttons are enabled."""
    bar = page.locator(".vfs-canvas-bar")
    return {name: bar.get_by_role("button", name=name, exact=True).is_enabled() for name in HISTORY}


def test_undo_redo_clear_rectangle_and_the_drawing_follows_the_query(page, server, demo_cache):
    """Real strokes, clicks and keys on the canvas: undo (its button or Ctrl+Z) goes back one change, redo
    (its button, Ctrl+Shift+Z) forward, each with that drawing's results; clear empties the canvas and the
    results and is undone like a stroke; the pointer is a ring of the brush's size, a crosshair for the
    rectangle, whose drag searches; the Distributions page's canvas opens with the same paint."""
    open_page(page, server, "search")
    choose(page, "Cache", f"{DEMO} — ")
    set_query_index(page, DEMO_N, FACE)
    k = k_value(page)
    canvas = page.locator("canvas.vfs-paint")
    assert button_states(page) == dict.fromkeys(HISTORY, False)
    first = timed_stroke(page, k, "", y=0.3, timeout_ms=RESULT_TIMEOUT_MS).signature
    wait_idle(page)
    one = canvas.evaluate(PAINTED)
    second = timed_stroke(page, k, first, y=0.7, timeout_ms=RESULT_TIMEOUT_MS).signature
    wait_idle(page)
    both = canvas.evaluate(PAINTED)
    assert 0 < one < both and button_states(page) == {"Undo": True, "Redo": False, "Clear": True}

    assert press_and_wait(page, "Control+z", k, second) == first  # the stroke focused the canvas
    assert canvas.evaluate(PAINTED) == one
    wait_idle(page)
    assert click_and_wait(page, "Redo", k, first) == second
    assert canvas.evaluate(PAINTED) == both and not button_states(page)["Redo"]
    wait_idle(page)
    assert click_and_wait(page, "Undo", k, second) == first
    wait_idle(page)
    page.locator(".vfs-canvas-bar").get_by_role("button", name="Undo", exact=True).click()
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    assert canvas.evaluate(PAINTED) == 0 and button_states(page) == {
        "Undo": False,
        "Redo": True,
        "Clear": False,
    }
    wait_idle(page)
    # the Undo button disabled itself; the keys still reach the canvas
    assert press_and_wait(page, "Control+Shift+z", k, "") == first
    wait_idle(page)

    page.locator(".vfs-canvas-bar").get_by_role("button", name="Clear", exact=True).click()
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    assert score_captions(page) == [] and canvas.evaluate(PAINTED) == 0
    wait_idle(page)
    assert press_and_wait(page, "Control+z", k, "") == first  # a clear is undone like a stroke
    assert canvas.evaluate(PAINTED) == one
    wait_idle(page)
    page.locator(".vfs-canvas-bar").get_by_role("button", name="Clear", exact=True).click()
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    wait_idle(page)

    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.9 * box["height"])
    ring = canvas.evaluate("c => getComputedStyle(c).cursor")
    assert "svg" in ring and "width%3D%2234%22" in ring, ring  # the brush's 32 px, and the ring's line
    reset_runs(page)
    page.get_by_text("Rectangle", exact=True).click()
    wait_idle(page)
    page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.8 * box["height"])
    assert canvas.evaluate("c => getComputedStyle(c).cursor") == "crosshair"
    page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.3 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.55 * box["height"], steps=10)
    page.mouse.up()
    page.wait_for_function(RESULTS_CHANGED, arg=[k, ""], timeout=RESULT_TIMEOUT_MS)
    rectangle = canvas.evaluate(PAINTED)
    assert abs(rectangle - (0.3 * CANVAS_PX) * (0.25 * CANVAS_PX)) < 0.05 * rectangle, rectangle
    assert_ranked(score_captions(page), k)
    wait_idle(page)

    reset_runs(page)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Distributions").click()
    expect(page.get_by_role("heading", name="Score distributions")).to_be_visible()
    wait_idle(page)
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(canvas).to_be_visible()
    page.wait_for_function(f"c => ({PAINTED})(c) === {rectangle}", arg=canvas.element_handle())
    no_exception(page)


def test_a_region_is_painted_with_the_keys_alone(page, server, demo_cache):
    """No pointer (an accessibility trial: the canvas was out of the tab order, with no name): Tab
    reaches the canvas, which shows a cell cursor and says where it is; the arrows move it, Shift
    stretches it, Space paints it — the searched mask holds exactly the covered cells, at ≈ 1."""
    open_page(page, server, "search")
    choose(page, "Cache", f"{DEMO} — ")
    set_query_index(page, DEMO_N, FACE)
    k = k_value(page)
    canvas = page.locator("canvas.vfs-paint")
    assert canvas.get_attribute("role") == "application"
    assert "arrows move a one-cell cursor" in canvas.get_attribute("aria-label")
    page.get_by_text("Drawing tool", exact=True).click()  # a start above the canvas, then the keys
    for _ in range(40):
        page.keyboard.press("Tab")
        if canvas.evaluate("c => c.matches(':focus-visible')"):
            break
    else:
        raise AssertionError("Tab never reached the canvas")
    said = page.locator(
        ".vfs-stage .vfs-said"
    )  # the canvas's own line (the page says its results in another)
    expect(page.locator(".vfs-cell-cursor")).to_be_visible()
    expect(said).to_have_text("row 4 of 7, column 4 of 7")  # the middle cell of the 7×7 grid
    for key in ("ArrowUp", "ArrowLeft", "Shift+ArrowRight", "Shift+ArrowRight", "Shift+ArrowDown"):
        page.keyboard.press(key)
    expect(said).to_have_text("row 3 to 4 of 7, column 3 to 5 of 7")
    page.keyboard.press("Space")
    page.wait_for_function(RESULTS_CHANGED, arg=[k, ""], timeout=RESULT_TIMEOUT_MS)
    expect(said).to_have_text("painted row 3 to 4 of 7, column 3 to 5 of 7")
    status = page.get_by_role("status").filter(has_text="Search done: 10 results from 213 images")
    expect(status).to_have_count(1)  # said once, by one element kept from rerun to rerun
    status.evaluate("e => { e.dataset.mark = 'kept'; }")
    tile = page.get_by_role("img", name=re.compile(r"^Match 1: .*, score \d\.\d\d, best window row"))
    expect(tile).to_have_count(1)
    expect(
        page.get_by_text(
            re.compile(r"^6 of 49 feature cells selected \(7×7\), (each weighed alike|weights 0\.9\d to 1)")
        )
    ).to_be_visible()
    cells = [round(i * CANVAS_PX / 7, 6) for i in range(8)]
    width = math.floor(cells[5]) - math.ceil(cells[2])
    height = math.floor(cells[4]) - math.ceil(cells[2])
    assert canvas.evaluate(PAINTED) == width * height  # inset to whole pixels: no neighbour touched
    assert_ranked(score_captions(page), k)
    wait_idle(page)
    page.keyboard.press("Space")  # the same cells again: no second change
    page.wait_for_timeout(500)
    assert canvas.evaluate(PAINTED) == width * height and button_states(page)["Undo"]
    page.keyboard.press("Control+z")  # the keys' paint is undone as a stroke is
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    assert canvas.evaluate(PAINTED) == 0
    wait_idle(page)

    # A stroke keeps the focus for Ctrl+Z, not for the keys: Space and the arrows paint nothing then.
    before = timed_stroke(page, k, "", y=0.7, timeout_ms=RESULT_TIMEOUT_MS).signature
    wait_idle(page)
    stroked = canvas.evaluate(PAINTED)
    for key in ("Space", "ArrowDown", "Space", "Enter"):
        page.keyboard.press(key)
    page.wait_for_timeout(500)
    assert canvas.evaluate(PAINTED) == stroked and page.locator(".vfs-cell-cursor").is_hidden()
    assert before and button_states(page)["Undo"]
    assert (
        page.get_by_role("status").filter(has_text="Search done:").evaluate("e => e.dataset.mark") == "kept"
    )
    page.keyboard.press("Control+z")  # the focus the stroke left still undoes
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    no_exception(page)


def test_a_new_query_opens_a_blank_canvas_and_the_drawn_one_comes_back(page, server, demo_cache):
    open_page(page, server, "search")
    choose(page, "Cache", f"{DEMO} — ")
    set_query_index(page, DEMO_N, FACE)
    k = k_value(page)
    drawn = timed_stroke(page, k, "", timeout_ms=RESULT_TIMEOUT_MS).signature
    wait_idle(page)
    canvas = page.locator("canvas.vfs-paint")
    painted = canvas.evaluate(PAINTED)
    set_query_index(page, DEMO_N, FACE + 1)
    expect(page.get_by_text(NO_REGION)).to_be_visible()
    assert canvas.evaluate(PAINTED) == 0 and button_states(page) == dict.fromkeys(HISTORY, False)
    set_query_index(page, DEMO_N, FACE)
    page.wait_for_function(RESULTS_CHANGED, arg=[k, ""], timeout=RESULT_TIMEOUT_MS)
    assert canvas.evaluate(PAINTED) == painted
    assert page.evaluate(RESULTS_CHANGED, [k, ""])[1] == drawn
    no_exception(page)


# --- 7. Strokes on 10,000 images: each one updates the results --------------------------------------------
LARGE_STROKES = (0.15, 0.35, 0.55, 0.75, 0.9)  # each lower than the last: the region grows by new cells
GROSS_LATENCY_S = 3.0
CELLS = re.compile(r"^(\d+) of (\d+) feature cells selected")


def test_each_stroke_updates_the_results_on_10000_images(page, server, large_cache):
    """Five strokes, one after another, on one query of a 10,000-image cache (7×7×192, the embedded
    model's default layer): after each mouse-up the page shows k new ranked matches (other captions or
    images than the stroke before), the summary counts 10,000 images, and the selected cells grow.

    The page's speed is measured by bench/app_latency.py (issue 11: median ≤ 0.5 s, p95 ≤ 1.0 s on the
    same cache); this test records the times (test-artifacts/latency.json) and fails only on a gross
    regression: a median over 3 s.
    """
    open_page(page, server, "search")
    choose(page, "Cache", f"{LARGE} — ")
    set_query_index(page, LARGE_N, 7)
    k = k_value(page)
    expect(page.get_by_text("Draw on the query image to search")).to_be_visible()
    page.wait_for_timeout(1000)  # a user looks before drawing (the page loads the cache's features meanwhile)
    before, latencies, cells = "", [], []
    for y in LARGE_STROKES:
        shown = timed_stroke(page, k, before, y=y, timeout_ms=RESULT_TIMEOUT_MS)
        assert shown.signature != before
        assert re.match(rf"^{k} results from {LARGE_N} images in \d+ ms", shown.summary), shown.summary
        assert_ranked(score_captions(page), k)
        caption = next(c for c in page.get_by_test_id("stImageCaption").all_inner_texts() if CELLS.match(c))
        cells.append(int(CELLS.match(caption).group(1)))
        latencies.append(shown.latency_s)
        print(
            f"  stroke at {y:.2f}: mouse-up → {k} new results {shown.latency_s:.3f} s "
            f"(search {shown.search_ms} ms, {cells[-1]} cells)"
        )
        before = shown.signature
        wait_idle(page)
        page.wait_for_timeout(500)
    no_exception(page)
    assert cells == sorted(set(cells)), f"each stroke should add cells to the region: {cells}"
    median = statistics.median(latencies)
    record_latency(f"synthetic_{LARGE_N}_images_strokes_s", [round(x, 3) for x in latencies])
    record_latency(f"synthetic_{LARGE_N}_images_strokes_median_s", round(median, 3))
    assert median <= GROSS_LATENCY_S, f"mouse-up → results on {LARGE_N} images: median {median:.2f} s"


# --- 8. A cache rebuilt at its place while a tab searches it ----------------------------------------------
def test_a_stroke_after_a_rebuild_searches_the_new_cache(page, server, browser, tmp_path):
    """A cache is searched in a tab, then rebuilt at its place from its manifest's rows in another
    order (the same spec: the same manifest path, model and layer; image 0 is another picture). A
    new stroke in that tab reruns only the search fragment, which held the cache of the page's last
    full run: it searched the deleted cache's rows (soak review). Its results must be those a fresh
    tab shows for the same query and the same two strokes."""
    dataset = write_findings(tmp_path / "data", copies=2)  # 12 random 48 px pictures
    out = server.cache("rebuilt")
    n = len(pd.read_csv(dataset))

    def build(rows: slice) -> None:
        pd.read_csv(dataset.with_name("all.csv")).iloc[rows].to_csv(dataset, index=False)
        shutil.rmtree(out, ignore_errors=True)
        build_cache(BuildJob(layer="blocks.5", data=str(dataset), out=str(out), domain_col="view"))

    shutil.copy(dataset, dataset.with_name("all.csv"))
    build(slice(None))

    def search(tab, strokes: tuple[float, ...]) -> tuple[int, str]:
        open_page(tab, server, "search")
        choose(tab, "Cache", "rebuilt — ")
        set_query_index(tab, n, 0)
        k, shown = k_value(tab), ""
        for y in strokes:
            shown = timed_stroke(tab, k, shown, y=y, timeout_ms=RESULT_TIMEOUT_MS).signature
            wait_idle(tab)
        return k, shown

    k, before = search(page, (0.3,))
    build(slice(None, None, -1))  # the same files in reverse order, at the same place
    timed_stroke(page, k, before, y=0.6, timeout_ms=RESULT_TIMEOUT_MS)  # a stroke: the fragment's rerun
    wait_idle(page)
    after = page.evaluate(RESULTS_CHANGED, [k, ""])
    assert after, "no settled results after the stroke"
    no_exception(page)

    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    try:
        _, fresh = search(context.new_page(), (0.3, 0.6))
    finally:
        context.close()
    assert re.match(rf"^{k} results from {n} images in \d+ ms", after[2]), after[2]
    assert after[1] == fresh, "a stroke after the rebuild did not show what a fresh tab shows:\n" + "\n".join(
        (after[1].split("#")[0], fresh.split("#")[0])
    )
