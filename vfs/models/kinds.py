"""The kinds of model spec — embedded, timm, torchvision, file, python — each as one record of
`KINDS`: its syntax check, its loader and its rules.

A kind's section below holds its parse and load functions (the embedded kind's, with its weight
tables, are in `embedded.py`); `parse_model_spec` and `load_model` only dispatch on the prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import math
import re
import socket
import threading
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import torch
from torch import nn

from ..errors import error_line
from . import embedded
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from .specs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    ModelKind,
    ModelSpec,
    ModelUnavailable,
    Preprocess,
)

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _check_name(spec: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"model spec {spec!r}: {name!r} is not a model name (letters, digits, '_', '.' and '-')"
        )


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
        f"the weights for {spec!r} could not be downloaded (no internet?): {error_line(error).rstrip('.')}. "
        f"Models that work offline: {', '.join(EMBEDDED_MODELS)}; a local checkpoint with "
        "file:<path>?arch=<name>; or random weights with timm:<name>?pretrained=false "
        "or torchvision:<name>@none."
    )


# --- timm: timm:<name>, ?pretrained=false for random weights --------------------------------------


def _parse_timm(spec: str, body: str, options: dict[str, str]) -> tuple[str, dict[str, str]]:
    _check_name(spec, body)
    value = options.get("pretrained", "true").lower()
    if value not in _BOOLEANS:
        raise ValueError(f"model spec {spec!r}: pretrained must be true or false")
    return body, options | {"pretrained": str(_BOOLEANS[value]).lower()}


def _load_timm(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import timm

    _check_timm_model(spec.raw, spec.name)
    pretrained = spec.options["pretrained"] == "true"
    overlay = _offline_hub_weights(spec) if pretrained else {}
    try:
        with _seeded(not pretrained):
            model = timm.create_model(spec.name, pretrained=pretrained, **overlay)
    except _download_errors() as error:
        raise _unavailable(spec.raw, error) from error
    return model, _timm_preprocess(model)


HUB_REACH_TIMEOUT_S = 5.0
"""How long a pretrained timm load tries to reach the Hugging Face hub (each of its addresses) before
it counts as offline.
The hub's client retries an unreachable host with back-off (≈ 45 s for one model) before it looks in
its own cache; this check makes an offline load take seconds, with the cache or the message."""

_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order of preference


def _offline_hub_weights(spec: ModelSpec) -> dict[str, Any]:
    """`create_model` arguments that load hub weights from the local HF cache when the hub cannot be
    reached ({} when it can, or when the weights do not come from the hub); `ModelUnavailable` when
    it cannot be reached and they are not cached."""
    import timm.models
    from huggingface_hub import constants, try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(spec.name)
    if config is None or not config.hf_hub_id or constants.HF_HUB_OFFLINE:
        return {}  # url weights (torch.hub asks once) or the hub's own offline mode: both fail fast
    host = urlsplit(constants.ENDPOINT).hostname or ""
    proxies = urllib.request.getproxies()
    if (proxies.get("https") or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return {}  # the proxy, not this machine, reaches the hub
    error = _unreachable(constants.ENDPOINT)
    if error is None:
        return {}
    repo, _, revision = config.hf_hub_id.partition("@")
    names = [config.hf_hub_filename] if config.hf_hub_filename else []
    for filename in names + list(_HUB_WEIGHT_FILES):
        cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):  # not None (never fetched) nor the "known missing" marker
            return {"pretrained_cfg_overlay": {"file": cached}}
    raise _unavailable(spec.raw, error)


def _unreachable(endpoint: str) -> OSError | None:
    """Why `endpoint`'s host cannot be connected to (a name that does not resolve, a refused or
    timed-out connection), or None."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_REACH_TIMEOUT_S).close()
    except OSError as error:
        return OSError(f"cannot reach {url.hostname}:{port}: {error}")
    return None


