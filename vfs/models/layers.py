"""One layer of a model as a feature grid: which layers give spatial maps, and running a model
only up to the chosen one.

Every layer whose output is a spatial map (NCHW or NHWC maps, ViT tokens) becomes an (h, w, C)
grid, and extraction stops at that layer instead of running the whole network. The model is loaded
from a spec (`load_extractor`) or is a module the user already holds (`extractor_from_module`, e.g.
an edited copy); both go through one builder.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext, redirect_stderr
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from ..devices import resolve_device
from ..errors import error_line, out_of_memory
from ..fp16 import fp16_holds
from ..images import load_image
from .kinds import load_model
from .specs import Preprocess

_EXAMPLES = (8, 16)  # an error about a bad layer shows this many valid names, at least and at most
MODULE_PREFIX = "module:"  # the spec an extractor made from a module reports: no loadable model behind it


def is_module_spec(spec: str) -> bool:
    """Whether a spec names a module the user held (`extractor_from_module`), not a loadable model."""
    return spec.startswith(MODULE_PREFIX)


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose output is a spatial grid, with the grid's size at a given input size."""

    name: str
    height: int
    width: int
    channels: int
    same_as: tuple[str, ...] = ()  # later modules giving the very same output (`blocks` is `blocks.11`)
    calls: int = 1  # times the module runs in one forward pass: its first output is the layer's

    @property
    def note(self) -> str:
        """What a listing adds to the grid: the modules it equals — the first, often the stage a user
        knows (EfficientNet's `blocks` is `blocks.6`), and the innermost — and that it runs more than
        once."""
        same = " ".join(f"= {name}" for name in dict.fromkeys(self.same_as[:1] + self.same_as[-1:]))
        calls = f"its first of {self.calls} calls" if self.calls > 1 else ""
        shown = "; ".join(part for part in (same, calls) if part)
        return f"({shown})" if shown else ""


class LayerError(ValueError):
    """A layer that cannot give a feature grid (absent, not spatial, never run).

    Keeps the facts (`spec`, `layer`, `problem`, `examples` of valid layers) so that each interface
    can name its own way to list the layers (`message`); `str()` names the Python one.
    """

    def __init__(
        self, spec: str, layer: str, problem: str, examples: Sequence[str], image_size: int | None = None
    ) -> None:
        self.spec = spec
        self.layer = layer
        self.problem = problem
        self.examples = tuple(examples)
        self.image_size = image_size  # where not the model's own: the size the layers were listed at
        size = "" if image_size is None else f", {image_size}"
        call = "module, image_size" if is_module_spec(spec) else f"{spec!r}{size}"
        super().__init__(self.message(f"vfs.models.list_layers({call})"))

    def message(self, how_to_list: str) -> str:
        """The error, ending with `how_to_list`: the command, call or page that lists the layers."""
        if not self.examples:  # e.g. an input so small that no layer keeps 2 cells
            size = "" if self.image_size is None else f" at input size {self.image_size}"
            return f"{self.spec}: {self.problem}; no layer gives a spatial map{size}: choose a larger input"
        return (
            f"{self.spec}: {self.problem}; spatial layers include {', '.join(self.examples)} "
            f"(list them all with {how_to_list})"
        )


@dataclass(frozen=True)
class _Layout:
    """How a layer's output tensor maps onto an (h, w, C) grid."""

    kind: str  # "nchw" | "nhwc" | "tokens" | "sequence first" (tokens as (T, B, C))
    height: int
    width: int
    channels: int
    prefix_tokens: int = 0  # tokens (class, register) before the patch tokens
    order: tuple[int, ...] | None = None  # each grid cell's token, row by row, where not in order

    @cached_property
    def _order_index(self) -> torch.Tensor:
        return torch.tensor(self.order)

    def to_grid(self, output: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return output.permute(0, 2, 3, 1)
        if self.kind == "sequence first":
            output = output.transpose(0, 1)
        if self.kind in ("tokens", "sequence first"):
            patches = output[:, self.prefix_tokens :]
            if self.order is not None:
                patches = patches[:, self._order_index.to(patches.device)]
            return patches.reshape(output.shape[0], self.height, self.width, self.channels)
        return output


def _plausible_side(side: int, input_size: int) -> bool:
    """Whether a map side is the input side divided by some integer stride, give or take padding
    (±1) or the cells valid convolutions lose (up to a tenth: Inception's 35 of 299 / 8 = 37.4).
    A weak filter (most small sides pass): attention weights and tokens on the channel axis are
    told by `_is_attention` and `_token_layout`."""
    stride = max(1, round(input_size / side))
    return abs(input_size / stride - side) <= max(1.0, 0.1 * side)


def _is_attention(output: torch.Tensor) -> bool:
    """Attention weights, (…, queries, keys) with each row a distribution over as many keys as
    queries (a Swin window's 64 × 64 at 24 heads): shaped like a map, but none."""
    if output.ndim < 3 or output.shape[-1] != output.shape[-2] or output.shape[-1] < 2:
        return False
    rows = output.detach().float()
    return bool(rows.min() >= 0 and torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-3))


