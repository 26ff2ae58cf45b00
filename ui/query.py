"""The query every page shares: which cache, which image, which region, and the search it gives.

The current cache, query image and drawn region live in session state, so the Search,
Distributions and Compare pages show the same query and the user's drawing follows them.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image
from streamlit.delta_generator import DeltaGenerator

from vfs.cache import CacheError, FeatureCache, cache_name
from vfs.compare import comparison_refusal
from vfs.images import IMAGE_EXTENSIONS, load_image, upright_size
from vfs.jobs import view_thumbnail
from vfs.masks import grid_mask, mask_image_coverage
from vfs.render import jpeg_data_url
from vfs.search import SearchResult, image_searched, search_regions
from vfs.settings import is_url
from vfs.stats import in_any_group

from .announce import announce
from .base import as_written
from .canvas import Drawing, DrawingError, mask_shape, paint_canvas
from .core import (
    CACHE,
    bind,
    cache_rows,
    extractor_for,
    get_cache,
    groups,
    kept_key,
    memo,
    settings,
    sharded_search,
    sharing_columns,
    thumbs,
    user_errors,
)

CANVAS_PX = 320  # the drawing canvas; its background is shrunk to this (sent inline on every rerun)
DATASET, UPLOAD = "Dataset image", "Upload"
FROM, INDEX, UPLOADED, REGION = "vfs.query.from", "vfs.query.index", "vfs.upload", "vfs.region"
DRAWN = "vfs.regions"  # each query's last region, the most recent last: a query picked again finds it
KEPT_REGIONS = 32
BROWSE_PAGE = 12
ALL = "(all)"


@dataclass(frozen=True)
class Query:
    """The query image: an index into the dataset (the same image in every cache of it) or an upload."""

    source: str  # the dataset's source, or "upload"
    index: int | None = None
    digest: str | None = None  # sha1 of the uploaded bytes
    name: str = ""

    @property
    def key(self) -> str:
        return (
            f"upload-{self.digest}"
            if self.index is None
            else f"{hashlib.sha1(self.source.encode()).hexdigest()[:8]}-{self.index}"
        )

    def describe(self) -> dict:
        """How the JSON export names the query."""
        return {"index": self.index} if self.index is not None else {"image": self.name}


@dataclass(frozen=True, eq=False)
class Region:
    """A region drawn on a query: the canvas's drawing, its shapes redrawn when a canvas of another
    page opens on the same query."""

    query: Query
    drawing: Drawing

    @property
    def empty(self) -> bool:
        return not self.drawing.shapes

    def view_paint(self, cache: FeatureCache, drawn_on: FeatureCache | None = None) -> np.ndarray:
        """The drawing on `cache`'s view, at the canvas's size. Drawn on another cache's view
        (`drawn_on`: the Compare page's left), it is placed through the image: the same part of it,
        as `cache`'s model crops it (an image whose size is not at hand is taken as square)."""
        paint = self.drawing.paint
        if drawn_on is not None:
            size = query_size(drawn_on, self.query) or (CANVAS_PX, CANVAS_PX)
            paint = drawn_on.spec.preprocess.reframe(paint, cache.spec.preprocess, size)
        return paint

    def mask(self, cache: FeatureCache, drawn_on: FeatureCache | None = None) -> np.ndarray:
        """The region on `cache`'s grid (`view_paint` averaged onto it)."""
        return grid_mask(self.view_paint(cache, drawn_on), cache.spec.grid)


# --- which cache ------------------------------------------------------------------------------------
def describe_cache(row: dict) -> str:
    remote = " (remote)" if is_url(row["path"]) else ""
    shape = f"{row['grid']}×{row['channels']}"
    return f"{row['name']}{remote} — {row['model']} · {row['layer']} · {shape} · {row['n']} images"


def pick_cache(
    key: str,
    label: str = "Cache",
    shared: str | None = CACHE,
    partner: FeatureCache | None = None,
    paired: bool = False,
    spelled_out: bool = False,
) -> FeatureCache:
    """A selectbox of the complete caches that hold images (a build whose every image was skipped
    leaves an empty one, listed on the Build page with its report); stops the page with a hint when
    there are none.

    `shared` keeps the choice for the other pages; `partner` is the cache this one is compared with:
    the default is then another cache of the same images (`comparison_refusal`), if there is one,
    and a new partner brings the default back. `paired`: the default is the first cache that
    another can be compared with. `spelled_out`: the chosen cache's description in full under the
    box too, which a half-width box cuts (two caches differ in their model or layer past the cut).
    """
    rows = [r for r in cache_rows() if r["complete"] and r["n"]]
    if not rows:
        st.info(
            "No cache to search yet: build the demo cache on the Home page, or another on the Build page."
        )
        st.page_link("app_pages/home.py", label="Go to Home", icon=":material/home:")
        st.stop()
    choices = {r["path"]: describe_cache(r) for r in rows}
    default = rows[0]["path"]
    if paired:
        default = memo(f"{key}.default", tuple(choices), lambda: _first_paired(rows) or default)
    if partner is not None:
        others = tuple(p for p in choices if p != partner.location)
        default = memo(
            f"{key}.default",
            (partner.location, others),
            lambda: _comparable(partner, others) or (others[0] if others else partner.location),
        )
        if st.session_state.get(f"{key}.partner", partner.location) != partner.location:
            st.session_state.pop(key, None)  # chosen for another partner: the default comes back
            st.session_state.pop(kept_key(key, shared), None)
        st.session_state[f"{key}.partner"] = partner.location
    chosen = st.session_state.get(key, st.session_state.get(kept_key(key, shared)))
    location = st.selectbox(
        label, list(choices), format_func=lambda path: choices[path], key=bind(key, default, shared, choices)
    )
    if spelled_out:
        st.caption(as_written(choices[location or default]))
    if chosen is not None and chosen not in choices and chosen != location:  # the page went on silently
        st.warning(
            f"The cache chosen before, {as_written(chosen)}, is gone (deleted or moved?): "
            f"{label.lower()} is now this one."
        )
    with user_errors():
        return get_cache(location or default)  # never None: the options are not empty


LINKED = "vfs.linked"  # the session has taken its address's cache and query (once: later, its own choices)


def follow_link() -> None:
    """A session opened on a page's address with `?cache=NAME&query=I` (what `show_in_link` writes: a
    reload, a bookmark, a link sent to a colleague) starts on that cache and query image, where they
    exist; the widgets' own choices rule from then on."""
    if st.session_state.get(LINKED):
        return
    st.session_state[LINKED] = True
    named, index = st.query_params.get("cache"), st.query_params.get("query")
    row = next((r for r in cache_rows() if r["complete"] and r["n"] and _link_name(r["path"]) == named), None)
    if row is None:
        return
    st.session_state[CACHE] = row["path"]
    if index is not None and index.isdecimal() and int(index) < row["n"]:
        st.session_state[INDEX] = int(index)
        st.session_state[FROM] = DATASET


def _link_name(location: str) -> str:
    """A cache as a link names it: its name in the caches folder; elsewhere (a URL, a cache opened by
    path) its location — a remote cache may bear a local one's name."""
    in_folder = not is_url(location) and Path(location).resolve().parent == settings().cache_dir.resolve()
    return cache_name(location) if in_folder else location


def show_in_link(cache: FeatureCache, query: Query) -> None:
    """The page's address names its cache and query image (an upload: the cache only), so that a
    reload or a copied link opens on them (`follow_link`)."""
    link = {"cache": _link_name(cache.location)}
    if query.index is not None:
        link["query"] = str(query.index)
    if st.query_params.to_dict() != link:
        st.query_params.from_dict(link)


def _comparable(partner: FeatureCache, locations: tuple[str, ...]) -> str | None:
    """The first of `locations` whose cache holds `partner`'s images in its order, if any."""
    for location in locations:
        try:
            cache = get_cache(location)
            if cache.n == partner.n and comparison_refusal(partner, cache) is None:
                return location
        except CacheError:  # gone since it was listed, or damaged (picked, the page says why)
            continue
    return None


def _first_paired(rows: list[dict[str, Any]]) -> str | None:
    """The first listed cache that another listed cache of as many images can be compared with."""
    for row in rows:
        others = tuple(o["path"] for o in rows if o["path"] != row["path"] and o["n"] == row["n"])
        if not others:
            continue
        try:
            cache = get_cache(row["path"])
        except CacheError:
            continue
        if _comparable(cache, others) is not None:
            return str(row["path"])
    return None


# --- which image ------------------------------------------------------------------------------------
def _choose(index_key: str, index: int) -> None:
    st.session_state[index_key] = index


def _choose_random(index_key: str, candidates: np.ndarray) -> None:
    if len(candidates):
        st.session_state[index_key] = int(random.choice(candidates))


def _label_filter(cache: FeatureCache, key: str, index_key: str) -> np.ndarray:
    """Indices of the images carrying the label chosen for browsing (all images without a label
    column). Choosing one that the query image lacks makes its first image the query: a choice
    that changed nothing on screen read as a control that did nothing."""
    if not cache.label_col:
        return np.arange(cache.n)
    table = groups(cache, cache.label_col)
    label = st.selectbox(
        "Browse by label",
        [ALL, *table.columns],
        key=bind(f"{key}.label", ALL, "vfs.query.label", options=[ALL, *table.columns]),
        on_change=_label_chosen,
        args=(cache, cache.label_col, f"{key}.label", index_key),
        help="The random image and the thumbnails come from the images with this label.",
    )
    members = _labelled(cache, cache.label_col, label)
    if label != ALL:
        st.caption(f"{len(members)} images labelled {as_written(label)}")
    return members


def _labelled(cache: FeatureCache, column: str, label: str) -> np.ndarray:
    """The images carrying `label` in `column` (every image for ALL)."""
    return np.arange(cache.n) if label == ALL else np.flatnonzero(groups(cache, column)[label].to_numpy())


def _label_chosen(cache: FeatureCache, column: str, label_key: str, index_key: str) -> None:
    members = _labelled(cache, column, st.session_state[label_key])
    if len(members) and st.session_state.get(index_key) not in members:
        st.session_state[index_key] = int(members[0])


def _query_caption(cache: FeatureCache, index: int) -> str:
    """What the dataset says of the query image, as a result tile says it of a match, and its file."""
    return " · ".join([query_tag(cache, index), str(cache.manifest["path"].iloc[index])])


def query_tag(cache: FeatureCache, index: int) -> str:
    """A dataset image as its caption names it: "#342 · Cardiomegaly · PA"."""
    row = cache.manifest.iloc[index]
    tags = [str(row[c]) for c in (cache.label_col, cache.domain_col) if c and not pd.isna(row[c])]
    return " · ".join([f"#{index}", *tags])


def _browser(cache: FeatureCache, candidates: np.ndarray, key: str, index_key: str) -> None:
    """A page of thumbnails, each with a button that makes it the query."""
    pages = max(1, -(-len(candidates) // BROWSE_PAGE))
    page = st.number_input(
        f"Thumbnail page (of {pages})", 1, pages, key=bind(f"{key}.page", 1, options=range(1, pages + 1))
    )
    shown = candidates[(page - 1) * BROWSE_PAGE : page * BROWSE_PAGE]
    for n, (i, thumb) in enumerate(zip(shown, thumbs(cache, shown))):
        if n % 6 == 0:  # a row of columns at a time: the keyboard's order is then the reading order
            columns = st.columns(6)  # (one row of six columns filled down went #0, #18, #3, …: app review)
        with columns[n % 6]:
            st.image(thumb, caption=f"#{i}", width="stretch", output_format="JPEG", alt=f"Image #{i}")
            st.button(  # its number in its name: a screen reader lists the buttons, not the captions
                f"Use #{i}", key=f"{key}.use.{i}", on_click=_choose, args=(index_key, int(i)), width="stretch"
            )


def _dataset_query(cache: FeatureCache, key: str, filter_column: DeltaGenerator) -> Query:
    index_key = f"{key}.index"
    bind(index_key, 0, INDEX, range(cache.n))
    with filter_column:
        candidates = _label_filter(cache, key, index_key)
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    index = left.number_input(f"Image index (0–{cache.n - 1})", 0, cache.n - 1, step=1, key=index_key)
    right.button(
        "Random image",
        key=f"{key}.random",
        width="stretch",
        on_click=_choose_random,
        args=(index_key, candidates),
    )
    with user_errors():  # a damaged manifest: its message, as the search would give it
        st.caption(as_written(_query_caption(cache, int(index))))
    if st.toggle("Browse thumbnails", key=bind(f"{key}.browse", False)):
        _browser(cache, candidates, key, index_key)
    return Query(cache.spec.data.source, int(index))


def _upload_query(key: str) -> Query:
    s = settings()
    types = sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    file = st.file_uploader(
        f"Upload a query image (at most {s.max_upload_mb} MB)",
        type=types,
        key=f"{key}.upload",
        max_upload_size=s.max_upload_mb,
    )
    if file is not None:
        data = file.getvalue()
        if len(data) > s.max_upload_mb * (1 << 20):  # the uploader's limit is only the browser's to keep
            size = f"{len(data) / (1 << 20):.1f} MB"
            st.error(
                f"{as_written(file.name)} is {size}: this server takes images of at most {s.max_upload_mb} MB"
            )
            st.stop()
        st.session_state[UPLOADED] = (hashlib.sha1(data).hexdigest(), file.name, data)
    if UPLOADED not in st.session_state:
        st.info("Upload an image to search the dataset for regions like one of its regions.")
        st.stop()
    digest, name, _ = st.session_state[UPLOADED]
    # its name in full, as a dataset image's caption gives its file (the uploader's chip shortens it)
    named = as_written(name)
    st.caption(
        f"Query: {named}, uploaded" if file is not None else f"Using the image uploaded before: {named}"
    )
    return Query("upload", digest=digest, name=name)


def pick_query(cache: FeatureCache, key: str) -> Query:
    """The shared query-image picker: a dataset image (by index, at random, by label, from thumbnails) or
    an upload."""
    source_column, filter_column = st.columns(2)
    source = source_column.radio(
        "Query image", [DATASET, UPLOAD], horizontal=True, key=bind(f"{key}.from", DATASET, FROM)
    )
    if source == DATASET:
        return _dataset_query(cache, key, filter_column)
    upload = _upload_query(key)
    copy = _image_uploaded(cache, upload)
    if copy is None:
        return upload
    st.info(
        f"{as_written(upload.name)} is image {as_written(query_tag(cache, copy))} of this cache (the same "
        "features): it is "
        "searched as that image, so leaving out the query, and the images sharing its values, apply to it."
    )
    return Query(cache.spec.data.source, copy)


def _image_uploaded(cache: FeatureCache, upload: Query) -> int | None:
    """The cache image an upload is, if any: ranked among the others, a copy of the query scored
    about 1 and counted in the statistics the page said it left out (researcher review)."""

    def find() -> int | None:
        sharded = sharded_search(cache)
        search = partial(search_regions, cache) if sharded is None else sharded.search
        return image_searched(search, query_features(cache, upload), cache.spec.grid)

    with user_errors():
        # the cache as built: rebuilt over changed files with the same spec, its rows are other images
        return memo(f"uploaded.{cache.location}", (upload, cache.spec, cache.built), find)


def _uploaded_image() -> Image.Image:
    """The upload decoded, for the memos that keep what is made of it (its view, its features): not
    kept itself — up to 4096² pixels a session, held for as long as the session lives."""
    _, name, data = st.session_state[UPLOADED]
    with user_errors():
        return load_image(data, name=f"the upload {name}")


def query_view(cache: FeatureCache, query: Query) -> np.ndarray:
    """The query image exactly as the cache's model sees it: its thumbnail, or the upload's resized crop."""
    if query.index is not None:
        return thumbs(cache, [query.index])[0]
    size = cache.thumbs.shape[1]

    def view() -> np.ndarray:
        return view_thumbnail(cache.spec.preprocess.view(_uploaded_image()), size)

    return memo(f"view.{cache.location}", (query, cache.spec, cache.built), view)


def query_features(cache: FeatureCache, query: Query) -> int | np.ndarray:
    """What search takes: the dataset index (its cached features), or the upload's features by the
    cache's own model."""
    if query.index is not None:
        return query.index
    with user_errors():
        return memo(
            f"features.{cache.location}",
            (query, cache.spec),
            lambda: extractor_for(cache).features(_uploaded_image()),
        )


# --- which region -----------------------------------------------------------------------------------
@st.cache_data(max_entries=16, show_spinner=False)
def _background(view: np.ndarray) -> str:
    """The view at canvas size as a JPEG data URL: small, and encoded once per image."""
    return jpeg_data_url(Image.fromarray(view).resize((CANVAS_PX, CANVAS_PX), Image.Resampling.BICUBIC))


def canvas_row() -> tuple[DeltaGenerator, DeltaGenerator]:
    """A row of the drawing (the canvas's width, or the window's where that is narrower: the canvas
    shrinks to fit) and the page's options beside it, taking the rest."""
    row = st.container(horizontal=True, gap="medium")
    return row.container(width=CANVAS_PX), row.container()


def draw_region(cache: FeatureCache, view: np.ndarray, query: Query, key: str) -> Region | None:
    """The shared drawer: the view on a canvas (free-hand or rectangle; undo, redo and clear above it),
    the tool and brush size below it.

    The region drawn is kept in session state; a canvas opened on another page starts from its shapes.
    A region can also be loaded from a PNG mask (`_load_region`): the canvas then opens anew with it.
    """
    st.caption("Paint the region to search for")
    canvas = st.empty()  # filled last: it needs the tool and brush chosen below it
    freehand = (
        st.radio(
            "Drawing tool",
            ["Free-hand", "Rectangle"],
            horizontal=True,
            key=bind(f"{key}.tool", "Free-hand", "vfs.region.tool"),
        )
        == "Free-hand"
    )
    width = st.slider(
        "Brush size", 4, 80, key=bind(f"{key}.brush", 32, "vfs.region.brush"), disabled=not freehand
    )
    keep = st.checkbox(
        "Keep the region for other images",
        key=bind("region.keep", False),
        help="Another query image opens with this region painted on its view (e.g. the heart, on "
        "every X-ray); off, each image is painted anew.",
    )
    loads = st.session_state.setdefault(f"{key}.loads", 0)  # regions loaded: a new uploader, a new canvas
    st.file_uploader(
        "Load a region (PNG mask)",
        type=["png"],
        key=f"{key}.mask_file.{loads}",
        on_change=_load_region,
        args=(cache, query, key),
        help="A mask painted on the query image or on the model's view, e.g. one downloaded here "
        "(“Download region”): opaque, or white, where the region is. It replaces the drawing; the "
        "canvas holds paint, not weights: any pixel the mask touches counts as painted.",
    )
    if (failure := st.session_state.pop(f"{key}.mask_error", None)) is not None:
        st.error(failure)
    if (caution := st.session_state.pop(f"{key}.mask_warning", None)) is not None:
        st.warning(caution)
    stored = st.session_state.get(REGION)
    if stored is not None and stored.query != query:
        if keep:  # the drawing, on this query's view
            stored = _remember(Region(query, stored.drawing))
        else:  # this query's own last drawing (of this cache or another), or a blank canvas
            stored = st.session_state.get(DRAWN, {}).get(query)
    try:
        with canvas:
            drawing = paint_canvas(
                _background(view),
                CANVAS_PX,
                "brush" if freehand else "rectangle",
                width,
                cache.spec.grid,
                key=f"{key}.canvas.{query.key}.{loads}",
                shapes=stored.drawing.shapes if stored is not None else None,  # drawn when it mounts
                undo_to=_replaced(key, query, loads),
            )
    except DrawingError as e:
        st.error(f"The drawing could not be read ({e}): clear the canvas and draw again.")
        st.stop()
    if drawing is not None:
        stored = _remember(Region(query, drawing))
    return stored


def _remember(region: Region) -> Region:
    """`region` as the session's current one and as its query's last (the other pages' canvases, a
    query picked again — after another cache's, say — open on it)."""
    st.session_state[REGION] = region
    drawn = st.session_state.setdefault(DRAWN, {})
    drawn.pop(region.query, None)
    drawn[region.query] = region
    while len(drawn) > KEPT_REGIONS:
        drawn.pop(next(iter(drawn)))
    return region


def _load_region(cache: FeatureCache, query: Query, key: str) -> None:
    """The uploader's callback: the mask file becomes the query's region, drawn as the canvas's paint
    (`loaded_paint`); a file that cannot be used is said above the canvas, and the drawing stays."""
    file = st.session_state.get(f"{key}.mask_file.{st.session_state[f'{key}.loads']}")
    if file is None:  # the file was removed from the uploader
        return
    try:
        paint, faint = loaded_paint(cache, query, file.getvalue(), file.name)
    except ValueError as e:
        st.session_state[f"{key}.mask_error"] = str(e)
    else:
        replaced = st.session_state.get(REGION)  # an Undo on the canvas the mask opens brings it back
        if replaced is not None and replaced.query == query:
            opens = (query.key, st.session_state[f"{key}.loads"] + 1)  # the canvas's, below
            st.session_state[f"{key}.replaced"] = (opens, replaced.drawing.shapes)
        _remember(Region(query, Drawing([mask_shape(paint)], paint)))
        if faint > FAINT_SHARE:
            st.session_state[f"{key}.mask_warning"] = (
                f"{file.name}: {faint:.0%} of the pixels it paints are faint (under 10% opaque, or "
                "nearly black): a grey background counts as painted; make it transparent, or black"
            )
    st.session_state[f"{key}.loads"] += 1  # an empty uploader, for this file again or another


def _replaced(key: str, query: Query, loads: int) -> list[dict] | None:
    """The drawing a loaded mask replaced, for the canvas that mask opened (none for another)."""
    opened, shapes = st.session_state.get(f"{key}.replaced", (None, None))
    return shapes if opened == (query.key, loads) else None


FAINT_SHARE = 0.5
"""Above this share of faint pixels (coverage under 10%) in a loaded mask, the page warns: most
likely a background that is not quite transparent or black, which the canvas takes as paint."""


def query_size(cache: FeatureCache, query: Query) -> tuple[int, int] | None:
    """(H, W) of the query image as a viewer shows it (None: a dataset image not at hand, or on a
    hosted server outside its caches folder), read once per query: a dataset image's means opening
    its dataset."""

    def size() -> tuple[int, int] | None:
        if query.index is not None:  # a hosted server reads no dataset outside its caches folder
            return cache.image_size(query.index) if settings().reads_dataset(cache.spec.data.source) else None
        return upright_size(io.BytesIO(st.session_state[UPLOADED][2]))

    return memo("query_size", (cache.location, cache.built, query), size)


def loaded_paint(cache: FeatureCache, query: Query, data: bytes, name: str) -> tuple[np.ndarray, float]:
    """A mask file as canvas paint: (CANVAS_PX, CANVAS_PX) bool, true where it covers any part of a
    pixel — as any paint counts fully on the canvas — and the share of those pixels it covers under
    10%. Placed as the CLI's --mask places it: on the query image (its size or shape), cropped as
    the model saw it, or on the model's view; the app's own download ("Download region") comes back
    pixel for pixel."""
    cover = mask_image_coverage(
        io.BytesIO(data), name, cache.spec.preprocess.painted_on(partial(query_size, cache, query))
    )
    coverage = grid_mask(cover, (CANVAS_PX, CANVAS_PX))
    paint = coverage > 0
    if not paint.any():
        raise ValueError(f"{name} paints nothing: the region is where the mask is opaque, or white")
    return paint, float((coverage[paint] < 0.1).mean())


def leave_out_query(label: str, key: str, query: Query) -> bool:
    """A page's "exclude the query image" box, on by default for a dataset image; for an upload,
    which is none of the cache's images, shown off and disabled — it would leave nothing out (the
    dataset image's own setting is kept for when one is chosen again)."""
    if query.index is None:
        st.checkbox(
            label,
            False,
            key=f"{key}.upload",
            disabled=True,
            help="The uploaded image is none of the cache's images: there is nothing to leave out.",
        )
        return False
    return st.checkbox(label, key=bind(key, True, "vfs.leave_out.query"))  # the same on every page


NO_COLUMN = "(none)"


@dataclass(frozen=True)
class LeftOut:
    """The images sharing the query's value of a manifest `column` (the CLI's --exclude-same), left
    out of the ranking; none where no column is chosen."""

    column: str | None = None
    images: tuple[int, ...] = ()


def leave_out_sharing(cache: FeatureCache, query: Query, key: str) -> LeftOut:
    """A page's "also leave out the images sharing the query's <column>" choice (e.g. a patient's
    other X-rays), over the manifest columns whose values repeat: the column and the images it leaves
    out."""
    columns = sharing_columns(cache)
    if query.index is None or not columns:
        return LeftOut()
    options = [NO_COLUMN, *columns]
    column = st.selectbox(
        "Also leave out the images sharing the query's",
        options,
        # the same on every page: the Distributions page's statistics counted the patient's other
        # X-rays after the Search page had left them out
        key=bind(
            f"{key}.{cache.location}", NO_COLUMN, f"vfs.leave_out.sharing.{cache.location}", options=options
        ),
        help="E.g. a patient's other images: alike in ways no finding explains, and the statistics "
        "take every image as independent of the others.",
    )
    if column == NO_COLUMN:
        return LeftOut()
    return LeftOut(column, tuple(cache.images_sharing(column, query.index).tolist()))


def require_region(region: Region | None, said: DeltaGenerator) -> Region:
    """Stop the page with a hint until a region is drawn; `said`, the page's place for what it says to
    a screen reader (`ui.announce`: one element from run to run), says so too."""
    if region is None or region.empty:
        st.info("Draw on the query image to search: paint over the part you are interested in.")
        with said:
            announce("No region drawn: nothing searched.")
        st.stop()
    return region


# --- the search ---------------------------------------------------------------------------------------
def run_search(
    cache: FeatureCache,
    query: Query,
    region: Region,
    k: int = 10,
    exclude_query: bool = True,
    per_domain: int | None = None,
    labels: tuple[str, ...] = (),
    all_exact: bool = False,
    leave_out: tuple[int, ...] = (),
    drawn_on: FeatureCache | None = None,
) -> SearchResult:
    """`vfs.search.search_regions` for this query, remembered until the query or an option changes;
    `all_exact` for pages that use every image's score (see there); `leave_out`: other images kept
    out of the ranking (`leave_out_sharing`); `drawn_on`: the cache on whose view the region was
    drawn, where that is another (`Region.mask`)."""
    mask = region.mask(cache, drawn_on)
    query_out = (query.index,) if exclude_query and query.index is not None else ()
    exclude = query_out + leave_out or None
    # the cache as built: one rebuilt at its place with the same spec searched as the old (review)
    key = (query, cache.spec, cache.built, mask.tobytes(), k, exclude, per_domain, labels, all_exact)

    def search() -> SearchResult:
        candidates = None
        if labels and cache.label_col:
            candidates = in_any_group(groups(cache, cache.label_col), labels, cache.location)
        sharded = sharded_search(cache)  # on a Ray cluster when the app is configured so
        search = partial(search_regions, cache) if sharded is None else sharded.search
        result = search(
            query_features(cache, query),
            mask,
            k=k,
            exclude=exclude,
            per_domain=per_domain,
            candidates=candidates,
            all_exact=all_exact,
        )
        _ = result.top  # every page shows it: built here, where a damaged manifest is a message (user_errors)
        return result

    with user_errors():
        return memo(f"search.{cache.location}", key, search)
