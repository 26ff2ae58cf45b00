"""Pictures of search results: matched windows, region masks, placement heat maps and paper figures.

Thumbnails are uint8 (S, S, 3) arrays of the model-input view, so a feature grid (h, w) lies evenly
over them; every grid-to-pixel conversion goes through `vfs.masks.grid_edges` so boxes, masks and heat
maps agree.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from functools import partial

import numpy as np
import pandas as pd
import plotly.colors
import plotly.express as px
import plotly.graph_objects as go
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .masks import PAINTED_ON_VIEW, Box, grid_box_to_pixels, grid_edges
from .stats import is_missing

__all__ = ["grid_box_to_pixels"]  # the boxes' pixels, for the pages that outline them
Color = tuple[int, int, int]
GRID_LINE_STRENGTH = 0.25  # how far a grid line is lightened towards white

_VIRIDIS = (
    np.asarray(plotly.colors.sample_colorscale("Viridis", np.linspace(0, 1, 256), colortype="tuple")) * 255
).round()


def _upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a (h, w, ...) grid to (H, W, ...) on the same edges as the boxes."""
    rows = np.diff(grid_edges(cells.shape[0], size[0]))
    cols = np.diff(grid_edges(cells.shape[1], size[1]))
    return np.repeat(np.repeat(cells, rows, axis=0), cols, axis=1)


def outline(
    thumb: np.ndarray, box_px: Box, color: Color = (255, 64, 0), width: int | None = None
) -> Image.Image:
    """The thumbnail with the matched window's border drawn inside `box_px`, leaving its content visible:
    the colour, then a black line inside it — seen on any image, and without colour (orange alone is
    as light as mid-grey: 1.3–1.8:1 against faces, an accessibility trial found)."""
    image = Image.fromarray(thumb).convert("RGB")
    if width is None:
        width = max(1, round(min(image.size) / 100))
    y0, x0, y1, x1 = box_px
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=width)
    if x1 - x0 > 2 * width and y1 - y0 > 2 * width:
        draw.rectangle([x0 + width, y0 + width, x1 - 1 - width, y1 - 1 - width], outline=(0, 0, 0), width=1)
    return image


def outlined_match(thumb: np.ndarray, grid_box: Box, grid: tuple[int, int]) -> Image.Image:
    """A match's thumbnail with its best window, a box of grid cells, outlined: as the pages, the
    notebook's widget and the figure show every match."""
    return outline(thumb, grid_box_to_pixels(grid_box, grid, thumb.shape[:2]))


