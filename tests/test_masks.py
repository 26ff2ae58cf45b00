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

from vfs.masks import grid_mask, load_mask

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


# --------------------------------------------------------------------- a mask painted on the query
PHOTO = (480, 640)  # (H, W) of a landscape query photo


def painted_on(size=PHOTO):
    from vfs.masks import PaintedOn
    from vfs.models.specs import Preprocess

    pre = Preprocess(224, 256)  # shorter side to 256, centre 224: x 58.7..282.7 of the 341-px-wide resize
    return PaintedOn(lambda: size, 224, pre.view_coverage, pre.describe())


def box_png(path, size, box):
    """A white box (y0, x0, y1, x1) on black, opaque, as a paint program saves a canvas of `size`."""
    pixels = np.zeros(size, np.uint8)
    y0, x0, y1, x1 = box
    pixels[y0:y1, x0:x1] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_a_mask_painted_on_the_query_photo_is_cropped_as_the_model_saw_it(tmp_path):
    # the photo's centre (x 240..400, y 180..300) lands in the view at x 69..155, y 80..144: cells 2..4
    mask = load_mask(box_png(tmp_path / "m.png", PHOTO, (180, 240, 300, 400)), (7, 7), painted_on())
    rows, cols = np.nonzero(mask)
    assert set(rows) == {2, 3, 4} and set(cols) == {2, 3, 4}, mask.round(2)
    # near the edge the crop shows: x 100..200 of 640 is x 0..48 of the view (stretched: x 35..70)
    edge = load_mask(box_png(tmp_path / "e.png", PHOTO, (0, 100, 480, 200)), (7, 7), painted_on())
    assert np.nonzero(edge.max(0) > 0.05)[0].tolist() == [0, 1], edge.round(2)
    # half the size, same shape: the same region
    half = load_mask(box_png(tmp_path / "h.png", (240, 320), (90, 120, 150, 200)), (7, 7), painted_on())
    np.testing.assert_allclose(half, mask, atol=0.02)


def test_a_region_painted_on_the_photo_weighs_only_the_cells_it_covers(tmp_path):
    """A box whose top and bottom edges land on cell edges of the view (rows 75 and 165 of a 240-px
    photo: 256/240 · y − 16 = 64 and 160, cells 2..4) gave rows 1 and 5 weights of 0.001: the
    bilinear resize spread the paint a pixel beyond its edge, and the region's box (placements,
    outlines) grew by two rows of cells (docs review). Each view pixel now takes the paint of the
    part of the photo it shows, by area."""
    from vfs.masks import crop_mask

    mask = load_mask(
        box_png(tmp_path / "m.png", (240, 320), (75, 115, 165, 235)), (7, 7), painted_on((240, 320))
    )
    assert not mask[[0, 1, 5, 6]].any() and not mask[:, :2].any(), mask.round(3)
    assert crop_mask(mask).query_box() == (2, 2, 5, 7)
    # by area: x 115..235 of the photo is 64.2..192.2 of the view (the 341-px-wide resize, cropped at
    # 58.5): column 2 covered but for 0.2 of its 32 px, column 6 by 0.2 px of them
    np.testing.assert_allclose(mask[2:5, 2:7], [[0.9828, 1, 1, 1, 0.0133]] * 3, atol=2e-3)
    # a 5:4 photo whose view was placed from a copy of another ratio (410×512: resized to 319 px where
    # the photo's view is 320): 0.85 px off, a column of cells too many (code review). Rows 800..1760,
    # columns 1120..2400 of 2560×3200 are the view's 64..160 and 64..192: cells 2..4 and 2..5 exactly
    big = load_mask(
        box_png(tmp_path / "b.png", (2560, 3200), (800, 1120, 1760, 2400)), (7, 7), painted_on((2560, 3200))
    )
    assert crop_mask(big).query_box() == (2, 2, 5, 6) and big[2:5, 2:6].min() == 1, big.round(3)
    # a photo of 3×5 px: each view pixel shows a sliver of one (rounding edges had made some empty: NaN)
    tiny = load_mask(box_png(tmp_path / "t.png", (3, 5), (0, 0, 3, 5)), (7, 7), painted_on((3, 5)))
    assert np.isfinite(tiny).all() and tiny.min() > 0.5, tiny.round(2)


