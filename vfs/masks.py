"""Drawn regions → soft masks on a feature grid.

A user paints on the image the model saw; the search works on the layer's h×w grid. Each grid
cell gets the fraction of its area covered by paint (area averaging), so a stroke that touches
part of a cell gives it a fractional weight — the paper's soft mask.

Area averaging is exact (the mask's mean equals the drawing's mean coverage), so any paint at
all gives its cells a weight above zero: a stroke much thinner than a cell is kept, with a small
weight, never rounded away. Only a mask with no weight anywhere is refused ("empty"). Scores are
invariant to the mask's overall scale, so `crop_mask` rescales the weights to a peak of 1: a
faint mask then cannot underflow in the search's float16 products.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, ImageOps

from .images import ImageError, opened_within

if TYPE_CHECKING:
    import torch  # a drawing or mask may be a tensor: taken by duck typing, torch not imported here

Box = tuple[int, int, int, int]


def grid_edges(cells: int, pixels: int) -> np.ndarray:
    """Pixel boundaries of `cells` grid cells over `pixels` pixels (rounded, so cells differ by at most
    1 px): how every picture and every exported box places the grid on the model's view."""
    return np.rint(np.arange(cells + 1) * pixels / cells).astype(int)


def grid_box_to_pixels(box: Box, grid: tuple[int, int], size: tuple[int, int]) -> Box:
    """Pixel box (y0, x0, y1, x1), end-exclusive, covered by the grid-cell box `box` on an image of
    size (H, W)."""
    y0, x0, y1, x1 = box
    rows, cols = grid_edges(grid[0], size[0]), grid_edges(grid[1], size[1])
    return int(rows[y0]), int(cols[x0]), int(rows[y1]), int(cols[x1])