def _grid_lines(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Lighten the inner cell boundaries faintly so the feature cells can be told apart."""
    out = image.astype(float)
    rows = grid_edges(grid[0], image.shape[0])[1:-1]
    cols = grid_edges(grid[1], image.shape[1])[1:-1]
    out[rows, :] += GRID_LINE_STRENGTH * (255 - out[rows, :])
    out[:, cols] += GRID_LINE_STRENGTH * (255 - out[:, cols])
    return out


def mask_overlay(
    thumb: np.ndarray, mask: np.ndarray, color: Color = (0, 160, 255), alpha: float = 0.5
) -> Image.Image:
    """Blend the soft grid mask (h, w) over the thumbnail, its weights as the search weighs them.

    Shows which feature cells the drawn region selects and with what weight; faint grid lines mark the cells.
    """
    weight = alpha * _upsample(searched_weights(mask), thumb.shape[:2])[..., None]
    blended = (1 - weight) * thumb[..., :3] + weight * np.asarray(color, dtype=float)
    lined = _grid_lines(blended, mask.shape)
    return Image.fromarray(np.clip(lined, 0, 255).round().astype(np.uint8))


def _cell_max(placement_scores: np.ndarray, mask_shape: tuple[int, int]) -> np.ndarray:
    """Per grid cell, the best score among the mask placements covering it (NaN where none is finite).

    Placement (i, j) covers cells [i, i + mh) x [j, j + mw); padding by mh-1 / mw-1 NaN on each side
    turns "placements covering cell (y, x)" into one sliding window starting at (y, x).
    """
    mh, mw = mask_shape
    padded = np.pad(
        np.asarray(placement_scores, dtype=float),
        ((mh - 1, mh - 1), (mw - 1, mw - 1)),
        constant_values=np.nan,
    )
    return np.fmax.reduce(sliding_window_view(padded, (mh, mw)), axis=(2, 3))


def heatmap_overlay(
    thumb: np.ndarray,
    placement_scores: np.ndarray,
    mask_shape: tuple[int, int],
    grid: tuple[int, int],
    alpha: float = 0.55,
) -> Image.Image:
    """Viridis heat map of where the query region matches: each cell shows the max score of the
    placements covering it.

    Colours are scaled to the image's own finite score range; cells no finite placement covers stay
    uncoloured.
    """
    placement_scores = np.asarray(placement_scores, dtype=float)
    expected = (grid[0] - mask_shape[0] + 1, grid[1] - mask_shape[1] + 1)
    if tuple(placement_scores.shape) != expected:
        raise ValueError(
            f"placement_scores shape {placement_scores.shape} != {expected} "
            f"for mask {mask_shape} on grid {grid}"
        )
    cells = _cell_max(placement_scores, mask_shape)
    finite = np.isfinite(cells)
    low, high = heat_range(cells)
    scaled = np.where(finite, (cells - low) / (high - low) if high > low else 1.0, 0.0)
    colors = _VIRIDIS[(scaled * 255).round().astype(int)]
    weight = alpha * finite[..., None].astype(float)
    size = thumb.shape[:2]
    blended = (1 - _upsample(weight, size)) * thumb[..., :3] + _upsample(weight * colors, size)
    return Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8))


def heat_range(cells: np.ndarray) -> tuple[float, float]:
    """The scores a heat map's colours span: its lowest and best finite cell (0, 0 where none is)."""
    finite = cells[np.isfinite(cells)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def placement_heat_range(placement_scores: np.ndarray, mask_shape: tuple[int, int]) -> tuple[float, float]:
    """`heat_range` of an image's heat map (`heatmap_overlay`'s scale): what a legend states."""
    return heat_range(_cell_max(np.asarray(placement_scores, dtype=float), mask_shape))


def colour_bar(width: int = 256, height: int = 12) -> Image.Image:
    """The heat maps' Viridis scale, left (lowest) to right (best): a legend beside them."""
    columns = _VIRIDIS[np.linspace(0, 255, width).round().astype(int)]
    return Image.fromarray(np.repeat(columns[None], height, axis=0).astype(np.uint8))


def _fit_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> str:
    """Shorten `text` with an ellipsis so a caption never spills into the next tile."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def match_tags(row: dict) -> list[str]:
    """A ranked row's label and domain, where it has them: what its caption adds to its score."""
    return [str(v) for c in ("label", "domain") if not is_missing(v := row.get(c))]


def ranked_matches(top: pd.DataFrame, thumbs: Sequence[np.ndarray]) -> list[dict]:
    """`results_figure`'s matches from a search's ranked table and its images' thumbnails, in rank order."""
    return [
        {"thumb": t, "box": r["grid_box"], "score": r["score"], "caption": " · ".join(match_tags(r))}
        for r, t in zip(top.to_dict("records"), thumbs)
    ]


def match_caption(rank: int, score: float, tags: Sequence[str] = ()) -> str:
    """The paper's caption under a match, "3. score 0.87 · face · lfw" (its label and domain)."""
    return " · ".join([f"{rank}. score {score:.2f}", *tags])


def window_text(grid_box: Box, grid: tuple[int, int]) -> str:
    """Where a match's best window lies, in words (the outline's, for a screen reader and a table):
    "rows 2–4, column 3 of 7×7", counted from 1."""
    y0, x0, y1, x1 = grid_box

    def span(what: str, first: int, end: int) -> str:
        return f"{what} {first + 1}" if end == first + 1 else f"{what}s {first + 1}–{end}"

    return f"{span('row', y0, y1)}, {span('column', x0, x1)} of {grid[0]}×{grid[1]}"


def searched_weights(mask: np.ndarray) -> np.ndarray:
    """A grid mask's weights as the search weighs them: scaled to a peak of 1 (only their ratios
    change a score), so that a thin stroke's cells, each a tenth painted, show as weighed fully."""
    m = np.clip(np.nan_to_num(np.asarray(mask, dtype=float)), 0, None)
    peak = m.max(initial=0.0)
    return m / peak if peak > 0 else m


def mask_summary(mask: np.ndarray) -> str:
    """What a grid mask selects and how the search weighs it, e.g. "9 of 49 feature cells selected
    (7×7), weights 0.25 to 1 as searched"."""
    (h, w), selected = mask.shape, np.asarray(mask) > 0
    said = f"{int(selected.sum())} of {h * w} feature cells selected ({h}×{w})"
    if not selected.any():
        return said
    lowest = searched_weights(mask)[selected].min()
    return f"{said}, " + ("each weighed alike" if lowest == 1 else f"weights {lowest:.2f} to 1 as searched")


def results_figure(
    query_thumb: np.ndarray,
    query_mask: np.ndarray,
    matches: list[dict],
    grid: tuple[int, int],
    columns: int = 5,
    title: str | None = None,
    query_caption: str = "query",
) -> Image.Image:
    """The paper's figure: the query with its mask on the left, then the matches with their windows outlined.

    `matches` are dicts with thumb (uint8 array), box (grid box), score and optional caption, in rank
    order; each match tile is scaled to the query thumbnail's size so the rows line up.
    """
    tile_h, tile_w = query_thumb.shape[:2]
    pad = max(4, tile_w // 32)
    font_size = max(10, tile_w // 16)
    font = ImageFont.load_default(size=font_size)
    caption_h = font_size + pad
    title_h = font_size + 2 * pad if title else 0
    columns = max(1, min(columns, len(matches)))
    rows = max(1, -(-len(matches) // columns))
    cell_w, cell_h = tile_w + pad, tile_h + caption_h + pad
    width = pad + (columns + 1) * cell_w + pad
    height = title_h + pad + rows * cell_h

    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((pad, pad), _fit_text(draw, title, font, width - 2 * pad), fill="black", font=font)

    def place(tile: Image.Image, text: str, left: int, top: int) -> None:
        figure.paste(tile.resize((tile_w, tile_h)), (left, top))
        draw.text(
            (left, top + tile_h + pad // 2), _fit_text(draw, text, font, tile_w), fill="black", font=font
        )

    top = title_h + pad
    query = mask_overlay(query_thumb, query_mask)
    rows_, cols_ = np.nonzero(np.asarray(query_mask) > 0)
    if rows_.size:  # the region's window outlined as the matches' are: a tint alone faded on blue images
        window = (int(rows_.min()), int(cols_.min()), int(rows_.max()) + 1, int(cols_.max()) + 1)
        query = outline(np.asarray(query), grid_box_to_pixels(window, grid, query_thumb.shape[:2]))
    place(query, query_caption, pad, top)
    for i, match in enumerate(matches):
        row, col = divmod(i, columns)
        place(
            outlined_match(match["thumb"], match["box"], grid),
            match_caption(i + 1, match["score"], [match["caption"]] if match.get("caption") else []),
            pad + (col + 1) * cell_w + pad,
            top + row * cell_h,
        )
    return figure


def region_mask_png(paint: np.ndarray) -> bytes:
    """A region painted on a canvas over the model's view as a PNG mask that a paint program edits
    (blue and opaque where painted) and `vfs.masks.load_mask` (the CLI's --mask) reads back to the
    same grid mask: marked as painted on the view (`PAINTED_ON_VIEW`), so that it is never taken
    for one painted on a query photo that happens to have the canvas's size."""
    rgba = np.zeros((*np.shape(paint), 4), dtype=np.uint8)
    rgba[..., 2] = 255
    rgba[..., 3] = np.where(np.asarray(paint) > 0, 255, 0)
    info = PngInfo()
    info.add_text(*PAINTED_ON_VIEW)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of `image`, for download buttons and saved figures."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_data_url(image: Image.Image | np.ndarray, quality: int = 90) -> str:
    """An image as a JPEG data URL: the page or widget carries it inline, so the browser shows it
    without fetching a file first (one round trip less per image)."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB").save(
        buffer, "JPEG", quality=quality
    )
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


_DISTRIBUTION_PLOTS = {"box": px.box, "violin": partial(px.violin, box=True), "strip": px.strip}
GROUP_COLOURS = plotly.colors.qualitative.Safe
"""Distinct hues, safe for colour-blind readers: Streamlit's own palette pairs a dark and a light
shade of each hue, which made unrelated groups (dog / elephant) look like a pair."""


def _as_written(text: object) -> str:
    """`text` as plotly shows it: its labels, titles and hovers take a few HTML tags (`<b>`,
    `<a href>`), and a manifest's labels and column names are their author's text — a label's link
    was a live link in the plot."""
    return html.escape(str(text), quote=False)


def distribution_figure(long: pd.DataFrame, kind: str = "box", by: str | None = None) -> go.Figure:
    """Score distribution per group (one trace each) from `long_scores` rows; kind is box, violin or
    strip; `by` names the grouping in the title."""
    if kind not in _DISTRIBUTION_PLOTS:
        raise ValueError(f"kind must be one of {sorted(_DISTRIBUTION_PLOTS)}, not {kind!r}")
    long = long.assign(group=long["group"].map(_as_written))
    order = list(dict.fromkeys(long["group"]))
    figure = _DISTRIBUTION_PLOTS[kind](
        data_frame=long,
        x="group",
        y="score",
        color="group",
        color_discrete_sequence=GROUP_COLOURS,
        hover_data=["index"],
        category_orders={"group": order},
        title=f"Best-region score by {_as_written(by)}" if by else None,
    )
    return figure.update_layout(showlegend=False, yaxis_title="cosine similarity")


def comparison_figure(scores_a: np.ndarray, scores_b: np.ndarray, names: tuple[str, str]) -> go.Figure:
    """Two models' score distributions on the same dataset as overlaid density histograms, in the
    same bins (plotly's own bins per trace differed, 0.05 against 0.02: the shapes did not compare)."""
    both = np.concatenate([np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)])
    finite = both[np.isfinite(both)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    size = (high - low) / 40 or 0.01
    bins = go.histogram.XBins(start=low, end=high + size / 2, size=size)  # the largest: in the last bin
    figure = go.Figure(
        [
            go.Histogram(  # told apart by their hatching too, not by their hue alone
                x=np.asarray(scores, dtype=float),
                name=_as_written(name),
                opacity=0.6,
                histnorm="probability density",
                xbins=bins,
                marker_color=colour,
                marker_pattern_shape=pattern,
                marker_pattern_fillmode="overlay",  # the hatching over the bars' fill, not instead of it
            )
            for scores, name, pattern, colour in zip((scores_a, scores_b), names, ("", "/"), GROUP_COLOURS)
        ]
    )
    return figure.update_layout(barmode="overlay", xaxis_title="cosine similarity", yaxis_title="density")