_SEEDED = threading.Lock()  # one seeded draw at a time: two would interleave on the one generator


@contextmanager
def _seeded(random_init: bool) -> Iterator[None]:
    """Random weights drawn from seed 0 on the CPU's generator (where models are made), leaving the
    caller's random state as it was: a random-init spec is one model on every load (a query image
    must meet the cache's weights), not a new draw."""
    if not random_init:
        yield
        return
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        yield


def _check_timm_model(spec: str, name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ValueError(f"model spec {spec!r}: timm has no model {name!r}{hint}")


def _timm_preprocess(model: nn.Module) -> Preprocess:
    """Read from the model's pretrained config, which timm knows without downloading."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    size = int(config["input_size"][-1])  # the width: see input_shape_note
    interpolation = config.get("interpolation", "bicubic")
    return Preprocess(
        input_size=size,
        resize_size=math.floor(size / config.get("crop_pct", 0.875)),  # timm's own rounding
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop=config.get("crop_mode") or "center",
    )


# --- torchvision: torchvision:<name>[@<weights name> | @none] -------------------------------------


def _parse_torchvision(spec: str, body: str, options: dict[str, str]) -> tuple[str, dict[str, str]]:
    name, at, weights = body.partition("@")
    if at and not weights:
        raise ValueError(
            f"model spec {spec!r}: empty weights name after '@' (e.g. @IMAGENET1K_V1, @DEFAULT, @none)"
        )
    _check_name(spec, name)
    return name, options | {"weights": weights or "DEFAULT"}


def _load_torchvision(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import torchvision

    _check_torchvision_model(spec.raw, spec.name)
    weights = _torchvision_weights(spec.raw, spec.name, spec.options["weights"])
    try:
        with _seeded(weights is None):
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
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
        mean=tuple(getattr(transform, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(transform, "std", IMAGENET_STD)),
    )


# --- file: file:<checkpoint>?arch=<timm name | torchvision:<name>>, a local state dict ------------


def _parse_file(spec: str, body: str, options: dict[str, str]) -> tuple[str, dict[str, str]]:
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
    return body, options


class CheckpointNotFound(ValueError):
    """A `file:` spec's checkpoint is not at its path (moved since a cache was built with it?)."""


def absolute_spec(spec: str) -> str:
    """`spec` with a `file:` checkpoint's path made absolute (else as it is): what a cache records, so
    that its model is found from any folder (a relative path named the build's working folder)."""
    parsed = parse_model_spec(spec)
    if parsed.kind != "file":
        return spec
    options = spec.strip().partition(":")[2].rpartition("?")[2]  # a file: spec has ?arch=
    return f"file:{Path(parsed.name).expanduser().resolve()}?{options}"


def _load_file(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    import timm
    import torchvision

    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise CheckpointNotFound(f"model spec {spec.raw!r}: no checkpoint file {str(path)!r}")
    arch = spec.options["arch"]
    arch_kind, _, arch_name = arch.rpartition(":")
    if arch_kind == "torchvision":
        _check_torchvision_model(spec.raw, arch_name)
        make = functools.partial(torchvision.models.get_model, arch_name, weights=None)
        preprocess = _torchvision_preprocess(arch_name, None)
    else:
        _check_timm_model(spec.raw, arch_name)
        make = functools.partial(timm.create_model, arch_name, pretrained=False)
        preprocess = None
    model = make()
    state = _matching_keys(_read_state_dict(path), model.state_dict())
    classes = _head_size(state, model.state_dict())
    if classes is not None:  # a fine-tuned classifier: the head's size is the checkpoint's
        with contextlib.suppress(TypeError, ValueError):  # a constructor without num_classes
            model = make(num_classes=classes)
    _drop_missing_head(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{spec.raw!r}: the checkpoint does not fit {arch}: {_misfit(state, model.state_dict())}; "
            + _misfit_hint(state, model.state_dict())
        ) from error
    return model, preprocess or _timm_preprocess(model)


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, unwrapped from common containers (timm's
    and Lightning's `state_dict`, the tutorials' `model_state_dict`, `model`, an EMA's)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:  # tensors and plain containers only: unpickling anything else could run code
            with torch.serialization.safe_globals([argparse.Namespace]):  # timm train.py's `args`
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: say which and why, not a pickle traceback
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {_unreadable(error)}") from error
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = (
            type(state).__name__ if not isinstance(state, Mapping) else "mapping of other things than tensors"
        )
        raise ValueError(
            f"checkpoint {str(path)!r} holds a {held}, not a state dict; save model.state_dict() instead"
        )
    return state


def _unreadable(error: BaseException) -> str:
    """Why torch could not read a checkpoint, and what to save instead."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # weights_only refused an object: a pickled model, or something holding one
        return (
            f"it holds a pickled {found[1]} object, which VFS does not unpickle (that could run code): "
            "save model.state_dict() instead, or load it in a python: spec"
        )
    if "TorchScript" in text:
        return "it is a TorchScript archive: save the model's state_dict() instead"
    return f"not a PyTorch checkpoint or .safetensors file ({type(error).__name__}: {error_line(error)})"


def _matching_keys(
    state: Mapping[str, torch.Tensor], wanted: Mapping[str, Any]
) -> Mapping[str, torch.Tensor]:
    """`state` with a leading name part removed while that matches more of the model's keys:
    DataParallel's `module.`, torch.compile's `_orig_mod.`, Lightning's `model.` — shared by every
    key, or by the part of the checkpoint that holds most of the model's weights beside other
    tensors (a loss's class weights, an EMA copy: the part not named EMA is taken), which are then
    left out with a warning."""
    best, dropped = state, set[str]()
    while True:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in best.items():
            name, dot, rest = key.partition(".")
            if dot:
                parts.setdefault(name, {})[rest] = value
        if not parts:
            break
        name = max(parts, key=lambda n: (len(parts[n].keys() & wanted.keys()), "ema" not in n.lower()))
        part = parts[name]
        matched = len(part.keys() & wanted.keys())
        gained = matched - len(best.keys() & wanted.keys())
        shared = len(part) == len(best)  # a prefix of every key may gain only on a later one
        if gained < 0 or (not shared and (gained == 0 or 2 * matched < len(wanted))):
            break
        dropped |= {
            key.partition(".")[0] + "." * ("." in key) for key in best if not key.startswith(name + ".")
        }
        best = part
    if dropped:
        names = ", ".join(sorted(dropped))
        warnings.warn(f"the checkpoint's tensors under {names} are left out: not the model's", stacklevel=2)
    return best


def _head_size(state: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> int | None:
    """The checkpoint's number of classes where only the classifier's weight and bias differ in
    size from the model's (a model fine-tuned on 14 findings, 2 classes, …), else None."""
    differ = {key for key in state.keys() & wanted.keys() if state[key].shape != wanted[key].shape}
    heads = {key.rpartition(".")[0] for key in differ}
    if len(heads) != 1:
        return None
    (head,) = heads
    weight = state[f"{head}.weight"] if f"{head}.weight" in differ else None
    if weight is None or not differ <= {f"{head}.weight", f"{head}.bias"} or weight.ndim < 2:
        return None
    return int(weight.shape[0]) if weight.shape[1:] == wanted[f"{head}.weight"].shape[1:] else None


def _drop_missing_head(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """A backbone's checkpoint (self-supervised weights, timm's `num_classes=0`, a feature
    extractor) lacks the classifier and nothing else: where every weight it lacks is a linear
    layer's, and those are the model's last layers with weights, they become identities, so that
    the spatial layers load and no random weights enter (nor the weights digest)."""
    wanted = model.state_dict()
    missing = wanted.keys() - state.keys()
    if not missing or state.keys() - wanted.keys():
        return
    owners = {key.rpartition(".")[0] for key in missing}
    modules = dict(model.named_modules())
    weighted = [name for name, m in modules.items() if next(m.parameters(recurse=False), None) is not None]
    if set(weighted[-len(owners) :]) != owners or not all(isinstance(modules[o], nn.Linear) for o in owners):
        return
    if any(f"{o}.{name}" not in missing for o in owners for name, _ in modules[o].named_parameters()):
        return  # part of a layer (its bias, say): a damaged checkpoint, not a backbone's
    for name in owners:
        model.set_submodule(name, nn.Identity())


def _misfit(state: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> str:
    """What differs between a checkpoint and the model, in a line: counts and the first names."""

    def first(keys: set[str]) -> str:
        shown = sorted(keys)[:3]
        return ", ".join(shown) + (", …" if len(keys) > 3 else "")

    missing, unexpected = wanted.keys() - state.keys(), state.keys() - wanted.keys()
    resized = {k for k in state.keys() & wanted.keys() if state[k].shape != wanted[k].shape}
    parts = [
        f"{len(missing)} of its weights missing ({first(missing)})" if missing else "",
        f"{len(unexpected)} unknown ({first(unexpected)})" if unexpected else "",
        f"{len(resized)} of other sizes ({first(resized)})" if resized else "",
    ]
    return "; ".join(p for p in parts if p)


def _misfit_hint(state: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> str:
    """What to do about a checkpoint that does not fit: where every weight it holds is one of the
    model's, of its size, it is part of them (only the tensors an edit changed) or a smaller member
    of the family (ResNet-18's into a ResNet-34); else another architecture."""
    if state.keys() <= wanted.keys() and all(state[k].shape == wanted[k].shape for k in state):
        return (
            f"it holds {len(state)} of the model's {len(wanted)} weights, each one of the model's: save "
            "the whole state_dict(), or, if it is another architecture's, name that one with ?arch="
        )
    return "?arch= must name the architecture the checkpoint was saved from"


# --- python: python:<module>:<function>, user code returning a module or (module, preprocessing) --


def _parse_python(spec: str, body: str, options: dict[str, str]) -> tuple[str, dict[str, str]]:
    module_name, _, function = body.rpartition(":")
    if not (
        module_name
        and function.isidentifier()
        and all(part.isidentifier() for part in module_name.split("."))
    ):
        raise ValueError(f"model spec {spec!r}: expected python:<module>:<function>")
    return body, options


def _load_python(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    module_name, _, function_name = spec.name.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"model spec {spec.raw!r}: cannot import {module_name!r} ({error}); "
            "run from the folder that holds it, or install it"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"model spec {spec.raw!r}: {module_name} has no function {function_name!r}")
    try:
        result = function()
    except Exception as error:  # user code: report which call failed, not a bare traceback
        raise ValueError(
            f"model spec {spec.raw!r}: {function_name}() raised {type(error).__name__}: {error_line(error)}"
        ) from error
    model, preprocess = result if isinstance(result, tuple) else (result, Preprocess(224, 256))
    if isinstance(preprocess, Mapping):
        preprocess = Preprocess.from_dict(preprocess)
    if not isinstance(model, nn.Module) or not isinstance(preprocess, Preprocess):
        raise ValueError(
            f"model spec {spec.raw!r}: {function_name}() must return an nn.Module "
            "or (nn.Module, Preprocess or dict)"
        )
    return model, preprocess


# --- the registry ---------------------------------------------------------------------------------

KINDS: dict[str, ModelKind] = {
    kind.prefix: kind
    for kind in (
        ModelKind(
            "embedded",
            embedded.parse,
            embedded.load,
            usage=tuple(
                (spec, "ImageNet weights inside an installed package: works offline")
                for spec in EMBEDDED_MODELS
            ),
        ),
        ModelKind(
            "timm",
            _parse_timm,
            _load_timm,
            options=("pretrained",),
            usage=(
                ("timm:<name>", "pretrained, downloaded once; e.g. timm:resnet50"),
                ("timm:<name>?pretrained=false", "random init, a useful control"),
            ),
        ),
        ModelKind(
            "torchvision",
            _parse_torchvision,
            _load_torchvision,
            usage=(
                (
                    "torchvision:<name>[@<weights>]",
                    "e.g. torchvision:resnet50@IMAGENET1K_V2; @none for random init",
                ),
            ),
        ),
        ModelKind(
            "file",
            _parse_file,
            _load_file,
            options=("arch",),
            reads_local_file=True,
            usage=(
                (
                    "file:<checkpoint>?arch=<name>",
                    "a local state dict / .safetensors (timm name or torchvision:<name>)",
                ),
            ),
        ),
        ModelKind(
            "python",
            _parse_python,
            _load_python,
            runs_user_code=True,
            usage=(
                (
                    "python:<module>:<function>",
                    "your code, returning an nn.Module (optionally with its Preprocess)",
                ),
            ),
        ),
    )
}


def parse_model_spec(spec: str) -> ModelSpec:
    """Check a spec string's syntax (not whether the model exists) and split it up."""
    prefix, colon, rest = spec.strip().partition(":")
    kind = KINDS.get(prefix) if colon else None
    if kind is None:
        raise ValueError(
            f"model spec {spec!r}: expected it to start with one of "
            f"{', '.join(k + ':' for k in KINDS)} (e.g. {DEFAULT_MODEL})"
        )
    body, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    options = _parse_options(spec, kind, query)
    if not body:
        syntax = " or ".join(syntax for syntax, _ in kind.usage)
        raise ValueError(f"model spec {spec!r}: nothing after {prefix + ':'!r} (expected {syntax})")
    name, options = kind.parse(spec, body, options)
    return ModelSpec(prefix, name, options, spec)


def _parse_options(spec: str, kind: ModelKind, query: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as error:
        raise ValueError(f"model spec {spec!r}: cannot read options {query!r}") from error
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in kind.options:
            accepted = f"it accepts {', '.join(kind.options)}" if kind.options else "it takes none"
            raise ValueError(
                f"model spec {spec!r}: unknown option {key!r} for {kind.prefix}: specs ({accepted})"
            )
        if key in options:
            raise ValueError(f"model spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return options


def model_kind(spec: str) -> ModelKind:
    """The kind of a spec string (its syntax checked), for the rules that depend on the kind."""
    return KINDS[parse_model_spec(spec).kind]


def load_model(spec: str) -> tuple[nn.Module, Preprocess]:
    """The model in eval mode on the CPU, with the preprocessing its weights expect (a warning where
    that is not its own input shape: `input_shape_note`)."""
    parsed = parse_model_spec(spec)
    model, preprocess = KINDS[parsed.kind].load(parsed)
    note = input_shape_note(spec)
    if note:
        warnings.warn(note, stacklevel=2)
    return model.eval(), preprocess


def input_shape_note(spec: str) -> str | None:
    """What to tell a user of a timm model made for non-square input (Sapiens: 1024×768 px): VFS's
    views, grids and canvases are square, so it runs on square crops of its width. None for the others
    (torchvision's and the embedded models' inputs are square; a python: model says nothing)."""
    parsed = parse_model_spec(spec)
    name = {"timm": parsed.name, "file": parsed.options.get("arch", "")}.get(parsed.kind, "")
    if not name or ":" in name:  # not a timm architecture
        return None
    import timm.models

    config = timm.models.get_pretrained_cfg(name)  # by name: without making the model
    height, width = config.input_size[-2:] if config and config.input_size else (0, 0)
    if height == width:
        return None
    return (
        f"{spec}: the model was made for {height}×{width} px input (height × width); VFS runs every "
        f"model on square crops: {width}×{width} px unless another input size is chosen"
    )
