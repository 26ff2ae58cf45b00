"""What a model spec means as data: the preprocessing a model expects, a parsed spec, a kind of spec.

Data, not a network: caches, settings and the CLI hold and check specs without building or loading
a model (the preprocessing's own steps use torch and torchvision's transforms, imported where they
run: torchvision's import, 1.3 s, held every CLI search and app start that built nothing).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from ..images import MAX_DECODED_SIDE, upright_rgb
from ..masks import PaintedOn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
"""torchvision's `InterpolationMode` values a spec may name."""
CROPS = ("center", "squash", "border")
"""How a resized image becomes the square input (timm's `crop_mode`): the shorter side resized and
the centre cropped; both sides resized (the aspect ratio not kept), then the centre cropped; the
longer side resized and the rest padded with the mean colour."""


class ModelUnavailable(RuntimeError):
    """The model exists but its weights cannot be had here (typically: no internet)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input: resize, centre-crop (`crop`: see CROPS), normalize.

    Kept as plain data (not a transform object) so it can be stored with a feature cache and so
    the app can show exactly the crop the model saw (`view`).
    """

    input_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}"
            )
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r}: expected one of {', '.join(CROPS)}")
        sizes = (self.input_size, self.resize_size)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sizes):
            raise TypeError(f"sizes are whole numbers of pixels: {self.input_size!r}, {self.resize_size!r}")
        if min(sizes) < 1 or max(sizes) > MAX_DECODED_SIDE:  # a cache's attributes come from strangers
            raise ValueError(
                f"sizes must be 1..{MAX_DECODED_SIDE} px (images are decoded at most that large): "
                f"{self.input_size}, {self.resize_size}"
            )
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (RGB), got {values}")
            object.__setattr__(self, name, values)  # lists from JSON → hashable tuples

    def describe(self) -> str:
        """The steps in words, e.g. "shorter side resized to 256 px, centre-cropped to 224 px"."""
        side = {"center": "shorter side", "squash": "both sides", "border": "longer side"}[self.crop]
        last = "padded with the mean colour" if self.crop == "border" else "centre-cropped"
        return f"{side} resized to {self.resize_size} px, {last} to {self.input_size} px"

    def with_input_size(self, size: int) -> Preprocess:
        """The same preprocessing at another input size, keeping the resize/crop ratio."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"the input size must be a whole number of pixels ≥ 1; got {size!r}")
        return replace(self, input_size=size, resize_size=round(size * self.resize_size / self.input_size))

    def view(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The RGB crop the model sees, `input_size` pixels square, of an image as a viewer shows it
        (upright; 16-bit greys rescaled, transparency on white: `vfs.images.upright_rgb`)."""
        fill = (round(255 * self.mean[0]), round(255 * self.mean[1]), round(255 * self.mean[2]))
        return self._fit(upright_rgb(image), self.interpolation, fill)

    def view_coverage(self, coverage: np.ndarray) -> np.ndarray:
        """A drawing's coverage in [0, 1], (H, W) as painted on an image, cropped as `view` crops
        that image: (input_size, input_size), padding uncovered. Each view pixel takes the mean paint
        of the part of the image it shows, by area: a resampling filter would spread paint onto
        pixels next to it, and the region's box onto a row of cells it does not touch."""
        cover = np.asarray(coverage, dtype=np.float64)
        axes = _view_axes(self, cover.shape)
        if axes is None:  # too little of the image shown to place it: resized as the view is
            image = PIL.Image.fromarray(cover.astype(np.float32), mode="F")
            return np.clip(np.asarray(self._fit(image, "bilinear", 0.0), dtype=np.float64), 0.0, 1.0)
        rows, cols = (_view_spans(a, b, self.input_size, n) for (a, b), n in zip(axes, cover.shape))
        return np.clip(rows @ (cover @ cols.T), 0.0, 1.0)

    def reframe(self, cover: np.ndarray, onto: Preprocess, size: tuple[int, int]) -> np.ndarray:
        """A coverage painted on this view (any square size) of an image of `size` (H, W), as it lies on
        `onto`'s view of the same image, at the same size: each pixel takes the paint of the point of
        the image it shows (nearest), none where that point is not in this view (the Compare page: one
        drawing, two models that crop the image otherwise). Unchanged where the two views coincide, and
        where one shows too little of the image to place it (a side of a pixel or two)."""
        if (onto.input_size, onto.resize_size, onto.crop) == (self.input_size, self.resize_size, self.crop):
            return cover  # one view
        there, here_axes = _view_axes(onto, size), _view_axes(self, size)
        if there is None or here_axes is None:  # too little of the image shown to place it
            return cover
        side = cover.shape[0]
        centres = (np.arange(side) + 0.5) / side  # of `onto`'s view, as fractions of its side
        picks = []
        for (a, b), (a_here, b_here), length in zip(there, here_axes, size):
            point = a * centres * onto.input_size + b  # on the image
            here = (point - b_here) / (a_here * self.input_size) * side  # on this view, in `cover`'s pixels
            if np.abs(here - centres * side).max() < 1e-3:
                picks.append(np.arange(side))
                continue
            pick = np.floor(here).astype(np.int64)
            picks.append(np.where((0 <= point) & (point < length) & (0 <= pick) & (pick < side), pick, -1))
        rows, cols = picks
        if (rows == np.arange(side)).all() and (cols == np.arange(side)).all():
            return cover
        return _picked(cover, rows, cols)

    def painted_on(self, query_size: Callable[[], tuple[int, int] | None]) -> PaintedOn:
        """Where a mask file for a query of size `query_size()` (H, W; None: not at hand) may have
        been painted, for `vfs.masks.load_mask`: on that image, cropped as this view crops it, or on
        the view."""
        return PaintedOn(query_size, self.input_size, self.view_coverage, self.describe())

    def _fit(self, image: PIL.Image.Image, interpolation: str, fill: Any) -> PIL.Image.Image:
        """Resize and crop (or pad with `fill`) to the input square, as `crop` says."""
        if self.crop == "border":  # timm's own steps, so that its models see what they were tested on
            from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio

            square = (self.resize_size, self.resize_size)
            image = ResizeKeepRatio(square, interpolation=interpolation, longest=1.0)(image)
            padded: PIL.Image.Image = CenterCropOrPad(self.input_size, fill=fill)(image)
            return padded
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        sides = [self.resize_size] * (2 if self.crop == "squash" else 1)
        image = TF.resize(image, sides, interpolation=InterpolationMode(interpolation), antialias=True)
        return TF.center_crop(image, [self.input_size])

    def to_tensor(self, view: PIL.Image.Image) -> torch.Tensor:
        """A view as a normalized (3, S, S) float32 tensor."""
        from torchvision.transforms.v2 import functional as TF

        return self.normalize(TF.pil_to_tensor(view))

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views (…, 3, S, S) → normalized float32, on the views' device (builds do it on the GPU)."""
        from torchvision.transforms.v2 import functional as TF

        tensor = TF.to_dtype(views, torch.float32, scale=True)
        return TF.normalize(tensor, list(self.mean), list(self.std))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        } | ({} if self.crop == "center" else {"crop": self.crop})  # as caches wrote before crops

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """The one way back from `to_dict` (cache attributes, user code); unknown keys are ignored
        so that caches written by older or newer versions still load."""
        known = ("input_size", "resize_size", "interpolation", "mean", "std", "crop")
        return cls(**{key: data[key] for key in known if key in data})


