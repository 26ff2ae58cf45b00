"""Pieces several pages show: search results, exports, the cache list and the background builds."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from vfs.background import BackgroundBuild
from vfs.cache import BuildLock, CacheError, FeatureCache, cache_name
from vfs.export import ranked_rows, search_json, spreadsheet_csv
from vfs.jobs import BuildJob, duration
from vfs.render import (
    colour_bar,
    grid_box_to_pixels,
    heatmap_overlay,
    jpeg_data_url,
    match_caption,
    match_tags,
    outline,
    placement_heat_range,
    png_bytes,
    region_mask_png,
    window_text,
)
from vfs.search import SearchResult

from .base import as_written
from .core import build_registry, get_cache, outlined_tiles, thumbs
from .query import Query, query_tag

START_ERROR = "vfs.builds.error"
DONE_SHOWN_S = 600  # a finished build's message stays this long


# --- results ------------------------------------------------------------------------------------------
def match_alt(row: dict, grid: tuple[int, int]) -> str:
    """A result tile's text alternative: what it is, its score and where its window lies."""
    what = " · ".join([str(row.get("path") or f"image {row['index']}"), *match_tags(row)])
    window = window_text(row["grid_box"], grid)
    return f"Match {row['rank']}: {what}, score {row['score']:.2f}, best window {window}"


TILE_PX = 176  # five tiles a row beside the sidebar on a 1400-px screen; fewer on a narrower one
TILES_CSS = (  # the space between tiles (one image element of several images has none)
    "<style>[class*='st-key-vfs-tiles'] [data-testid='stImage'] {gap: 0.75rem}</style>"
)


def result_tiles(
    cache: FeatureCache, result: SearchResult, width: int = TILE_PX, heat: bool = False, key: str = "tiles"
) -> None:
    """The top-k tiles: each match as the model saw it, its best window outlined, optionally over its heat
    map, in rows as wide as their column (`key` names them, unique on the page).

    One element for all of them (a list of images with their captions), each tile a data URL inside
    the page's message: a stroke's rerun makes the browser lay out one element, not a grid of columns,
    and fetch no file. Without heat maps the tiles are encoded once per server (`ui.core.outlined_tiles`).
    """
    rows = result.top.to_dict("records")
    if not rows:
        st.warning("No image passes the filters: loosen the label filter or the per-domain limit.")
        return
    captions = [
        match_caption(row["rank"], row["score"], [as_written(t) for t in match_tags(row)]) for row in rows
    ]
    alts = [match_alt(row, result.grid) for row in rows]
    if heat:
        images = []
        for i, (row, thumb) in enumerate(zip(rows, thumbs(cache, [r["index"] for r in rows]))):
            scores = result.placement_scores(row["index"])
            heated = np.asarray(heatmap_overlay(thumb, scores, result.query.mask.shape, result.grid))
            window = grid_box_to_pixels(row["grid_box"], result.grid, heated.shape[:2])
            images.append(jpeg_data_url(outline(heated, window)))
            low, high = placement_heat_range(scores, result.query.mask.shape)
            if low == high:  # one placement (a region as large as the grid), or all alike: one colour
                captions[i] += f" · heat {high:.2f} throughout"
                alts[i] += f"; its heat map is one colour: every cell's best placement scores {high:.2f}"
            else:
                captions[i] += f" · heat {low:.2f} to {high:.2f}"
                alts[i] += f"; its heat map runs from {low:.2f} (dark purple) to {high:.2f} (yellow)"
        heat_legend()
    else:
        images = outlined_tiles(cache, [(int(r["index"]), tuple(r["grid_box"])) for r in rows])
    st.html(TILES_CSS)
    with st.container(key=f"vfs-{key}"):
        st.image(images, caption=captions, width=width, alt=alts)


def heat_legend() -> None:
    """The heat maps' colour bar: each tile is scaled on its own, so the scale's ends are words, and
    each caption gives its tile's range ("heat 0.41 to 0.87")."""
    st.image(
        jpeg_data_url(colour_bar(TILE_PX * 2, 12)),
        caption="Heat: dark purple the tile's lowest cell → yellow its best (each tile its own range)",
        width=TILE_PX * 2,
        alt="Colour bar of the heat maps, from dark purple (a tile's lowest score) through green to "
        "yellow (its best): each tile's caption gives its range",
    )


def result_columns(cache: FeatureCache, result: SearchResult) -> list[str]:
    """The ranked table's columns, less a label or domain column the cache has none of (always
    empty)."""
    absent = {c for c, column in (("label", cache.label_col), ("domain", cache.domain_col)) if column is None}
    return [c for c in result.top.columns if c not in absent]


