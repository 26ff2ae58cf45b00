"""A cache of a layer whose values fp16 cannot hold as they are stores them times a power of two,
decided once at creation (`feature_scale`): tiny layers keep their values, and every reader, resume
and search agrees on the one scale."""

from __future__ import annotations

import math

import pytest
from cachehelpers import synthetic_spec

from vfs.cache import CacheWriter
from vfs.data import open_dataset
from vfs.sources import cache_feature_scale


def test_the_scale_rule():
    assert cache_feature_scale(1.0) == cache_feature_scale(2.0**-4) == cache_feature_scale(2.0**10) == 1
    for peak in (1e-10, 7e-8, 0.06, 2.0**10 * 1.01, 3e5):
        scale = cache_feature_scale(peak)
        assert 8 <= peak * scale < 16 and math.frexp(scale)[0] == 0.5, peak
    assert cache_feature_scale(0.0) == cache_feature_scale(math.nan) == cache_feature_scale(math.inf) == 1
    assert cache_feature_scale(1e-45) == 2.0**127  # fp32's largest power of two: the builds scale in fp32


def test_feature_scale_must_be_a_power_of_two(tmp_path):
    dataset = open_dataset("embedded:skimage").limit(2)
    with pytest.raises(ValueError, match="power of two"):
        CacheWriter.open(
            tmp_path / "x.zarr", synthetic_spec((2, 2), 4), dataset.records, 8, feature_scale=3.0
        )
    assert not (tmp_path / "x.zarr").exists()