def _view_spans(a: float, b: float, side: int, length: int) -> np.ndarray:
    """(side, length): row v averages the image pixels under view pixel v, [a·v + b, a·(v + 1) + b)
    (`_view_axes`), by overlap; nothing past the image's edges. An edge within 0.01 px of a pixel's
    (past the fit's error; a quarter of a view pixel where one shows less) is taken on it, so that it
    covers none of its neighbour."""
    edges = a * np.arange(side + 1) + b
    whole = np.round(edges)
    edges = np.where(np.abs(edges - whole) < min(0.01, a / 4), whole, edges)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(length)[None, :]
    return np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0.0, None) / (hi - lo)


def _picked(cover: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`cover`'s pixels at rows × cols, none where an index is -1 (a point `cover` does not show)."""
    out = cover[rows.clip(0)][:, cols.clip(0)]
    return np.where((rows >= 0)[:, None] & (cols >= 0)[None, :], out, np.zeros_like(out))


def _ramp_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size of the copy `_view_axes` crops: `size` divided by a whole divisor of both sides, so
    that its sides' ratio — and with it each resize's rounding of the sides — is the image's own (a
    2560×3200 image's copy of 410×512 was resized to 319 px where the image's view is 320: the
    view's place was 0.85 px off); where no divisor brings it to ≤ 512 px (its shorter side ≥ 32),
    the image itself up to 4,096 px, else a copy rounded to ≤ 512 px."""
    need = max(1.0, min(max(size) / 512, min(size) / 32))
    common = math.gcd(*size)
    divisors = [d for d in range(math.ceil(need), common + 1) if common % d == 0][:1]
    if divisors:
        return size[0] // divisors[0], size[1] // divisors[0]
    if max(size) <= 4096:
        return size
    return max(1, round(size[0] / need)), max(1, round(size[1] / need))


@functools.lru_cache(maxsize=64)
def _view_axes(preprocess: Preprocess, size: tuple[int, int]) -> tuple[tuple[float, float], ...] | None:
    """Where the view of an image of `size` (H, W) lies on it: for rows, then columns, (a, b) such that
    view coordinate v (pixels from its edge) shows image coordinate a·v + b; None where the view shows
    too little of it to say (a side of a pixel or two). Found by cropping coordinate ramps as
    `Preprocess.view` crops an image, so every crop mode agrees with it; on a copy of at most 512 px
    (its shorter side at least 32), scaled back (`_ramp_size`)."""
    small = _ramp_size(size)
    axes = []
    for axis, length in enumerate(small):
        line = np.arange(length, dtype=np.float32) + 0.5
        ramp = np.ascontiguousarray(np.broadcast_to(line[:, None] if axis == 0 else line[None, :], small))
        try:
            seen = np.asarray(preprocess._fit(PIL.Image.fromarray(ramp, "F"), "bilinear", np.nan), np.float64)
        except ValueError:  # a side resized to nothing (a border crop of a 1-px-high image): no view
            return None
        shows = np.isfinite(seen) & (seen > 0.25)  # not the padding: NaN (timm's), 0 (torchvision's crop)
        if axis == 1:
            seen, shows = seen.T, shows.T
        best = int(np.argmax(shows.sum(axis=0)))  # the line across the view that shows the most of it
        shown = np.flatnonzero(shows[:, best])
        inner = shown[2:-2] if len(shown) > 8 else shown  # not the edges, where the resize's filter is cut
        if len(inner) < 2 or np.ptp(seen[inner, best]) == 0:
            return None
        a, b = np.polyfit(inner + 0.5, seen[inner, best], 1)
        axes.append((a * size[axis] / length, b * size[axis] / length))
    return tuple(axes)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec string.

    `name` is the model name (embedded, timm, torchvision), the checkpoint path (file) or
    ``module:function`` (python). `options` holds ``pretrained`` ("true"/"false", timm),
    ``weights`` (torchvision: a weights name, "DEFAULT" or "none") and ``arch`` (file).
    """

    kind: str
    name: str
    options: dict[str, str] = field(default_factory=dict, hash=False)
    raw: str = ""


@dataclass(frozen=True)
class ModelKind:
    """One kind of model spec (the text before the first ':') and everything VFS knows about it,
    so that adding a kind is adding one record to `vfs.models.KINDS`.

    `parse` checks the syntax of the text after the prefix (without the ``?options``; it does not
    check that the model exists) and gives back the name and the completed options; `load` builds
    the model on the CPU with its preprocessing.
    """

    prefix: str
    parse: Callable[[str, str, dict[str, str]], tuple[str, dict[str, str]]]  # (spec, body, options)
    load: Callable[[ModelSpec], tuple[nn.Module, Preprocess]]
    usage: tuple[tuple[str, str], ...]  # (syntax, what it gives): the lines `python -m vfs models` prints
    options: tuple[str, ...] = ()  # the ?key=value options it accepts
    runs_user_code: bool = False  # loading imports and runs code the spec names (refused when hosted)
    reads_local_file: bool = False  # the spec's name is a path on this machine (confined when hosted)