def test_a_region_outside_the_models_view_or_a_mask_of_another_shape_is_refused(tmp_path):
    strip = box_png(tmp_path / "strip.png", PHOTO, (0, 560, 480, 640))  # right of the centre crop
    with pytest.raises(ValueError, match="strip.png: the painted region lies outside the part of the query"):
        load_mask(strip, (7, 7), painted_on())
    other = box_png(tmp_path / "other.png", (200, 300), (50, 50, 150, 150))
    with pytest.raises(
        ValueError,
        match=r"other.png is 300×200 px: paint the region on the query image "
        r"\(640×480 px, or its shape\) or the model's square view \(224×224 px\)",
    ):
        load_mask(other, (7, 7), painted_on())
    with pytest.raises(  # the query image not at hand: said, where the view alone was named (CLI review)
        ValueError,
        match=r"other.png is 300×200 px: paint the region on the model's square view \(224×224 px\) — or on "
        r"the query image, whose file is not at hand to place it$",
    ):
        load_mask(other, (7, 7), painted_on(size=None))


def test_a_square_mask_spans_the_view_unless_it_has_the_query_photos_own_size(tmp_path):
    square = box_png(tmp_path / "s.png", (224, 224), (0, 0, 32, 32))
    np.testing.assert_array_equal(load_mask(square, (7, 7), painted_on()), load_mask(square, (7, 7)))
    # a square photo (300×300) painted on as it is, a strip at its left edge: the crop leaves a sliver
    on_photo = load_mask(
        box_png(tmp_path / "p.png", (300, 300), (0, 0, 300, 20)), (7, 7), painted_on((300, 300))
    )
    assert 0 < on_photo[:, 0].max() < 0.2 and on_photo[:, 1:].max() == 0, on_photo.round(2)  # stretched: 0.47


def test_the_apps_region_download_is_the_view_whatever_the_query_photos_size(tmp_path):
    """The Search page's region PNG is the canvas (320 px) over the view: for a query photo that
    is 320×320 itself, load_mask took it for one painted on the photo and cropped it again
    (review). It says it was painted on the view, and reads back to the app's own grid mask."""
    from vfs.masks import grid_mask
    from vfs.render import region_mask_png

    paint = np.zeros((320, 320), bool)
    paint[:, :40] = True  # a band along the view's left edge
    (tmp_path / "region.png").write_bytes(region_mask_png(paint))
    for photo in ((320, 320), (480, 640)):
        got = load_mask(tmp_path / "region.png", (7, 7), painted_on(photo))
        np.testing.assert_array_equal(got, grid_mask(paint, (7, 7)))
    plain = box_png(tmp_path / "plain.png", (320, 320), (0, 0, 320, 40))  # the same, saved elsewhere
    assert not np.array_equal(load_mask(plain, (7, 7), painted_on((320, 320))), grid_mask(paint, (7, 7)))


def test_a_drawing_of_another_shape_than_the_grid_is_stretched_with_a_warning():
    """grid_mask stretched a photo-shaped drawing onto a square grid without a word (UX review): the
    region then lay elsewhere than painted. It still does (its arithmetic holds for any shapes) but
    says so and how to place a drawing on the photo; a square one, or one a pixel off, says nothing."""
    import warnings

    from vfs.masks import grid_mask

    photo = np.zeros((480, 640))
    photo[200:280, 300:340] = 1
    with pytest.warns(UserWarning, match=r"a 640×480 drawing is stretched onto the 7×7 grid.*view_coverage"):
        grid_mask(photo, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid_mask(np.ones((320, 320)), 7)
        grid_mask(np.ones((224, 225)), (7, 7))  # a pixel of rounding


def test_a_huge_mask_image_is_averaged_down_before_the_grid_takes_it(monkeypatch):
    """A 9400² 16-bit PNG of 171 KB cost a hosted server 26 s of CPU and 2 GB to average onto its
    320 px canvas (hosted review): a mask image wider than MASK_SIDE is block-averaged first, by a
    whole factor, the last blocks over the pixels they have — the same coverage."""
    import vfs.masks

    monkeypatch.setattr(vfs.masks, "MASK_SIDE", 64)
    rng = np.random.default_rng(0)
    for shape in [(301, 257), (256, 256), (300, 1), (1, 500), (129, 640)]:
        grey = (rng.random(shape) * 65535).astype(np.uint16)
        f = -(-max(shape) // 64)
        blocks = [
            [grey[i : i + f, j : j + f].astype(np.float64).mean() / 65535 for j in range(0, shape[1], f)]
            for i in range(0, shape[0], f)
        ]
        np.testing.assert_allclose(vfs.masks._shrunk(grey), np.array(blocks), atol=1e-12)
    painted = np.zeros((640, 480), np.uint8)  # 10-pixel blocks; a 4×4 grid's cells of 16×12 of them
    painted[85:333, 120:247] = 255
    np.testing.assert_allclose(
        grid_mask(Image.fromarray(painted), (4, 4)), grid_mask(painted > 0, (4, 4)), atol=1e-6
    )