def _layout(output: Any, input_size: int, model: nn.Module) -> _Layout | None:
    """The grid layout of a module output for one square image, or None if it is not a map
    of at least 2 cells (a 1×1 map cannot locate anything)."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    if _is_attention(output):
        return None
    if output.shape[0] != 1:  # e.g. Swin's windows folded into the batch
        if output.ndim == 3 and output.shape[1] == 1:  # tokens sequence first: nn.Transformer's, CLIP's
            tokens = _token_layout(output.shape[0], output.shape[2], input_size, model)
            return None if tokens is None else replace(tokens, kind="sequence first")
        return None
    layout = None
    if output.ndim == 4:
        _, a, b, c = output.shape
        # Input is square, so the two spatial sides are equal; that tells NCHW from NHWC
        # (timm's Swin/ConvNeXt internals are NHWC) without trusting per-model flags.
        if b == c and _plausible_side(b, input_size):
            layout = _Layout("nchw", b, c, a)
        elif a == b and _plausible_side(a, input_size):
            layout = _Layout("nhwc", a, b, c)
    elif output.ndim == 3:
        layout = _token_layout(output.shape[1], output.shape[2], input_size, model)
    return layout if layout is not None and layout.height * layout.width > 1 else None


def _token_owner(modules: dict[str, nn.Module], layer: str) -> nn.Module:
    """The innermost module around `layer` that declares its tokens (timm's ViTs: num_prefix_tokens),
    else the model: a ViT inside a wrapper keeps its class, distillation and register tokens."""
    parts = layer.split(".")
    for depth in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:depth]))
        if module is not None and hasattr(module, "num_prefix_tokens"):
            return module
    return modules[""]


def _token_layout(tokens: int, channels: int, input_size: int, model: nn.Module) -> _Layout | None:
    """(1, T, C) tokens as a grid after dropping prefix tokens (timm: num_prefix_tokens;
    otherwise try none, then one class token). Where the model has a patch embedding that tiles
    the input (timm's: `patch_size`, `grid_size`), tokens never outnumber its patches: an
    MLP-Mixer's token-mixing output, (1, 1024 channels, 196 tokens), is no 32 × 32 grid."""
    declared = getattr(model, "num_prefix_tokens", None)
    prefixes = (declared, 0) if isinstance(declared, int) else (0, 1)
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)  # a ViT's, a Mixer's
    grid = getattr(embed, "grid_size", None)
    patch = getattr(embed, "patch_size", None)
    most = None  # patches a side: the grid it was made for, or what this input makes (dynamic size)
    if isinstance(grid, tuple) and isinstance(patch, tuple) and min(patch) > 0:
        most = max(max(grid), input_size // min(patch))  # (an overlapping embedding declares no grid)
    for prefix in dict.fromkeys(prefixes):
        count = tokens - prefix
        if isinstance(grid, tuple) and count == grid[0] * grid[1]:
            return _Layout("tokens", int(grid[0]), int(grid[1]), channels, prefix)
        side = math.isqrt(max(count, 0))
        finer = most is not None and side > most
        if side > 0 and side * side == count and _plausible_side(side, input_size) and not finer:
            return _Layout("tokens", side, side, channels, prefix)
    return None


def _tensor_of(output: Any) -> Any:
    """A layer's output as the map it holds: the tensor of a (tokens, size) pair (timm's MViTv2
    stages and blocks return one), else the output as it is — an attention's (output, weights or
    None) too: its output is listed as the dropout or block after it, as before."""
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[0], torch.Tensor):
        if all(_size(part) for part in output[1:]):
            return output[0]
    return output


def _size(part: Any) -> bool:
    """A grid's size as a model passes it on: a whole number, or a tuple or list of them."""
    if isinstance(part, (tuple, list)):
        return len(part) > 0 and all(_size(v) for v in part)
    return isinstance(part, int) and not isinstance(part, bool)


def _in_order(layout: _Layout, modules: dict[str, nn.Module], layer: str, tokens: int) -> _Layout | None:
    """A token layout with its tokens put back in row order where the model keeps them otherwise:
    timm's Hiera "unrolls" them, so that each pooling window is contiguous, up to its last stage —
    read as rows, its grids were silently scrambled (a helper's sweep against timm's own maps). The
    model's `reroll` gives each cell's token (that of the block whose output, or input, holds this
    many tokens); None where neither does: an order not known is no map."""
    parts = layer.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        reroll = getattr(modules.get(".".join(parts[:depth])), "reroll", None)
        schedule = getattr(reroll, "schedule", None)
        if isinstance(reroll, nn.Module) and isinstance(schedule, dict):
            break
    else:
        return layout
    rest = parts[depth:]
    if rest == ["unroll"]:
        block = 0
    elif len(rest) > 1 and rest[0] == "blocks" and rest[1].isdecimal():
        block = int(rest[1])
    else:  # before the tokens are unrolled (the patch embedding), or after (the head)
        return layout
    for b in (block, block - 1):
        if b in schedule and math.prod(schedule[b][1]) == tokens:
            index = torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1)
            with torch.no_grad():
                order = tuple(int(i) for i in reroll(index, b).reshape(-1))
            return layout if order == tuple(range(tokens)) else replace(layout, order=order)
    return None