def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix whose row i averages the source pixels under output cell i by overlap."""
    edges = np.arange(dst + 1) * (src / dst)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return overlap / (src / dst)


MASK_SIDE = 2048
"""A mask image's longest side as it is read: a larger one is area-averaged down by a whole factor
first — a grid takes its coverage, not its pixels, and the dense averaging of a 9400² PNG (171 KB)
onto a 320 px canvas took 19 s and 2 GB of a hosted server."""


def _shrunk(a: np.ndarray) -> np.ndarray:
    """A mask image's coverage array (`_image_coverage`) at most `MASK_SIDE` a side: f×f blocks
    averaged (the last row and column of blocks over the pixels they have), as coverage in [0, 1]."""
    f = -(-max(a.shape) // MASK_SIDE)
    if f == 1 or a.ndim != 2:
        return a
    top = np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else 1
    acc = np.float64 if np.issubdtype(a.dtype, np.floating) else np.uint64
    (h, w), (hb, wb) = a.shape, (a.shape[0] // f, a.shape[1] // f)
    sums = np.zeros((-(-h // f), -(-w // f)), np.float64)
    counts = np.outer(*(np.minimum(f, n - np.arange(0, n, f)) for n in (h, w)))
    sums[:hb, :wb] = a[: hb * f, : wb * f].reshape(hb, f, wb, f).sum(axis=(1, 3), dtype=acc)
    if wb * f < w:  # the last column of blocks, narrower
        sums[:hb, -1] = a[: hb * f, wb * f :].reshape(hb, f, w - wb * f).sum(axis=(1, 2), dtype=acc)
    if hb * f < h:  # the last row, shorter
        sums[-1, :wb] = a[hb * f :, : wb * f].reshape(h - hb * f, wb, f).sum(axis=(0, 2), dtype=acc)
        sums[-1, -1] = a[hb * f :, wb * f :].sum(dtype=acc) if wb * f < w else sums[-1, -1]
    return sums / counts / top


def _image_coverage(im: Image.Image) -> np.ndarray:
    """An image's paint as an array at its own depth: its alpha where it has one (an alpha band,
    or a palette's / colour key's transparency, as optimised PNGs store it) and some pixel is not
    opaque, else its grey levels — 16-bit and float greys kept as they are, since PIL's "L" would
    clip them to 8 bits. An alpha opaque everywhere says nothing (paint programs export such
    canvases): the region is then in the grey levels, as without alpha."""
    alpha = None
    if "A" in im.getbands():
        alpha = np.asarray(im.getchannel("A"))
    elif "transparency" in im.info:
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    if alpha is not None and alpha.size and alpha.min() < np.iinfo(alpha.dtype).max:
        return alpha
    if im.mode in ("1", "F") or im.mode.startswith("I;16"):
        return np.asarray(im)
    if im.mode == "I":  # PIL opens some 16-bit greys as 32-bit integers
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    return np.asarray(im.convert("L"))


def _numbers(values: object, what: str) -> np.ndarray:
    """A mask or drawing as a numpy array of real numbers: numpy, a torch tensor (detached: one
    that requires grad has no `.numpy()`) or nested lists; anything else refused, naming it."""
    if isinstance(values, (str, bytes, Path)):
        raise TypeError(
            f"a {what} is an array of weights, not a {type(values).__name__}: "
            "read a mask file with vfs.load_mask(path, grid)"
        )
    detach = getattr(values, "detach", None)  # a torch tensor (torch is not imported here)
    if callable(detach):
        values = detach().cpu().numpy()
    try:
        a = np.asarray(values)
    except (TypeError, ValueError) as e:  # ragged lists
        raise ValueError(f"a {what} must be a 2-D array of numbers ({e})") from e
    if a.dtype.kind not in "biuf":
        raise TypeError(f"a {what} must hold real numbers, not {a.dtype} values")
    return a


_GREY_LEVELS_ABOVE = 2.0
"""A float drawing reaching past this holds grey levels (0..255), not coverage in [0, 1]: refused,
where clipping would turn its soft weights into a hard region. Up to it, overshoot (a resampled
drawing's ringing) is clipped."""
_SIGNED_BELOW = -0.5
"""A drawing reaching below this is a signed map (a saliency, a difference), not coverage: refused,
where clipping would drop its negative half unsaid. Above it, undershoot (a bicubic resampling's
ringing reaches −0.12 on a binary mask) is clipped."""


def _eight_bit(a: np.ndarray) -> bool:
    """Pixels of 8-bit images: uint8, or integers within 0..255 (a copy in a wider type)."""
    if a.dtype == np.uint8:
        return True
    return bool(np.issubdtype(a.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 255)


def _as_coverage(drawn: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """Paint coverage in [0, 1]: an image's alpha or grey levels (scaled by its depth), or a bool /
    float array. 8-bit pixels (H, W, 2 | 3 | 4) are read as the PIL image they make is
    (`np.asarray(Image.open(canvas))` and the image itself gave different masks)."""
    if isinstance(drawn, Image.Image):
        drawn = _shrunk(_image_coverage(drawn))
    a = _numbers(drawn, "drawing")
    if a.ndim == 3 and a.shape[2] in (2, 3, 4) and _eight_bit(a):  # e.g. np.asarray(img).astype(int)
        return _as_coverage(Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)))
    if a.ndim == 3:
        if a.shape[2] not in (2, 4):
            raise ValueError(
                f"a drawing of {a.dtype} pixels needs an alpha channel; got {a.shape[2]} channels "
                "(8-bit colour pixels are read by their grey levels)"
            )
        opaque = np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else 1
        if a[..., -1].min() >= opaque:
            raise ValueError(
                "the drawing's alpha is opaque everywhere: it says nothing of where the region is "
                "(give its coverage as a 2-D array, or 8-bit pixels, read by their grey levels)"
            )
        a = a[..., -1]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"a drawing must be a 2-D array or an image; got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ValueError(f"a drawing holds coverage, ≥ 0; this one goes down to {a.min()}: a signed map?")
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64) / np.iinfo(a.dtype).max
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("the drawing contains NaN or inf")
    if a.max() > _GREY_LEVELS_ABOVE:
        raise ValueError(
            f"a float drawing holds coverage in [0, 1]; this one reaches {a.max():g}: grey levels? "
            "Divide by their maximum (255 for 8 bits), or store them as 8- or 16-bit integers"
        )
    if a.min() < _SIGNED_BELOW:
        raise ValueError(
            f"a drawing holds coverage in [0, 1]; this one goes down to {a.min():g}: a signed map? "
            "Take the part to search (np.clip(map, 0, None) / map.max(), say)"
        )
    return np.clip(a, 0.0, 1.0)