def result_table(cache: FeatureCache, result: SearchResult, key: str) -> None:
    """The ranked matches as text: with where each best window lies (the tiles show it as an outline),
    before the path, the longest column, which a half-width table (Compare's) cuts."""
    shown = result_columns(cache, result)
    columns = [c for c in ("rank", "index", "score", "label", "domain") if c in shown]
    windows = [window_text(box, result.grid) for box in result.top["grid_box"]]
    table = result.top[columns].assign(window=windows)
    if "path" in shown:
        table = table.assign(path=result.top["path"])
    st.dataframe(
        table,
        hide_index=True,
        key=key,
        column_config={"score": st.column_config.NumberColumn("score", format="%.2f")},
    )


def downloads(
    cache: FeatureCache,
    result: SearchResult,
    query: Query,
    view: np.ndarray,
    paint: np.ndarray,
    key: str,
    labels: Sequence[str] = (),
    exclude_same: str | None = None,
) -> None:
    """Export the ranked results (CSV, JSON as the CLI writes it, with the options that chose them:
    `labels`, the label filter, and `exclude_same`, the column whose shared value left images out),
    a paper-style figure (PNG, made on click) and the painted region (a PNG mask the CLI's --mask
    reads: the search again, elsewhere)."""
    # one search's files share a name; another region or option of the same query gets another
    mask, excluded = result.grid_mask().tobytes(), result.excluded.tobytes()
    chose = (mask, excluded, result.asked, result.per_domain, tuple(labels))
    digest = hashlib.sha1(repr(chose).encode()).hexdigest()[:6]
    stem = f"vfs-{cache_name(cache.location)}-{query.key}-{digest}"

    def figure() -> bytes:
        title = f"{cache_name(cache.location)}: {cache.spec.model} {cache.spec.layer}"
        named = query_tag(cache, query.index) if query.index is not None else query.name
        return png_bytes(result.figure(view, title=title, query_caption=f"query {named}"))

    row = st.container(horizontal=True)  # labels whole, wrapping on a narrow window (columns cut them)
    row.download_button(
        "Download results (CSV)",
        # made on click
        lambda: spreadsheet_csv(ranked_rows(cache, result, result_columns(cache, result)), index=False),
        f"{stem}.csv",
        "text/csv",
        key=f"{key}.csv",
        on_click="ignore",
    )
    row.download_button(
        "Download results (JSON)",
        json.dumps(search_json(cache, result, query.describe(), labels, exclude_same), indent=1, default=str),
        f"{stem}.json",
        "application/json",
        key=f"{key}.json",
        on_click="ignore",
    )
    row.download_button(
        "Download figure (PNG)",
        figure,
        f"{stem}.png",
        "image/png",
        key=f"{key}.png",
        on_click="ignore",
    )
    row.download_button(
        "Download region (PNG mask)",
        lambda: region_mask_png(paint),
        f"{stem}-region.png",
        "image/png",
        key=f"{key}.region",
        on_click="ignore",
        help="The painted region on the model's view: `python -m vfs search CACHE --mask` reads it.",
    )


# --- caches -------------------------------------------------------------------------------------------
def megabytes(n: int | None) -> str | None:
    return None if n is None else f"{n / 1e6:.1f} MB"


def cache_table(rows: list[dict]) -> None:
    """The cache list: what each cache is of, how big, and whether its build finished."""
    builds = {b.job.out for b in build_registry().builds() if b.status().running}
    table = pd.DataFrame(
        [
            {
                "cache": r["name"],
                "model": r.get("model"),
                "layer": r.get("layer"),
                "grid": f"{r['grid']}×{r['channels']}" if r.get("grid") else None,
                "images": r.get("n"),
                "labels": r.get("labels"),
                "domains": r.get("domains"),
                "size": megabytes(r.get("size_bytes")),
                "status": r["error"]
                or (
                    "complete"
                    if r["complete"]
                    else f"{'building' if r['path'] in builds else 'partial'}: {r.get('stored', 0)} stored"
                ),
                "location": r["path"],
            }
            for r in rows
        ]
    )
    st.dataframe(table, hide_index=True, key="caches.table")


def skipped_images(cache: FeatureCache, key: str) -> None:
    """Which images a build could not read, and why, folded (the CLI prints them after a build)."""
    skipped = cache.report.get("skipped", [])
    if skipped:
        with st.expander(f"The {len(skipped)} skipped {'image' if len(skipped) == 1 else 'images'} and why"):
            st.dataframe(pd.DataFrame(skipped, columns=["path", "reason"]), hide_index=True, key=key)


