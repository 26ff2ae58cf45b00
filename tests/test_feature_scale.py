"""A cache of a layer whose values fp16 cannot hold as they are stores them times a power of two,
decided once at creation (`feature_scale`): tiny layers keep their values, and every reader, resume
and search agrees on the one scale."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from cachehelpers import synthetic_spec
from search_reference import brute_force
from torch import nn

from vfs import BuildJob, build_cache, search_regions
from vfs.cache import CacheWriter, open_cache
from vfs.cli import main
from vfs.data import open_dataset
from vfs.fp16 import cache_feature_scale
from vfs.jobs import ModelInputView
from vfs.models import Extractor, Preprocess, extractor_from_module

TINY = 1e-12  # the layer's values: below fp16's least subnormal (6e-8), stored as zeros unscaled
N_IMAGES = 12


class Conv(nn.Module):
    """One strided convolution and a ReLU, its weights times `gain`: an 8×8×16 layer of any size."""

    def __init__(self, gain: float):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        with torch.no_grad():
            self.conv.weight.mul_(gain)
            self.conv.bias.mul_(gain)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def extractor(gain: float) -> Extractor:
    return extractor_from_module(Conv(gain), "act", Preprocess(32, 32))


def job(out) -> BuildJob:
    return BuildJob(
        layer="act", data="embedded:skimage", out=str(out), limit=N_IMAGES, batch_size=4, chunk_images=4
    )


def layer_features(ex: Extractor) -> np.ndarray:
    """(N, 8, 8, 16) fp32: the layer's own output for the images a test build stores, computed as
    the build computes it (uint8 model-input views, normalised, one batch)."""
    dataset = open_dataset("embedded:skimage").limit(N_IMAGES)
    views = torch.stack([ModelInputView(ex.preprocess)(dataset.load(i)) for i in range(N_IMAGES)])
    return ex.features_batch(ex.preprocess.normalize(views)).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ex = extractor(TINY)
    return build_cache(job(tmp_path_factory.mktemp("tiny") / "tiny.zarr"), extractor=ex), layer_features(ex)


def test_the_scale_rule():
    assert cache_feature_scale(1.0) == cache_feature_scale(2.0**-4) == cache_feature_scale(2.0**10) == 1
    for peak in (1e-10, 7e-8, 0.06, 2.0**10 * 1.01, 3e5):
        scale = cache_feature_scale(peak)
        assert 8 <= peak * scale < 16 and math.frexp(scale)[0] == 0.5, peak
    assert cache_feature_scale(0.0) == cache_feature_scale(math.nan) == cache_feature_scale(math.inf) == 1
    assert cache_feature_scale(1e-45) == 2.0**127  # fp32's largest power of two: the builds scale in fp32


def test_a_tiny_layer_is_stored_scaled(tiny, capsys):
    cache, fp32 = tiny
    scale = cache.feature_scale
    assert scale == cache_feature_scale(extractor(TINY).probe_peak) == 2.0**42
    assert cache.attrs["feature_scale"] == scale and cache.info()["feature_scale"] == scale
    stored = cache.features[:].astype(np.float32)
    assert (stored > 0).mean() > 0.3 and 1 < stored.max() < 64
    # the layer's own values × scale, within fp16's rounding (half a unit: 2⁻¹¹ relative, 2⁻²⁵ subnormal)
    np.testing.assert_allclose(stored, fp32 * scale, rtol=2**-11, atol=2**-25)
    assert main(["info", cache.location]) == 0
    assert "× 2^42 (feature_scale)" in capsys.readouterr().out


def test_a_tiny_layer_searches_as_the_float64_reference(tiny):
    """Queries from a stored row and from the layer's own (unscaled, fp32, ≈ 1e-12) features score as
    the float64 cosine — of the stored values to fp32's rounding, of the layer's own within fp16's —
    and rank as it; the query's magnitude changes no score, fast or exact."""
    cache, fp32 = tiny
    mask = np.zeros((8, 8), np.float32)
    mask[2:5, 1:4] = 1
    mask[3, 3] = 0.5
    stored, others = cache.features[:], np.arange(N_IMAGES) != 3
    own, _ = brute_force(fp32, fp32[3], mask)
    for query in (3, fp32[3], fp32[3] * 2.0**30):
        exact, _ = brute_force(stored, stored[3] if isinstance(query, int) else query, mask)
        got = search_regions(cache, query, mask, k=5, exclude=3, device="cpu", all_exact=True)
        np.testing.assert_allclose(got.scores[others], exact[others], atol=1e-6)
        np.testing.assert_allclose(got.scores[others], own[others], atol=5e-4)
        assert got.top["index"].tolist() == np.argsort(-np.where(others, own, -np.inf))[:5].tolist()
    tiny_query = search_regions(cache, fp32[3], mask, k=5, device="cpu")
    scaled_query = search_regions(cache, fp32[3] * 2.0**30, mask, k=5, device="cpu")
    np.testing.assert_array_equal(tiny_query.scores, scaled_query.scores)