def grid_mask(drawn: np.ndarray | torch.Tensor | Image.Image, grid: tuple[int, int] | int) -> np.ndarray:
    """Area-average a drawing of any size onto the (h, w) feature grid (an int: a square one) →
    float32 weights in [0, 1]: `search_regions`'s mask. A drawing is coverage — bool, float in
    [0, 1], or integer grey levels scaled by their type's maximum — or an image (its alpha, else
    its grey levels), as a numpy array, a torch tensor or a PIL image, drawn on the model's view.
    A drawing of another shape than the grid's is stretched onto it, with a warning: one painted on
    a query photo belongs where the model's crop puts it (`preprocess.view_coverage` first)."""
    h, w = (grid, grid) if isinstance(grid, (int, np.integer)) else grid
    if h < 1 or w < 1:
        raise ValueError(f"a grid has at least one cell each way, not {h}×{w}")
    cover = _as_coverage(drawn)
    rows, cols = cover.shape
    if abs(rows * w - cols * h) > max(rows * w, cols * h) * 0.02:  # beyond a pixel or two of rounding
        warnings.warn(
            f"a {cols}×{rows} drawing is stretched onto the {w}×{h} grid (its sides' ratio another): if "
            "it was painted on the query photo, place it as the model crops the photo first — "
            "cache.spec.preprocess.view_coverage(drawing), or vfs.load_mask(file, grid, "
            "cache.spec.preprocess.painted_on(lambda: photo_size)) for a file",
            stacklevel=2,
        )
    mask = _area_weights(cover.shape[0], h) @ cover @ _area_weights(cover.shape[1], w).T
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class CroppedMask:
    """A mask cut to its bounding box: the window that slides over each dataset image."""

    weights: np.ndarray  # (mh, mw) float32, the bounding box of the nonzero cells
    origin: tuple[int, int]  # (y0, x0) of the box in the query's grid

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.weights.shape
        return h, w

    def query_box(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), end-exclusive, of the box in the query grid."""
        (y0, x0), (mh, mw) = self.origin, self.shape
        return y0, x0, y0 + mh, x0 + mw


def mask_values(mask: object) -> np.ndarray:
    """A mask — numpy, a torch tensor or nested lists — as (h, w) float64 weights, or refused
    with a reason (a file name, a box, a 1-D array, complex numbers …)."""
    m = np.asarray(_numbers(mask, "mask"), dtype=np.float64)  # no copy of one checked before
    if m.ndim != 2:
        box = " (a box? set its cells of an (h, w) array of zeros to 1)" if m.shape == (4,) else ""
        raise ValueError(f"a mask must be 2-D (h, w): one weight per grid cell; got shape {m.shape}{box}")
    return m


def grid_mask_values(mask: object, grid: tuple[int, int]) -> np.ndarray:
    """`mask_values` of a mask that must be one weight per cell of `grid`, refused otherwise with
    the way to make one of a drawing."""
    m = mask_values(mask)
    if m.shape != tuple(grid):
        finer = all(a >= g for a, g in zip(m.shape, grid))
        hint = (
            f": vfs.grid_mask(drawing, {tuple(grid)}) averages a drawing onto it"
            if finer
            else f": a mask holds one weight per feature cell, a {grid[0]}×{grid[1]} array (or a finer "
            "drawing that vfs.grid_mask averages onto it)"
        )
        raise ValueError(f"the mask's shape {m.shape} does not match the feature grid {tuple(grid)}{hint}")
    return m


def crop_mask(mask: np.ndarray) -> CroppedMask:
    """Crop to the nonzero bounding box, weights rescaled to a peak of 1 (scores do not change);
    refuse masks that select nothing, with a reason."""
    m = mask_values(mask)
    if not np.isfinite(m).all():
        raise ValueError("the mask contains NaN or inf: its weights are numbers from 0 (outside) to 1")
    if (m < 0).any():
        raise ValueError("mask weights must be ≥ 0")
    rows, cols = np.nonzero(m > 0)
    if rows.size == 0:
        raise ValueError("the region is empty: nothing is painted (draw over the image)")
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = m[y0:y1, x0:x1]
    return CroppedMask(np.ascontiguousarray(box / box.max(), dtype=np.float32), (int(y0), int(x0)))


@dataclass(frozen=True)
class PaintedOn:
    """The query image a mask file may have been painted on (for `load_mask`): `query_size()`, its
    size (H, W) as a viewer shows it (None: not at hand; asked only where a mask's size leaves it
    open), the side of the model's square view, `to_view`, which crops a drawing's coverage as the
    view crops the image, and that crop in words."""

    query_size: Callable[[], tuple[int, int] | None]
    view_side: int
    to_view: Callable[[np.ndarray], np.ndarray]
    crop: str

    def place(self, cover: np.ndarray, name: str) -> np.ndarray:
        """A drawing's coverage (H, W) on the model's view. The view's size: drawn on the view, as
        the app and the notebook draw (the grid spans it). The query image's size or shape: drawn
        on the query image, cropped as the model saw it. Another square: on the view. Any other
        shape is refused: stretched onto the grid, it would put the region elsewhere."""
        h, w = cover.shape
        if h == w == self.view_side:
            return cover
        size, query = self.query_size(), ""
        on_query = False
        if size is not None:
            height, width = size
            same_shape = abs(h * width - w * height) <= 0.01 * max(h * width, w * height)
            on_query = (h, w) == size or (h != w and same_shape)
            query = f"the query image ({width}×{height} px, or its shape) or "
        if not on_query:
            if h == w:
                return cover
            # the query image's size unknown: its file moved or deleted, say (it named the view only: review)
            unknown = (
                "" if size is not None else " — or on the query image, whose file is not at hand to place it"
            )
            raise ValueError(
                f"{name} is {w}×{h} px: paint the region on {query}the model's square view "
                f"({self.view_side}×{self.view_side} px){unknown}"
            )
        view = self.to_view(cover)
        if cover.max() > 0 and view.max() <= 0:
            raise ValueError(
                f"{name}: the painted region lies outside the part of the query the model sees ({self.crop})"
            )
        return view


_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
"""numpy's readers of a .npy file's header by its format version: (shape, Fortran order, dtype)."""

PAINTED_ON_VIEW = ("vfs:painted_on", "view")
"""A PNG text entry saying its mask was painted on the model's view (the app's region download):
`load_mask` then takes it so whatever its size."""


def load_mask(path: str | Path, grid: tuple[int, int], painted_on: PaintedOn | None = None) -> np.ndarray:
    """A mask file: `.npy` of exactly the grid's shape (used as is), or an image mapped by area
    (`mask_image_coverage`)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:  # its header first: it may declare any shape (a 200-byte file, 100000² float64)
            with open(path, "rb") as file:
                version = npy_format.read_magic(file)
                if version not in _NPY_HEADERS:
                    raise ValueError(f".npy format version {version[0]}.{version[1]}: expected 1.0 or 2.0")
                shape, _, dtype = _NPY_HEADERS[version](file)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path.name}: cannot read the mask ({e})") from e
        if dtype.kind not in "biuf":
            raise ValueError(f"{path.name}: a .npy mask must hold numbers, not {dtype}")
        if shape != tuple(grid):
            raise ValueError(
                f"{path.name}: a .npy mask must have the grid's shape {tuple(grid)}; got {shape}"
            )
        try:
            m = np.load(path, allow_pickle=False)  # never unpickled: a .npy can carry code
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path.name}: cannot read the mask ({e})") from e
        return np.asarray(m, dtype=np.float32)
    return grid_mask(mask_image_coverage(path, path.name, painted_on), grid)


def mask_image_coverage(
    file: str | Path | BinaryIO, name: str, painted_on: PaintedOn | None = None
) -> np.ndarray:
    """A mask image's paint coverage in [0, 1] (its alpha, or grey levels), turned upright by its
    EXIF orientation as query images are; placed on the model's view by `painted_on` where given
    (else taken as spanning the view), unless it says it was painted on the view (`PAINTED_ON_VIEW`)."""
    try:
        with opened_within(file) as im:  # from the header: a bomb is refused before decoding
            im.load()
            on_view = im.info.get(PAINTED_ON_VIEW[0]) == PAINTED_ON_VIEW[1]
            cover = _as_coverage(ImageOps.exif_transpose(im))
    except ImageError as e:
        raise ValueError(f"{name}: {e.reason}") from e
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{name}: cannot read the mask image ({type(e).__name__}: {e})") from e
    if painted_on is not None and not on_view:
        cover = painted_on.place(cover, name)
    return cover