def _code(text: str) -> str:
    """`text` as a markdown code span it cannot end (a cache's recorded names are anyone's text: a
    backtick in one ended the span and rendered the rest, links and remote images, on a hosted Home
    page)."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def cache_provenance(cache: FeatureCache) -> str:
    """How a cache was built, from what its build recorded in it: a server's visitors did not build it."""
    s, skipped = cache.spec, len(cache.report.get("skipped", []))
    parts = [
        f"**{as_written(cache_name(cache.location))}**: {_code(s.model)} at layer {_code(s.layer)} "
        f"({s.grid[0]}×{s.grid[1]} cells × {s.channels} channels) over {_code(s.data.source)}, "
        f"each image's {s.preprocess.describe()}",
        f"{cache.n} images"
        + (f" ({skipped} unreadable ones skipped)" if skipped else "")
        + (
            f" ({repeated} rows repeating a path)" if (repeated := cache.report.get("repeated_paths")) else ""
        ),
    ]
    parts += [
        f"{what} from column {_code(column)}"
        for what, column in (("labels", cache.label_col), ("domains", cache.domain_col))
        if column
    ]
    versions = cache.attrs.get("versions", {})
    recorded = [name for name in ("vfs", "torch", "timm") if name in versions]
    tools = ", ".join(f"{name} {_code(versions[name])}" for name in recorded)
    built = " ".join(
        ([f"on {as_written(cache.attrs['created'][:10])}"] if cache.attrs.get("created") else [])
        + ([f"with {tools}"] if tools else [])
    )
    return "; ".join(parts + ([f"built {built}"] if built else [])) + "."


# --- background builds ----------------------------------------------------------------------------------
def start_build(job: BuildJob) -> None:
    """Button callback: start (or resume) a build; a refusal (another's build of that output runs)
    is shown by the build panel while that build runs, above its progress, which is not this one's."""
    st.session_state.pop(START_ERROR, None)
    try:
        build_registry().start(job)
    except ValueError as e:
        st.session_state[START_ERROR] = (job.out, str(e))


def _show_build(build: BackgroundBuild, now: float) -> None:
    status = build.status()
    name, p = Path(status.job.out).stem, status.progress
    if status.running:
        text = f"{name}: {p.summary()}" if p else f"{name}: starting (loading the model and the dataset)…"
        if build.cancelling:  # said at once: the stop comes after the batch in flight, or the model's load
            text = f"{name}: cancelling — it stops after the batch in flight; what is stored stays"
        bar, cancel = st.columns([5, 1], vertical_alignment="bottom")
        bar.progress(status.fraction, text=text)
        cancel.button(
            "Cancel",
            key=f"build.cancel.{status.job.out}",
            on_click=build.cancel,
            width="stretch",
            disabled=build.cancelling,
        )
    elif status.state == "done" and status.finished is not None and now - status.finished < DONE_SHOWN_S:
        skipped = f", {p.skipped} unreadable images skipped" if p and p.skipped else ""
        st.success(
            f"{name}: complete with {status.stored} images{skipped} "
            f"(this run took {duration(status.finished - status.started)})."
        )
        if skipped:
            try:
                skipped_images(get_cache(status.job.out), f"build.skipped.{status.job.out}")
            except CacheError:  # deleted since: the list below says so
                pass
    elif status.state in ("cancelled", "failed"):
        if (since := _finished_or_held(status.job.out)) is not None:  # by another process since
            st.info(f"{name}: this server's build {status.state}; {since}")
            return
        where = f" at {p.done} / {p.total} images" if p else ""
        chunks = " (a failed build keeps whole chunks only)" if status.state == "failed" else ""
        kept = (
            ""
            if status.stored is None
            else f" {status.stored} images are stored{chunks}; a resume goes on from there."
        )
        message = (
            f"{name}: cancelled{where}.{kept}"
            if status.state == "cancelled"
            else f"{name}: the build failed{where}: {(status.error or '').rstrip('.')}.{kept}"
        )
        (st.warning if status.state == "cancelled" else st.error)(message)
        st.button(
            "Resume build", key=f"build.resume.{status.job.out}", on_click=start_build, args=(status.job,)
        )


def held_elsewhere(out: str | Path) -> str | None:
    """Why another process's build (the CLI's, another server's) is writing `out` now, or None: its
    cache is then no partial one to resume here (review)."""
    try:
        BuildLock(out).refuse_if_held()
    except CacheError as e:
        return str(e)
    return None


def _finished_or_held(out: str) -> str | None:
    """What became of a stopped build's cache since, where another process took it over: complete
    now, or being written; None where it waits for a resume."""
    if (held := held_elsewhere(out)) is not None:
        return f"{held}."
    try:
        cache = get_cache(out)
    except CacheError:
        return None
    return f"the cache is complete now, with {cache.n} images." if cache.complete else None


def build_panel() -> None:
    """Every build of this server, live: progress, images/s, ETA, cancel, resume. Polls once a second
    while one runs, and reruns the whole page when that changes, so the cache lists show the result."""
    registry = build_registry()
    polling = registry.running()

    @st.fragment(run_every=1.0 if polling else None)
    def panel() -> None:
        if refused := st.session_state.get(START_ERROR):
            out, error = refused
            build = registry.get(out)
            if build is not None and build.status().running:
                st.error(as_written(error))
            else:
                del st.session_state[START_ERROR]
        now = time.time()
        builds = registry.builds()
        if not builds:
            st.caption("No build since the server started.")
        for build in builds:
            _show_build(build, now)
        if registry.running() != polling:
            st.rerun()

    panel()
