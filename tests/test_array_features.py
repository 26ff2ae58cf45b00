"""`ArrayFeatures`' preparation: fp16 features, fp32 squared norms and the sign check, made in one
pass over the array in blocks — the same results whatever the blocks, the input kept uncopied."""

import numpy as np
import pandas as pd
import pytest
import torch

from vfs.search import search_regions
from vfs.sources import ArrayFeatures

SHAPE = (23, 5, 6, 16)


@pytest.fixture(params=[None, 1, 3 * 5 * 6 * 16 * 4], ids=["default", "one image", "three images"])
def blocks(request, monkeypatch):
    """The default block, and small ones: several blocks, a partial last one (torch's blocks: the
    compiled kernel's pass, where contiguous fp16 would take it, is tested in test_kernel.py)."""
    monkeypatch.setattr("vfs.sources.kernel.library", lambda: None)
    if request.param is not None:
        monkeypatch.setattr("vfs.sources.SQNORM_BLOCK_BYTES", request.param)


def relu(seed=0, shape=SHAPE):
    return np.maximum(np.random.default_rng(seed).standard_normal(shape), 0).astype(np.float16)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.astype(np.float32),
        lambda x: x.astype(np.float64) * -1,
        lambda x: torch.from_numpy(x.copy()).permute(0, 2, 1, 3),  # not contiguous
        lambda x: np.ascontiguousarray(np.repeat(x, 2, axis=3))[..., ::2],  # strided numpy
    ],
    ids=["fp16", "fp32", "fp64 signed", "transposed", "strided"],
)
def test_preparation_matches_the_whole_array_computation(make, blocks):
    features = make(relu())
    whole = torch.as_tensor(features).to(torch.float16).contiguous()
    source = ArrayFeatures(features)
    assert torch.equal(source._fp16, whole) and source._fp16.is_contiguous()
    expect = torch.linalg.vector_norm(whole.float(), dim=-1).square()
    assert source._sqnorm.dtype == torch.float32
    assert torch.equal(source._sqnorm, expect)  # bit for bit
    assert source.nonnegative == bool((whole >= 0).all())
    assert source.shape == tuple(whole.shape)


def test_contiguous_fp16_is_not_copied(blocks):
    x = relu()
    frozen = x.copy()
    frozen.flags.writeable = False
    tensor = torch.from_numpy(x.copy())
    for features in (x, frozen, tensor):
        source = ArrayFeatures(features)
        assert source._fp16.data_ptr() == torch.as_tensor(features).data_ptr()


@pytest.mark.parametrize("where", [(0, 0, 0, 0), (-1, -1, -1, -1), (-1, 2, 3, 7)])
def test_a_negative_value_anywhere_makes_the_source_signed(where, blocks):
    x = relu(1)
    assert ArrayFeatures(x).nonnegative
    x[where] = -0.5
    assert not ArrayFeatures(x).nonnegative
    x[where] = -0.0  # ≥ 0, as ReLU outputs rounded to fp16 may be
    assert ArrayFeatures(x).nonnegative


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0, 0, 0), (-1, -1, -1, -1)])
def test_non_finite_values_in_any_block_are_refused(value, where, blocks):
    for x in (relu(2), relu(2).astype(np.float32)):
        x[where] = value
        image = where[0] % len(x)
        with pytest.raises(
            ValueError, match=rf"the features of image\(s\) {image} \(1 in all\) contain NaN or inf"
        ):
            ArrayFeatures(x)


@pytest.mark.parametrize("power", [-60, -20, 20, 40], ids=["zero in fp16", "subnormal", "inf", "inf far"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_beyond_fp16s_range_are_scaled_by_a_power_of_two(power, dtype):
    """Scores are cosines, blind to scale: an array whose fp16 copy would lose its values (to zero,
    subnormals or inf) is searched as the same array at a scale fp16 holds — bit for bit, since
    a power of two moves no bit; before, tiny arrays gave inexact scores and huge ones an error."""
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float16)
    x[..., 0] = 0.0  # zeros stay zeros
    source = ArrayFeatures((x.astype(np.float64) * 2.0**power).astype(dtype))
    assert torch.isfinite(source._sqnorm).all()
    ratio = source._fp16.to(torch.float64) / torch.as_tensor(x, dtype=torch.float64)
    ratio = ratio[torch.as_tensor(x) != 0]
    assert ratio.min() == ratio.max() and np.log2(float(ratio[0])).is_integer()
    largest = float(source._fp16.abs().max())
    assert 8 <= largest < 16
    mask = np.zeros(SHAPE[1:3])
    mask[1:3, 2:5] = 1
    scaled = search_regions((x.astype(np.float64) * 2.0**power).astype(dtype), 3, mask, k=5)
    unit = search_regions(x, 3, mask, k=5)
    pd.testing.assert_frame_equal(scaled.top, unit.top)
    assert torch.equal(ArrayFeatures(x.astype(dtype))._fp16, torch.as_tensor(x))  # in range: as it is


def test_empty_arrays_and_autograd_tensors():
    empty = ArrayFeatures(np.zeros((0, 5, 6, 16), np.float16))
    assert empty.shape == (0, 5, 6, 16) and empty.nonnegative and empty._sqnorm.shape == (0, 5, 6)
    assert ArrayFeatures(np.zeros((3, 5, 6, 0), np.float32))._sqnorm.eq(0).all()
    x = torch.from_numpy(relu(3).astype(np.float32)).requires_grad_()
    source = ArrayFeatures(x)
    assert not source._sqnorm.requires_grad and source.nonnegative
