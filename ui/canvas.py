"""The dashboard's drawing canvas: the notebook widget's painter as a Streamlit component.

It sends the drawing on mouse-up, so a stroke reruns the page at once (streamlit-drawable-canvas,
used before, waited 200 ms more), and it is the same painter the notebook widget runs: free-hand
or rectangle, undo, redo and clear, shapes kept as JSON to redraw them on another page.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

import vfs

HERE = Path(__file__).parent
PAINTER_JS = Path(vfs.__file__).parent / "notebook" / "painter.js"  # a file: vfs.notebook imports anywidget

_canvas = st.components.v2.component(
    "vfs.canvas",
    js=PAINTER_JS.read_text() + (HERE / "canvas.js").read_text(),
    css=(HERE / "canvas.css").read_text(),
)


@dataclass(frozen=True)
class Drawing:
    """What the canvas sent: its shapes (canvas pixels, oldest first) and the paint."""

    shapes: list[dict] = field(repr=False)
    paint: np.ndarray = field(repr=False)  # (size, size) bool: the painted pixels


def paint_canvas(
    background: str, size: int, tool: str, brush: int, key: str, shapes: list[dict] | None = None
) -> Drawing | None:
    """A `size`-pixel square canvas over `background` (an image URL); None until the first stroke.

    `tool` is "brush" (free-hand, `brush` pixels wide) or "rectangle"; `shapes` are drawn when the
    canvas mounts (later values are ignored: the browser holds the drawing from then on).
    """
    data = {"background": background, "size": size, "tool": tool, "brush": brush, "shapes": shapes}
    sent = _canvas(
        key=key, data=data, default={"drawing": None}, on_drawing_change=lambda: None, width=size
    ).drawing
    if sent is None:
        return None
    return Drawing(sent["shapes"], _paint(sent["paint"], size))


def _paint(url: str | None, size: int) -> np.ndarray:
    """The alpha of a PNG data URL as a bool array (none painted when there is no URL)."""
    if url is None:
        return np.zeros((size, size), bool)
    png = base64.b64decode(url.partition(",")[2])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[..., 3] > 0