def _channels_placed(body: nn.Module, size: int, layout: _Layout) -> _Layout:
    """The layout of a (1, S, S, S) map — as many channels as cells a side (ConvNeXt-T's and Swin-T's
    first stages at 384 px, channels last). The image's right half is blanked: the axis whose first
    cells do not change is the width (axis 3 channels first, axis 2 channels last). Where the layer
    sees too far for that, the axis that keeps its length at another input size holds the channels;
    a layer neither tells apart is refused."""
    probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    blanked = probe.clone()
    blanked[..., size // 2 :] = 0
    with torch.no_grad():
        change = (body(probe) - body(blanked)).abs()

    def edge_ratio(axis: int) -> float:  # how much the first cells change, against the last ones
        return float(change.select(axis, 0).mean() / change.select(axis, -1).mean().clamp_min(1e-30))

    side = layout.height
    width_axis = 2 if edge_ratio(2) < edge_ratio(3) else 3
    if min(edge_ratio(2), edge_ratio(3)) < 0.1 < max(edge_ratio(2), edge_ratio(3)):
        return _Layout("nhwc" if width_axis == 2 else "nchw", side, side, side)
    other = size + 32  # a multiple of the usual strides away
    try:
        with torch.no_grad():
            shape = body(torch.randn(1, 3, other, other, generator=torch.Generator().manual_seed(1))).shape
    except (RuntimeError, ValueError, AssertionError) as error:  # a fixed-size model (timm asserts the size)
        raise ValueError(
            f"the layer's output is {side}×{side}×{side}: which axis holds the channels cannot be told "
            "at this input size; choose another image size or layer"
        ) from error
    if shape[-1] == side and shape[1] != side:
        return _Layout("nhwc", side, side, side)
    return _Layout("nchw", side, side, side)


def _input_size_error(spec: str, size: int, native: int, error: Exception) -> ValueError | RuntimeError:
    """A model failing on the chosen input size; most often a model made for one size (a ViT). Not
    where memory ran out: that read as the size's fault (review)."""
    if out_of_memory(error):
        return RuntimeError(
            f"{spec}: out of memory running the model on one {size}×{size} image ({error_line(error)}): "
            "this machine has too little memory free for it"
        )
    hint = f"; it was made for {native}×{native}: use that image size" if native != size else ""
    return ValueError(f"{spec}: the model fails on a {size}×{size} input ({error}){hint}")


def _probe_image(size: int, seed: int = 0) -> torch.Tensor:
    """The seeded random image layers are listed and extractors checked on: a blank one would make
    a uniform map look like attention weights (`_is_attention`)."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _first_outputs(model: nn.Module, input_size: int) -> tuple[dict[str, tuple[Any, int, int]], set[str]]:
    """Each module's output (and its tensor version) on its first call, for the probe image, and
    how many times it ran (a ResNet block's one ReLU module runs three times); and the modules
    whose first output is the same for another image: none of it comes from the image (XCiT's
    Fourier position encoding was listed as a map, two images' features equal to the last bit)."""
    outputs: dict[str, tuple[Any, int, int]] = {}
    same: dict[str, bool] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            output = _tensor_of(output)
            if name in same:  # the other image's pass: the first call only
                return
            if name in outputs and not comparing:
                first, version, calls = outputs[name]
                outputs[name] = (first, version, calls + 1)
            elif not comparing:
                outputs[name] = (output, getattr(output, "_version", 0), 1)
            else:
                first = outputs.get(name, (None,))[0]  # the same object: a buffer rewritten, not known
                same[name] = (
                    isinstance(output, torch.Tensor)
                    and isinstance(first, torch.Tensor)
                    and output is not first
                    and first.shape == output.shape
                    and torch.equal(first, output)
                )

        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
    device = next(model.parameters(), torch.zeros(())).device  # a module the user holds may be on a GPU
    comparing = False
    try:
        with torch.no_grad():
            model(_probe_image(input_size).to(device))
            comparing = True
            model(_probe_image(input_size, seed=1).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, {name for name, equal in same.items() if equal}


def _spatial_layers(model: nn.Module, input_size: int) -> list[LayerInfo]:
    outputs, constant = _first_outputs(model, input_size)
    modules = dict(model.named_modules())
    first: dict[tuple[int, int], str] = {}
    layers: dict[str, LayerInfo] = {}
    for name in modules:  # parents come before their children
        if name not in outputs:
            continue
        output, version, calls = outputs[name]
        # The same tensor, unmodified, as an enclosing or earlier module (a container and its
        # last child, BatchNormAct and its activation): same features, listed once, by the first
        # name, with the others named (a ViT's `blocks` ends at `blocks.11`).
        key = (id(output), version)
        if key in first:
            if first[key] in layers:
                info = layers[first[key]]
                layers[first[key]] = replace(info, same_as=(*info.same_as, name))
            continue
        first[key] = name
        if name in constant:  # not a feature of the image
            continue
        layout = _layout(output, input_size, _token_owner(modules, name))
        if layout is not None and layout.kind == "tokens":
            layout = _in_order(layout, modules, name, layout.height * layout.width)
        if layout is not None:
            layers[name] = LayerInfo(name, layout.height, layout.width, layout.channels, calls=calls)
    return list(layers.values())


def _example_layers(names: list[str]) -> list[str]:
    """Valid layer names worth showing: the shallowest levels (stages, not their insides), in order."""
    fewest, most = _EXAMPLES
    depth = 0
    while sum(name.count(".") <= depth for name in names) < min(fewest, len(names)):
        depth += 1
    shallow = [name for name in names if name.count(".") <= depth]
    return shallow[:: max(1, math.ceil(len(shallow) / most))]  # none at all: none to show


def _model_at_size(spec: str, image_size: int | None) -> tuple[nn.Module, Preprocess, int]:
    """The model, its preprocessing at `image_size` (default: its own) and its own input size."""
    if is_module_spec(spec):  # e.g. the model of a cache built from a module: only its user holds it
        raise ValueError(
            f"{spec!r} names a model that was a Python object (vfs.models.extractor_from_module), not one "
            f"that can be loaded: make its extractor from the module again and pass it"
        )
    model, preprocess = load_model(spec)
    native = preprocess.input_size
    if image_size is None or image_size == native:
        return model, preprocess, native
    resize = getattr(model, "set_input_size", None)
    if callable(resize):  # timm's ViTs and Swins: position embeddings resampled to the finer grid
        try:
            resize(img_size=(image_size, image_size))
        except Exception as error:  # e.g. a Swin window that does not divide the grid
            raise _input_size_error(spec, image_size, native, error) from error
    return model, preprocess.with_input_size(image_size), native


def list_layers(model: str | nn.Module, image_size: int | None = None) -> list[LayerInfo]:
    """Layers with a spatial output, in module order, with grid sizes at `image_size`.

    `model` is a spec (default size: the model's own) or a module you hold, which needs
    `image_size` (a module does not say its input size) and is put in eval mode (a forward pass in
    train mode would update its batch-norm statistics).
    """
    if isinstance(model, nn.Module):
        if image_size is None:
            raise TypeError("list_layers(module, image_size): a module does not say its input size")
        module, size = model.eval(), image_size
        spec, native = MODULE_PREFIX + type(model).__name__, size
    else:
        module, preprocess, native = _model_at_size(model, image_size)
        spec, size = model, preprocess.input_size
    try:
        return _spatial_layers(module, size)
    except Exception as error:  # user or third-party code: report it as a bad choice of size
        raise _input_size_error(spec, size, native, error) from error


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the chosen layer has run."""


class _LayerNeverRan(RuntimeError):
    """The forward pass ended without running the chosen layer."""


class _HookedLayer(nn.Module):
    """Runs `model` up to `layer` for models that FX cannot trace: a hook grabs the layer's
    output and aborts the rest of the forward pass."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x: torch.Tensor) -> Any:
        grabbed = []

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            grabbed.append(output)
            raise _StopForward

        handle = self.model.get_submodule(self.layer).register_forward_hook(grab)
        try:
            self.model(x)
        except _StopForward:
            return _tensor_of(grabbed[0])
        finally:
            handle.remove()
        raise _LayerNeverRan(f"the forward pass never reached layer {self.layer!r}")


class _GraphLayer(nn.Module):
    """An FX graph of the model truncated at one layer (dead code after it removed)."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> Any:
        return _tensor_of(self.graph(x)["out"])


def _traced(model: nn.Module, layer: str, probe: torch.Tensor, reference: torch.Tensor) -> nn.Module | None:
    """timm's FX extractor (it knows timm's untraceable leaves, e.g. dynamic padding), if it
    traces and gives the hooked forward's output on `probe`."""
    from timm.models import create_feature_extractor

    try:
        with warnings.catch_warnings():  # torchvision notes train/eval graph differences
            warnings.simplefilter("ignore", UserWarning)
            traced = _GraphLayer(create_feature_extractor(model, {layer: "out"})).eval()
        # torch.fx prints the generated code's traceback of a traced graph that fails as it runs (timm's
        # Hiera): pages on stderr for an error that is handled here
        with torch.no_grad(), redirect_stderr(io.StringIO()):
            output = traced(probe)
    except Exception:  # noqa: BLE001 - arbitrary code may not trace; the hook fallback handles it
        return None
    finally:
        model.eval()  # tracing runs the model in train mode too and may leave it there
    same = (
        isinstance(output, torch.Tensor)
        and output.shape == reference.shape
        and torch.allclose(output, reference, rtol=1e-4, atol=1e-5)
    )
    return traced if same else None


class Extractor:
    """One layer of one model as a function image → (h, w, C) feature grid.

    Thread-safe: forwards run under a lock (one model instance, one device).
    """

    def __init__(
        self,
        spec: str,
        layer: str,
        preprocess: Preprocess,
        body: nn.Module,
        layout: _Layout,
        device: torch.device,
        probe_peak: float = 1.0,
        weights: str | None = None,
        probe: tuple[float, ...] | None = None,
    ) -> None:
        self.spec = spec
        self.layer = layer
        self.preprocess = preprocess
        self.grid = (layout.height, layout.width)
        self.channels = layout.channels
        self.device = device
        self.probe_peak = probe_peak  # largest |value| of the layer for a seeded N(0, 1) image: its range
        self.weights = weights  # `weights_digest` of the model
        self.probe = probe  # `probe_sketch` of the layer's output on the seeded probe image
        self._body = body
        self._layout = layout
        self._lock = threading.Lock()

    def features(self, image: PIL.Image.Image | np.ndarray | str | Path) -> np.ndarray:
        """(h, w, C) float32 features of one image — a PIL image, 8-bit pixels (H, W) or (H, W, 3 | 4),
        or the image file at a path (decoded as a build decodes it: `ImageError` saying why where
        it cannot be)."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or not (
                image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
            ):
                raise TypeError(
                    "an image array holds 8-bit pixels, (H, W) or (H, W, 3 | 4); "
                    f"got {image.dtype} {image.shape}"
                )
            image = PIL.Image.fromarray(image)
        elif not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"features of a PIL image, an image array or an image file's path, not {type(image).__name__}"
            )
        tensor = self.preprocess.to_tensor(self.preprocess.view(image))
        return self.features_batch(tensor.unsqueeze(0))[0].cpu().numpy()

    def features_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized input → (B, h, w, C) float32 on `self.device`."""
        batch = batch.to(self.device, torch.float32)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._lock, torch.no_grad(), self._autocast():
            output = self._body(batch)
        return self._layout.to_grid(output).float().contiguous()

    def _autocast(self) -> AbstractContextManager[Any]:
        """fp16 on a GPU where the layer's values fit it; a tiny or huge one would lose them inside
        the network, before any scale applies (`vfs.fp16.fp16_holds`)."""
        if self.device.type == "cuda" and fp16_holds(self.probe_peak):
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def describe(self) -> dict[str, Any]:
        """What produced the features, for cache metadata (JSON-able)."""
        return {
            "spec": self.spec,
            "layer": self.layer,
            "input_size": self.preprocess.input_size,
            "grid": list(self.grid),
            "channels": self.channels,
            "preprocess": self.preprocess.to_dict(),
            "weights": self.weights,
            "probe": None if self.probe is None else list(self.probe),
        }


def weights_digest(model: nn.Module) -> str:
    """A fingerprint of a model's parameters and buffers (names, types, shapes and bytes): which
    weights a cache's features came from, where the spec string cannot say (a checkpoint file
    rewritten since the build, a random init another torch version draws differently). SHA-256,
    ≈ 60 ms for ResNet-50's 100 MB."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()[:32]


PROBE_BUCKETS = 64
PROBE_TOLERANCE = 1e-3
"""Largest relative difference of two `probe_sketch`es taken as one model: the same model on
other code paths (AVX2, AVX-512, SSE4.1) and thread counts stayed within 1.5e-6, a near relative
of its architecture was 0.13–0.84 apart (docs/cache-format.md)."""


def probe_sketch(grid: torch.Tensor) -> tuple[float, ...]:
    """What a layer computes, in 64 numbers: its (h, w, C) output on the seeded probe image summed
    into buckets, each value with a sign, bucket and sign from a fixed hash of its position (a
    count sketch: the sketches' relative difference follows the outputs'). It tells apart models
    whose weights are the same tensors but whose networks differ — the weights of timm's
    `tf_efficientnet_lite0` loaded as `efficientnet_lite0` (other padding and normalisation), a
    library version that changed an architecture — which `weights_digest` cannot."""
    x = grid.detach().to("cpu", torch.float64).numpy().reshape(-1)
    position = np.arange(x.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps: a hash
    bucket = (position >> np.uint64(58)).astype(np.intp)  # the top 6 bits: 0..63
    sign = 1.0 - 2.0 * ((position >> np.uint64(57)) & np.uint64(1)).astype(np.float64)
    sketch = np.bincount(bucket, weights=sign * x, minlength=PROBE_BUCKETS)
    return tuple(float(f"{v:.8g}") for v in sketch)


def probe_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """Relative L2 difference of two probe sketches (inf for sketches of other sizes)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return math.inf
    scale = max(float(np.linalg.norm(x)), float(np.linalg.norm(y)))
    return float(np.linalg.norm(x - y)) / scale if scale > 0 else 0.0


def load_extractor(
    model_spec: str,
    layer: str,
    image_size: int | None = None,
    device: str = "cpu",
    preprocess: Preprocess | None = None,
) -> Extractor:
    """An extractor for `layer` of the model `model_spec` names, at `image_size` (default: the
    model's own), that runs the model only up to that layer. `preprocess` replaces the model's own
    (a cache's, `cache.spec.preprocess`: a query is then made as the cache's images were, whatever
    this version of VFS or timm would choose now); its input size is the image size."""
    if preprocess is not None:
        image_size = preprocess.input_size
    model, own, native = _model_at_size(model_spec, image_size)
    return _build(model_spec, model, layer, preprocess or own, native, device)


def extractor_from_module(
    module: nn.Module, layer: str, preprocess: Preprocess, name: str | None = None, device: str = "cpu"
) -> Extractor:
    """An extractor for `layer` of a model you already hold (e.g. an edited copy of a cache's
    model), given the preprocessing it expects (for a cache's model: `cache.spec.preprocess`).

    It describes itself as ``module:<name>`` (default: the module's class name), which a cache
    takes as "the same architecture as mine": it then checks layer, input size, grid and
    preprocessing, not the model spec. The module itself is used, not a copy: it is set to eval
    mode on `device`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, not {type(module).__name__}")
    spec = MODULE_PREFIX + (name or type(module).__name__)
    model = module.cpu().eval()  # the probes that check the layer run on the CPU
    return _build(spec, model, layer, preprocess, preprocess.input_size, device)


def _build(
    spec: str, model: nn.Module, layer: str, preprocess: Preprocess, native: int, device: str
) -> Extractor:
    """The extractor of `layer` of a CPU model in eval mode, made for input `preprocess` (`native`:
    the input size the model was made for, named when it fails at another).

    The FX-truncated graph is checked against a hooked forward on a random image, and the
    hook version is used instead when tracing fails or disagrees.
    """
    size = preprocess.input_size

    def unusable(problem: str) -> LayerError:
        try:
            names = [info.name for info in _spatial_layers(model, size)]
        except Exception as error:  # the model fails at this size at all: that is the message
            raise _input_size_error(spec, size, native, error) from error
        return LayerError(spec, layer, problem, _example_layers(names), None if size == native else size)

    modules = dict(model.named_modules())
    if not layer or layer not in modules:
        raise unusable(f"no layer {layer!r}")
    probe = _probe_image(size)
    body: nn.Module = _HookedLayer(model, layer)
    try:
        with torch.no_grad():
            reference = body(probe)
    except _LayerNeverRan:
        raise unusable(f"layer {layer!r} never runs in the model's forward pass") from None
    except Exception as error:  # e.g. a ViT with a fixed input size
        raise _input_size_error(spec, size, native, error) from error
    layout = _layout(reference, size, _token_owner(modules, layer))
    if layout is not None and layout.kind == "tokens":
        layout = _in_order(layout, modules, layer, layout.height * layout.width)
    if layout is not None and layout.kind in ("nchw", "nhwc") and layout.height == layout.channels:
        layout = _channels_placed(body, size, layout)
    if layout is not None and layout.kind == "sequence first":  # (T, B, C), or tokens folded (T·B, 1, C)?
        with torch.no_grad():
            pair = body(probe.expand(2, -1, -1, -1))
        if not (isinstance(pair, torch.Tensor) and pair.shape[:2] == (reference.shape[0], 2)):
            layout = None
    if layout is not None:
        with torch.no_grad():
            other = body(_probe_image(size, seed=1))
        if isinstance(other, torch.Tensor) and other is not reference and torch.equal(other, reference):
            raise unusable(
                f"layer {layer!r} gives the same values for every image (a position encoding, a "
                "constant): nothing of it comes from the image"
            )
    if layout is None:
        shape = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference)
        if isinstance(reference, torch.Tensor) and _is_attention(reference):
            what = "attention weights (each row sums to 1), not a spatial map"
        elif (
            isinstance(reference, torch.Tensor) and reference.ndim == 4 and len(set(reference.shape[1:])) == 3
        ):
            # e.g. a convolution strided otherwise across than down: its axes cannot be told apart
            what = "a map whose sides differ for a square input (VFS takes square maps: NCHW or NHWC)"
        else:
            what = "not a spatial map of at least 2 cells"
        raise unusable(f"layer {layer!r} gives {shape} at input size {size}: {what}")
    traced = _traced(model, layer, probe, reference)
    if traced is not None:
        body = traced
    resolved = resolve_device(device)
    weights = weights_digest(model)  # on the CPU, before the model moves to a GPU
    body = body.to(resolved).eval()
    if resolved.type == "cuda":
        body = body.to(memory_format=torch.channels_last)
    grid = layout.to_grid(reference)[0]
    peak = float(grid.abs().max())
    return Extractor(spec, layer, preprocess, body, layout, resolved, peak, weights, probe_sketch(grid))
