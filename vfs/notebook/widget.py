"""`SearchWidget`: paint on a query in a notebook, get the engine's exact matches below it.

The browser holds only the drawing (brush and rectangle strokes, undo, redo, clear). When a stroke
ends it sends the painted pixels of the model's view to Python, which area-averages them onto
the feature grid (`vfs.masks.grid_mask`), runs `vfs.search_regions` and sends back pictures made
by `vfs.render`: so a painted region is searched exactly as the dashboard and the CLI search it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anywidget
import numpy as np
import traitlets
from PIL import Image

from ..cache import CacheError, FeatureCache, ReplacementWatch
from ..images import load_image
from ..jobs import view_thumbnail
from ..masks import crop_mask, grid_mask, grid_mask_values
from ..models import Extractor
from ..render import jpeg_data_url, mask_overlay, mask_summary, outlined_match, window_text
from ..search import (
    SearchResult,
    checked_k,
    checked_per_domain,
    image_indices,
    image_searched,
    search_regions,
)
from ..settings import is_url
from ..stats import is_missing

HERE = Path(__file__).parent
PAINT_HINT = "Paint over the part of the query to search for (brush or rectangle)."


@dataclass(frozen=True)
class ResolvedQuery:
    """The query image as the model saw it, and what the search takes for it."""

    view: np.ndarray  # (S, S, 3) uint8: the thumbnail of the model-input crop, as the cache's images'
    features: int | np.ndarray  # a dataset index (its cached features) or an (h, w, C) feature map
    index: int | None  # the dataset image, if the query is one
    recognized: bool = False  # an image given as such that is the dataset image `index`


def resolve_query(
    cache: FeatureCache, query: int | Image.Image | str | Path, extractor: Extractor | None = None
) -> ResolvedQuery:
    """A dataset index as is; an image (or its file) through `extractor`, by default the cache's own
    model and layer, refused (CacheError) when its features cannot be compared with the cache's.
    An image's view is made into a thumbnail as the cache's images' are, so that a drawing keeps its
    place from one query to the next (a 448 px model's view was twice a thumbnail's side: the
    strokes stayed at their pixels, a quarter of the image away); an image that is one of the
    cache's (the same features: `image_searched`) is that image, left out as a query index is."""
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        if extractor is not None:
            raise ValueError(
                "extractor= is for a query image; a dataset index uses the cache's stored features"
            )
        index = int(image_indices(query, cache.n, "query index")[0])
        return ResolvedQuery(cache.thumb(index), index, index)
    if isinstance(query, (str, Path)):
        query = load_image(query)
    if not isinstance(query, Image.Image):
        raise TypeError(
            f"query must be a dataset index or a PIL image (or an image file), not {type(query).__name__}"
        )
    if extractor is None:
        extractor = cache.extractor()
    else:
        cache.check_extractor(extractor.describe())
    features = extractor.features(query)
    copy = image_searched(partial(search_regions, cache), features, cache.spec.grid)
    if copy is not None:
        return ResolvedQuery(cache.thumb(copy), copy, copy, recognized=True)
    view = view_thumbnail(extractor.preprocess.view(query), cache.thumbs.shape[1])
    return ResolvedQuery(view, features, None)


def _text(value: object) -> str | None:
    """A label or domain as JSON text; None where the manifest has none."""
    return None if is_missing(value) else str(value)


class _ObserverFailed(Exception):
    """An observer of the widget's `result` raised `original`: the user's code, not the search."""

    def __init__(self, original: Exception):
        super().__init__(str(original))
        self.original = original


