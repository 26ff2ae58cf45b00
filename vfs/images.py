"""Images: each one decoded safely, as a viewer shows it.

Images come from users and the internet, so :func:`load_image` treats every file as hostile: it
refuses decompression bombs before decoding, turns every decoder failure into one
:class:`ImageError` naming the image and the cause, and normalises the many PIL modes (16-bit,
palette, CMYK, alpha, EXIF rotation) to plain RGB. :func:`opened_within` is the same size check for
images read otherwise (a mask's coverage).
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_READABLE = f"VFS reads {', '.join(sorted(IMAGE_EXTENSIONS))} images"


def _pixel_limit() -> int:
    """$VFS_MAX_IMAGE_PIXELS, said in words where it is no whole number ≥ 1 (int()'s bare error
    broke every import of the decoder)."""
    text = os.environ.get("VFS_MAX_IMAGE_PIXELS", "89478485")
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(
            f"VFS_MAX_IMAGE_PIXELS={text!r}: expected a whole number of pixels ≥ 1 (default 89478485)"
        )
    return limit


MAX_IMAGE_PIXELS: int = _pixel_limit()
"""Decompression-bomb guard (PIL's default); larger images are refused before decoding."""

MAX_DECODED_SIDE = 4096
"""Legal but huge images are shrunk to this long side: models see at most ~1024 px,
so keeping more only costs memory (a 20k x 20k RGB raster is 1.2 GB)."""
MAX_ASPECT = 500
"""Sides' ratio beyond which an image is refused: resized for the model's short side, a 2×30000
strip became a 256×3.8-million raster (2 GB, 4 s) to crop a square from; at 500:1, 100 MB."""


class ImageError(ValueError):
    """One image could not be used.

    `reason` is the short cause, which a build report lists beside the image's path; the message
    names the image too when the caller knows it (see :func:`load_image`).
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


def load_image(
    source: str | Path | bytes | BinaryIO, max_pixels: int | None = None, name: str | None = None
) -> Image.Image:
    """Decode one image to RGB, or raise :class:`ImageError` saying which image and why.

    ``max_pixels`` defaults to :data:`MAX_IMAGE_PIXELS`; the check reads only the header,
    so a bomb never gets its raster allocated.  ``name`` is what the message calls the image
    (default: the path; give an upload's file name for bytes).  Files we open are always
    closed; a caller's stream is read but left open.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (str, Path)) and name is None:
        name = str(source)
    where = f"{name}: " if name else ""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as fp:
                return _decode(fp, limit)
        return _decode(io.BytesIO(source if isinstance(source, bytes) else source.read()), limit)
    except OSError as e:
        if e.errno not in _FILE_FAULTS:
            raise  # not the file's: a build stops (it is resumed), where it skipped the image for good
        reason = f"cannot read file ({e.strerror or e})"
        raise ImageError(reason, f"{where}{reason}") from e
    except ImageError as e:
        format_unknown = e.reason.startswith(("not an image", "corrupt or unsupported"))
        readable = f"; {_READABLE}" if format_unknown else ""  # else its format is not the problem
        raise ImageError(e.reason, f"{where}not a readable image — {e.reason}{readable}") from e


_FILE_FAULTS = {
    None,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.ELOOP,
    errno.ENAMETOOLONG,
}
"""The errors of reading a file that are the file's own (gone, a folder, not readable to this user, a
link that leads nowhere): such an image is skipped and reported. Others are the machine's — memory
run out, too many files open, a disk's or a network file system's failure — and stop a build,
whose rerun reads the image again: skipped, a good image was lost from a cache marked complete."""
_TOO_LARGE = "too large to decode safely"


@contextmanager
def opened_within(file: str | Path | BinaryIO, limit: int | None = None) -> Iterator[Image.Image]:
    """An image opened from its header and checked before anything is decoded — at most `limit`
    pixels (default `MAX_IMAGE_PIXELS`), sides within `MAX_ASPECT`:1 — else an `ImageError`;
    closed after. A bomb never gets its raster allocated."""
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    with warnings.catch_warnings():  # PIL's bomb warning: the check below refuses it in words
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(file)
    with im:
        width, height = im.size
        if width * height > limit:
            pixels = width * height
            raise ImageError(
                f"{_TOO_LARGE}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels"
            )
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise ImageError(
                f"a strip of {width}x{height} pixels: beyond {MAX_ASPECT}:1, its resizing for the "
                "model would take more memory than a photo's many times over"
            )
        yield im


def _decode(fp: BinaryIO, limit: int) -> Image.Image:
    """Decode a seekable binary file; PIL plugins raise many exception types, all mapped here."""
    if not fp.read(1):
        raise ImageError("empty file")
    fp.seek(0)
    try:
        with opened_within(fp, limit) as im:
            if max(im.size) > MAX_DECODED_SIDE:
                # JPEG only: decode at 1/2..1/8 scale directly, never holding the full raster.
                im.draft(None, (MAX_DECODED_SIDE, MAX_DECODED_SIDE))
            im.load()
            rgb = upright_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not an image (cannot identify format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own guard fires inside Image.open beyond twice its limit, before our check.
        raise ImageError(
            f"{_TOO_LARGE}: its size exceeds the limit of PIL's decompression-bomb guard ({e})"
        ) from e
    except Exception as e:  # decoders raise OSError, SyntaxError, struct.error, ...
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno is not None):
            raise  # the machine's (its memory, a read that failed), not the image's: see load_image
        if "truncated" in str(e).lower():
            raise ImageError("truncated image") from e
        raise ImageError(f"corrupt or unsupported image ({type(e).__name__}: {e})") from e
    rgb.thumbnail((MAX_DECODED_SIDE, MAX_DECODED_SIDE))
    return rgb


def upright_size(path: str | Path | BinaryIO) -> tuple[int, int]:
    """(H, W) of an image file as a viewer shows it (its EXIF orientation applied), from its header:
    the size of a mask painted on it, whatever `load_image` shrinks the image to."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # a quarter turn: the sides swap
    return (width, height) if turned else (height, width)


def upright_rgb(im: Image.Image) -> Image.Image:
    """An image as a viewer shows it: turned by its EXIF orientation, then `to_rgb`. Images from
    files (`load_image`) and images a user hands over (a query as a PIL image) both pass here, so
    the model sees the same pixels either way."""
    return to_rgb(ImageOps.exif_transpose(im))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    High-bit-depth greys are rescaled (PIL's own convert clips them to 255); anything
    transparent is composited on white, since black would invent dark backgrounds.
    """
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = Image.fromarray(_grey_to_uint8(np.asarray(im)))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im.convert("RGB")


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map integer images as 16-bit (the usual source: 16-bit PNG/TIFF) and floats by their range."""
    if np.issubdtype(values.dtype, np.integer):
        scaled = np.clip(values, 0, 65535) / 257.0
    else:
        finite = values[np.isfinite(values)]  # NaN and ±inf: the range's ends
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        clipped = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
        scaled = (clipped - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return np.round(scaled).astype(np.uint8)