def test_a_huge_layer_is_stored_scaled_not_skipped(tmp_path):
    """Values beyond 65504 would be inf in fp16, and their images skipped as unsearchable."""
    ex = extractor(1e7)
    cache = build_cache(job(tmp_path / "huge.zarr"), extractor=ex)
    assert cache.n == N_IMAGES and not cache.report["skipped"] and cache.feature_scale == 2.0**-21
    fp32 = layer_features(ex)
    assert np.abs(fp32).max() > 65504
    np.testing.assert_allclose(cache.features[:].astype(np.float32), fp32 * cache.feature_scale, rtol=2**-11)


def test_an_ordinary_layer_is_stored_as_it_is(tmp_path):
    """Scale 1: the features are the layer's own rounded to fp16, bit for bit, as before scales."""
    ex = extractor(1.0)
    cache = build_cache(job(tmp_path / "plain.zarr"), extractor=ex)
    assert cache.feature_scale == 1 and cache.attrs["feature_scale"] == 1
    expected = torch.from_numpy(layer_features(ex)).to(torch.float16).numpy()
    assert cache.features[:].tobytes() == expected.tobytes()


def test_an_interrupted_build_resumes_with_its_scale(tiny, tmp_path):
    """The scale is the cache's, not the resuming build's: a resume whose extractor would decide
    another keeps the one the cache was created with, and finishes the uninterrupted cache."""
    out, cancel = tmp_path / "resumed.zarr", threading.Event()
    assert (
        build_cache(job(out), progress=lambda _: cancel.set(), cancel=cancel, extractor=extractor(TINY))
        is None
    )
    partial = open_cache(out)
    assert not partial.complete and 0 < partial.stored < N_IMAGES and partial.feature_scale == 2.0**42
    other = extractor(TINY)
    other.probe_peak = 1.0  # would be stored unscaled, as zeros, were the scale decided again
    cache = build_cache(job(out), extractor=other)
    reference, _ = tiny
    assert cache.feature_scale == reference.feature_scale
    assert cache.features[:].tobytes() == reference.features[:].tobytes()


def test_feature_scale_must_be_a_power_of_two(tmp_path):
    dataset = open_dataset("embedded:skimage").limit(2)
    with pytest.raises(ValueError, match="power of two"):
        CacheWriter.open(
            tmp_path / "x.zarr", synthetic_spec((2, 2), 4), dataset.records, 8, feature_scale=3.0
        )
    assert not (tmp_path / "x.zarr").exists()


def test_a_gpu_runs_in_fp16_only_a_layer_whose_values_fp16_holds(monkeypatch):
    """Under CUDA's fp16 autocast a tiny layer's values vanish inside the network, before any scale."""
    from contextlib import nullcontext

    from vfs.fp16 import fp16_holds

    assert fp16_holds(13.7) and fp16_holds(2.0**-4) and fp16_holds(2.0**10)  # Lite0 blocks.5: as before
    assert not fp16_holds(1e-10) and not fp16_holds(2.0**11) and not fp16_holds(math.nan)
    monkeypatch.setattr(torch, "autocast", lambda device, dtype: ("autocast", device, dtype))  # no GPU here
    tiny, ordinary = extractor(TINY), extractor(1.0)
    for ex in (tiny, ordinary):
        ex.device = torch.device("cuda")
    assert isinstance(tiny._autocast(), nullcontext)
    assert ordinary._autocast() == ("autocast", "cuda", torch.float16)
    ordinary.device = torch.device("cpu")
    assert isinstance(ordinary._autocast(), nullcontext)  # CPUs: fp32 always
