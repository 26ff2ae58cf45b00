"""Mask files read as drawn, whatever format holds the drawing.

One drawing — on a 4×4 grid of 16-px cells, cell (0, 0) painted fully, cell (0, 1) at a quarter
and cell (2, 2) fully — saved the ways painting programs and optimisers save it. Every form must
give the same weights: before, 16-bit greys clipped a quarter to full paint, a palette's
transparency counted the background as painted and float TIFFs rounded a quarter to nothing.
"""

import io

import numpy as np
import pytest
from PIL import Image

from vfs.masks import load_mask

GRID = (4, 4)
EXPECTED = np.zeros(GRID, np.float32)
EXPECTED[0, 0], EXPECTED[0, 1], EXPECTED[2, 2] = 1.0, 0.25, 1.0


def coverage() -> np.ndarray:
    """(64, 64) paint in [0, 1], one value per cell."""
    return np.kron(EXPECTED, np.ones((16, 16))).astype(np.float64)


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def rgba(alpha: np.ndarray) -> Image.Image:
    """Red paint whose opacity is the coverage, on a fully transparent white background."""
    pixels = np.zeros((*alpha.shape, 4), np.uint8)
    pixels[..., 0] = 255
    pixels[..., 1:3] = np.where(alpha[..., None] > 0, 0, 255)
    pixels[..., 3] = alpha
    return Image.fromarray(pixels, "RGBA")


def palette_with_transparency() -> Image.Image:
    """What pngquant-like optimisers write: palette indices whose opacities (0, 64, 255) sit in a
    tRNS chunk, the background fully transparent white; the quarter cell at alpha 64 (0.251)."""
    levels = np.round(coverage() * 255).astype(np.uint8)
    index = np.select([levels == 255, levels > 0], [2, 1], 0).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([255, 255, 255, 255, 0, 0, 255, 0, 0] + [0] * 759)
    image.info["transparency"] = bytes([0, 64, 255])
    return image


def grey_alpha() -> Image.Image:
    alpha = Image.fromarray(np.round(coverage() * 255).astype(np.uint8))
    return Image.merge("LA", (Image.new("L", alpha.size, 0), alpha))


FORMS = {
    "grey8.png": lambda: save(Image.fromarray(np.round(coverage() * 255).astype(np.uint8)), "PNG"),
    "grey16.png": lambda: save(Image.fromarray(np.round(coverage() * 65535).astype(np.uint16)), "PNG"),
    "float.tif": lambda: save(Image.fromarray(coverage().astype(np.float32)), "TIFF"),
    "rgba.png": lambda: save(rgba(np.round(coverage() * 255).astype(np.uint8)), "PNG"),
    "grey_alpha.png": lambda: save(grey_alpha(), "PNG"),
    "palette_trns.png": lambda: save(palette_with_transparency(), "PNG"),
    # a paint program's opaque canvas: white paint on black, alpha 255 everywhere (it says nothing)
    "opaque_rgba.png": lambda: save(
        Image.fromarray(np.round(coverage() * 255).astype(np.uint8)).convert("RGBA"), "PNG"
    ),
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_a_drawing_reads_the_same_in_every_format(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(FORMS[name]())
    mask = load_mask(path, GRID)
    tolerance = 1 / 255 if name == "palette_trns.png" else 1 / 510  # 8-bit levels round a quarter
    np.testing.assert_allclose(mask, EXPECTED, atol=tolerance)


def test_a_mask_is_turned_upright_like_its_image(tmp_path):
    """A drawing saved with an EXIF orientation reads as a viewer shows it: rotated like the query."""
    stored = np.zeros((64, 32), np.uint8)  # portrait as stored: paint in its top-left cell
    stored[:16, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the painted cell lands top-right
    (tmp_path / "m.jpg").write_bytes(save(Image.fromarray(stored), "JPEG", exif=exif, quality=100))
    mask = load_mask(tmp_path / "m.jpg", (2, 4))
    assert mask[0, 3] > 0.95 and mask[:, :3].max() < 0.05 and mask[1].max() < 0.05
