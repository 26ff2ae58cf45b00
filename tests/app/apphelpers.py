"""Helpers for the app's tests: drawings as the canvas sends them, waiting for background work."""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
SMALL = 40  # the test caches hold the first 40 demo images: 13 photos (domain "samples"), 27 faces ("lfw")


def start_app() -> AppTest:
    """The app at its Home page, in a fresh session, with the environment the test set."""
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


def png_url(paint: np.ndarray) -> str:
    """A canvas drawing as the component sends it: a PNG data URL whose alpha is the paint."""
    rgba = np.zeros((*paint.shape, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = np.where(paint, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def box_paint(
    y0: float = 0.3, x0: float = 0.3, y1: float = 0.6, x1: float = 0.6, size: int = 320
) -> np.ndarray:
    paint = np.zeros((size, size), bool)
    paint[int(y0 * size) : int(y1 * size), int(x0 * size) : int(x1 * size)] = True
    return paint


BOX_SHAPE = {"kind": "rect", "box": [96, 96, 192, 192]}  # box_paint()'s default as ui/canvas.js keeps it


def send_drawing(at: AppTest, drawing: dict) -> AppTest:
    """Set what the canvas on screen sends (through its session state, as ui/canvas.js does) and rerun."""
    canvas = at.get("bidi_component")[0].proto.id  # "$$ID-<hash>-<user key>"
    at.session_state[canvas.split("-", 2)[2]] = {"drawing": drawing}
    return at.run()


def draw(at: AppTest, paint: np.ndarray | None = None) -> AppTest:
    """A stroke on the canvas: `paint` (box_paint() if None), with one shape (Python reads only their count)."""
    return send_drawing(
        at, {"shapes": [BOX_SHAPE], "paint": png_url(box_paint() if paint is None else paint)}
    )


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def texts(elements) -> list[str]:
    """The elements' markdown as a reader sees it: the escapes of punctuation (`ui.base.as_written`) taken."""
    return [re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", e.value) for e in elements]


def no_exceptions(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at
