"""Models for feature search: spec strings → (model, preprocessing) → one layer's feature grid.

A model is named by one string so that the CLI, the app and the cache attributes agree on it,
e.g. ``embedded:efficientnet_lite0`` (the offline default), ``timm:resnet50`` or
``file:edited.pt?arch=resnet50``. The kinds of spec are the records of `KINDS` (`kinds.py`, the
embedded kind's weight tables in `embedded.py`; ``python -m vfs models`` lists them); `specs.py`
holds the plain data (preprocessing, parsed spec, kind) and `layers.py` turns one layer of a
loaded model, or of a module the user holds (``module:<name>``), into an (h, w, C) feature grid.
"""

from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from .kinds import (
    KINDS,
    CheckpointNotFound,
    absolute_spec,
    input_shape_note,
    load_model,
    model_kind,
    parse_model_spec,
)
from .layers import (
    PROBE_TOLERANCE,
    Extractor,
    LayerError,
    LayerInfo,
    extractor_from_module,
    is_module_spec,
    list_layers,
    load_extractor,
    probe_difference,
    weights_digest,
)
from .specs import IMAGENET_MEAN, IMAGENET_STD, ModelKind, ModelSpec, ModelUnavailable, Preprocess

__all__ = [
    "CheckpointNotFound",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "Extractor",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "LayerError",
    "LayerInfo",
    "PROBE_TOLERANCE",
    "ModelKind",
    "ModelSpec",
    "ModelUnavailable",
    "Preprocess",
    "absolute_spec",
    "extractor_from_module",
    "input_shape_note",
    "is_module_spec",
    "list_layers",
    "load_extractor",
    "load_model",
    "model_kind",
    "parse_model_spec",
    "probe_difference",
    "weights_digest",
]
