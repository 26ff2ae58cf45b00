"""The dashboard's drawing canvas: the notebook widget's painter as a Streamlit component.

It sends the drawing on mouse-up, so a stroke reruns the page at once, and it is the same painter
the notebook widget runs: free-hand or rectangle, undo, redo and clear, shapes kept as JSON to
redraw them on another page.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import streamlit as st
from PIL import Image

import vfs

HERE = Path(__file__).parent
PAINTER = Path(vfs.__file__).parent / "notebook"  # painter.js / .css: the widget paints with them too
PNG_URL = "data:image/png;base64,"

_canvas = st.components.v2.component(
    "vfs.canvas",
    js=(PAINTER / "painter.js").read_text() + (HERE / "canvas.js").read_text(),
    css=(PAINTER / "painter.css").read_text() + (HERE / "canvas.css").read_text(),
)


class DrawingError(ValueError):
    """What the canvas sent is not a drawing it makes (the page's state was set from elsewhere)."""


@dataclass(frozen=True, eq=False)
class Drawing:
    """What the canvas sent: its shapes (canvas pixels, oldest first) and the paint."""

    shapes: list[dict] = field(repr=False)
    paint: np.ndarray = field(repr=False)  # (size, size) bool: the painted pixels; any paint counts fully


def paint_canvas(
    background: str,
    size: int,
    tool: Literal["brush", "rectangle"],
    brush: int,
    grid: tuple[int, int],
    key: str,
    shapes: list[dict] | None = None,
    undo_to: list[dict] | None = None,
) -> Drawing | None:
    """A `size`-pixel square canvas over `background` (an image URL); None until the first stroke.

    `tool` paints free-hand, `brush` pixels wide, or drags rectangles; the keys paint the feature
    `grid`'s cells (painter.js); `shapes` are drawn when the canvas mounts, and `undo_to` is what its
    Undo goes back to then (later values of both are ignored: the browser holds the drawing from then
    on).
    Raises DrawingError if what it holds is not what the canvas sends.
    """
    data = {
        "background": background,
        "size": size,
        "tool": tool,
        "brush": brush,
        "grid": list(grid),
        "shapes": shapes,
        "undo_to": undo_to,
    }
    # the drawing is the component's state, and Streamlit keeps a state only with its change callback
    sent = _canvas(key=key, data=data, default={"drawing": None}, on_drawing_change=lambda: None).drawing
    if sent is None:
        return None
    if not (isinstance(sent, dict) and isinstance(sent.get("shapes"), list)):
        raise DrawingError("the canvas's state holds no list of shapes")
    return Drawing(sent["shapes"], _paint(sent.get("paint"), size))


def _paint(url: object, size: int) -> np.ndarray:
    """The alpha of the canvas's PNG as a bool array (none painted when there is none)."""
    if url is None:
        return np.zeros((size, size), bool)
    if not (isinstance(url, str) and url.startswith(PNG_URL)):
        raise DrawingError("the canvas's paint is not a PNG data URL")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url[len(PNG_URL) :], validate=True)), formats=["PNG"])
    except (binascii.Error, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DrawingError(f"the canvas's paint is not a readable PNG ({e})") from e
    if image.size != (size, size):  # checked before decoding: a small file can hold a huge image
        raise DrawingError(f"the canvas's paint is {image.size[0]}×{image.size[1]} px, not {size}×{size}")
    try:
        return np.asarray(image.convert("RGBA"))[..., 3] > 0  # decoded here: a truncated file fails here
    except OSError as e:
        raise DrawingError(f"the canvas's paint is not a readable PNG ({e})") from e


def mask_shape(paint: np.ndarray) -> dict:
    """A painted (height, width) bool array as one shape the canvas draws pixel for pixel (and undoes as
    one step): its rows packed 8 pixels a byte, most significant bit first, in base64 — a few kB
    whatever the mask (boxes of runs took ≈ 1 MB of JSON for a dithered one, resent on every rerun)."""
    bits = base64.b64encode(np.packbits(paint.astype(bool), axis=1).tobytes()).decode("ascii")
    return {"kind": "mask", "size": [paint.shape[1], paint.shape[0]], "bits": bits}