class SearchWidget(anywidget.AnyWidget):
    """Paint a region on a query image; see the cache's most similar regions, ranked and outlined.

    `query` is a dataset index, or a PIL image (or image file) whose features come from
    `extractor` — by default the cache's own model; an extractor of your own (e.g. an edited
    model, `vfs.extractor_from_module`) must match the cache's layer, grid and preprocessing.
    After each stroke `result` holds the `SearchResult` (its `.top` table and every image's
    `.scores`) and `mask` the grid mask used; `widget.observe(callback, names="result")` runs
    your analysis after every search. Scores beyond the top-k are the fast pass's (their third
    decimal may differ between machines); `all_exact=True` re-scores every image in float64, as
    the Distributions page does, for statistics over all of them (tens of ms more at 10,000 images).
    `search(mask)` searches a grid mask from Python, `set_query(query)` searches the region from
    another query. Errors are shown in the widget.
    """

    _esm = (HERE / "painter.js").read_text() + (HERE / "widget.js").read_text()
    _css = (HERE / "painter.css").read_text() + (HERE / "widget.css").read_text()

    # Shown by the browser; `brush`, `tool`, `shapes` and `k` are also set there.
    view = traitlets.Unicode().tag(sync=True)  # JPEG data URL of the query as the model saw it
    view_size = traitlets.List(traitlets.Int()).tag(sync=True)  # [height, width] of the view: the canvas
    grid = traitlets.List(traitlets.Int()).tag(sync=True)  # [h, w] of the feature grid
    brush = traitlets.Int(22).tag(sync=True)  # brush diameter in view pixels
    tool = traitlets.Enum(["brush", "rectangle"], "brush").tag(sync=True)
    # the strokes, in view pixels, oldest first: the browser's record of the drawing — set from Python
    # it is redrawn, not searched (the browser rasterises strokes; `search(mask)` searches a region)
    shapes = traitlets.List(traitlets.Dict()).tag(sync=True)
    k = traitlets.Int(10).tag(sync=True)
    mask_view = traitlets.Unicode().tag(sync=True)  # the grid mask over the view (vfs.render.mask_overlay)
    mask_caption = traitlets.Unicode().tag(sync=True)
    matches = traitlets.List(traitlets.Dict()).tag(sync=True)  # rank, index, score, tags, window, image
    status = traitlets.Unicode(PAINT_HINT).tag(sync=True)
    error = traitlets.Unicode().tag(sync=True)
    revision = traitlets.Int(0).tag(sync=True)  # answers sent (results, cleared or error): a view's "done"

    # Python only: observe these to chain an analysis.
    result = traitlets.Instance(SearchResult, allow_none=True)
    mask = traitlets.Instance(np.ndarray, allow_none=True)
    exclude_query = traitlets.Bool(True)
    per_domain = traitlets.Int(None, allow_none=True)
    all_exact = traitlets.Bool(False)

    @traitlets.validate("k")
    def _k_is_a_count(self, proposal: dict) -> int:
        """Refused where it is set (a cell, the constructor), not at the next stroke's search."""
        try:
            return checked_k(proposal["value"])
        except ValueError as e:
            raise traitlets.TraitError(str(e)) from None

    @traitlets.validate("per_domain")
    def _per_domain_is_a_count(self, proposal: dict) -> int | None:
        try:
            return checked_per_domain(proposal["value"], self.cache)
        except ValueError as e:
            raise traitlets.TraitError(str(e)) from None

    @traitlets.validate("brush")
    def _brush_is_a_size(self, proposal: dict) -> int:
        size = proposal["value"]
        if isinstance(size, bool) or size < 1:
            raise traitlets.TraitError(f"brush is a diameter of at least 1 pixel of the view, not {size!r}")
        return size

    def __init__(
        self,
        cache: FeatureCache,
        query: int | Image.Image | str | Path = 0,
        k: int = 10,
        exclude_query: bool = True,
        per_domain: int | None = None,
        all_exact: bool = False,
        extractor: Extractor | None = None,
        **kwargs,
    ) -> None:
        cache.check_searchable()
        self.cache = cache
        self._watch = ReplacementWatch(cache)  # `_check_rebuilt`
        self._extractor = extractor  # an image query's model, for `set_query` too
        self._query = resolve_query(cache, query, extractor)
        view = self._query.view
        super().__init__(
            view=jpeg_data_url(view),
            view_size=list(view.shape[:2]),
            grid=list(cache.spec.grid),
            brush=max(2, round(min(view.shape[:2]) / 10)),
            k=k,
            exclude_query=exclude_query,
            per_domain=per_domain,
            all_exact=all_exact,
            **kwargs,
        )
        self.on_msg(self._on_message)

    @property
    def query_index(self) -> int | None:
        """The query's dataset index (None for an image query): e.g. to leave it out of a distribution."""
        return self._query.index

    def search(self, mask: np.ndarray) -> SearchResult:
        """Search the grid mask `mask` (h, w; see `vfs.grid_mask`) as if it had been painted.

        A mask that is no region of this grid (its shape, its values, nothing in it) raises and
        leaves the widget as it was. Else the drawing is cleared (it no longer is the query); the
        widget shows the result or the error, which is raised too.
        """
        asked = grid_mask_values(mask, self.cache.spec.grid).astype(np.float32)
        crop_mask(asked)  # its values checked: NaN, negative or empty
        self.shapes = []
        try:
            return self._run(asked)
        except _ObserverFailed as e:
            raise e.original from None  # the caller's own observer: its exception, to the cell
        except Exception as e:
            self._fail(e, asked)
            raise

    def set_query(self, query: int | Image.Image | str | Path) -> SearchResult | None:
        """Search the same region from another query: a dataset index, or an image (or its file)
        through the widget's model (`extractor=` when it was made, else the cache's).

        The drawing stays, so that aligned images (chest X-rays, say) are compared region for region;
        `clear()` removes it. Returns the new result (None before anything is painted). A query that
        cannot be used raises and leaves the widget as it was; a failed search is shown and raised,
        as `search`'s is.
        """
        is_index = isinstance(query, (int, np.integer)) and not isinstance(query, bool)
        self._query = resolve_query(self.cache, query, None if is_index else self._extractor)
        with self.hold_sync():  # the new view and its answer reach the browser together
            self.view = jpeg_data_url(self._query.view)
            self.view_size = list(self._query.view.shape[:2])
            mask = self.mask
            try:
                if mask is None:
                    self._show(None, None)
                    return None
                return self._run(mask)
            except _ObserverFailed as e:
                raise e.original from None
            except Exception as e:
                # another query: the matches shown, and `result`, are the old one's — cleared
                self._fail(e, None if mask is None else mask.copy())
                raise

    def clear(self) -> None:
        """Remove the drawing and the result."""
        with self.hold_sync():
            self.shapes = []
            try:
                self._show(None, None)
            except _ObserverFailed as e:
                raise e.original from None

    # --- the browser's messages and option changes ---------------------------------------------------
    def _on_message(self, _widget: SearchWidget, content: dict, buffers: list[memoryview]) -> None:
        """A stroke ended (or was undone or redone, or the drawing cleared): search the canvas's paint."""
        if content.get("type") != "paint":
            return
        try:
            paint = np.frombuffer(buffers[0], dtype=np.uint8)
            if paint.size != int(np.prod(self.view_size)):
                raise ValueError(
                    f"the drawing has {paint.size} pixels; the query's view has {self.view_size}"
                )
            painted = paint.reshape(self.view_size) > 0  # any paint counts fully, as on the dashboard
            mask = grid_mask(painted, self.cache.spec.grid) if painted.any() else None
        except Exception as e:  # noqa: BLE001 - shown in the widget, not as a traceback in the kernel log
            self._fail(e, None)
            return
        try:
            if mask is None:
                self._show(None, None)
            else:
                self._run(mask)
        except _ObserverFailed as e:  # shown in the widget; its traceback to the kernel's output
            traceback.print_exception(e.original)
        except Exception as e:  # noqa: BLE001 - as above
            self._fail(e, mask)

    @traitlets.observe("k", "exclude_query", "per_domain", "all_exact")
    def _options_changed(self, _change: dict) -> None:
        if self.mask is not None:
            try:
                self._run(self.mask)
            except _ObserverFailed as e:
                traceback.print_exception(e.original)
            except Exception as e:  # noqa: BLE001 - as in _on_message
                self._fail(e, self.mask)

    # --- searching and showing --------------------------------------------------------------------------
    def _check_rebuilt(self) -> None:
        """Refuse a cache rebuilt or finished since it was opened: its rows in memory would be shown
        with the thumbnails and labels of another. A local one is asked before each search (≈ 1 ms);
        one behind a URL in the background, the answer taken by the next search, so that a server
        that hangs holds no stroke."""
        if self._watch.replaced(wait_s=0.0 if is_url(self.cache.location) else None):
            raise CacheError(
                f"the cache at {self.cache.location} was rebuilt, or its build finished, since it was "
                "opened: open it again (vfs.open_cache) and make a new widget of it"
            )

    def _run(self, mask: np.ndarray) -> SearchResult:
        self._check_rebuilt()
        exclude = self._query.index if self.exclude_query else None
        result = search_regions(
            self.cache,
            self._query.features,
            mask,
            k=self.k,
            exclude=exclude,
            per_domain=self.per_domain,
            all_exact=self.all_exact,
        )
        self._show(result, mask)
        return result

    def _show(self, result: SearchResult | None, mask: np.ndarray | None) -> None:
        """Send the result's pictures to the browser, then set `result` (observers see the widget updated)."""
        with self.hold_sync():
            if result is None or mask is None:
                self.matches, self.mask_view, self.mask_caption, self.status = [], "", "", PAINT_HINT
            else:
                self.matches = self._tiles(result)
                self.mask_view = jpeg_data_url(mask_overlay(self._query.view, mask))
                self.mask_caption = (
                    f"{mask_summary(mask)}: the share of each cell painted, the fullest counting 1"
                )
                self.status = result.caption() + self._recognized()
            self.error = ""
            self.revision += 1
        self.mask = mask
        try:
            self.result = result
        except Exception as e:  # an observer of `result`, the user's analysis: the search went well
            done = (
                "the search itself succeeded (its matches are below)"
                if result is not None
                else "the result was cleared (None: nothing painted)"
            )
            with self.hold_sync():
                self.error = (
                    f"your observer of `result` raised {type(e).__name__}: {e} — {done}; the traceback is in "
                    "the kernel's output (JupyterLab: View → Show Log Console) for a painted stroke, in the "
                    "cell for a call"
                )
                self.revision += 1
            raise _ObserverFailed(e) from e

    def _recognized(self) -> str:
        """What the status adds where the query image is one of the cache's."""
        if not self._query.recognized:
            return ""
        left = "left out" if self.exclude_query else "included: exclude_query=False"
        return f"; the query image is image {self._query.index} of the cache, searched as it ({left})"

    def _tiles(self, result: SearchResult) -> list[dict]:
        """Each match as the model saw it, its best window outlined, with its score, label and domain."""
        rows = result.top.to_dict("records")
        if not rows:
            return []
        thumbs = self.cache.thumbs_at([r["index"] for r in rows])
        return [
            {
                "rank": int(r["rank"]),
                "index": int(r["index"]),
                "score": float(r["score"]),
                "label": _text(r.get("label")),
                "domain": _text(r.get("domain")),
                "window": window_text(r["grid_box"], result.grid),
                "image": jpeg_data_url(outlined_match(thumb, r["grid_box"], result.grid), 85),
            }
            for r, thumb in zip(rows, thumbs)
        ]

    def _fail(self, error: Exception, mask: np.ndarray | None) -> None:
        """Show what went wrong (a ValueError's text is meant for the user): above the results where
        the region is the one they are of (an option change failed), else in their place — `mask`
        becomes the region asked for, so that an option change retries it, and `result` None, so
        that no analysis reads an older drawing's result."""
        with self.hold_sync():
            if mask is not self.mask:
                self.matches, self.mask_view, self.mask_caption, self.status = [], "", "", ""
            self.error = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            self.revision += 1
        if mask is not self.mask:
            self.mask, self.result = mask, None
