"""fp16's range as VFS plans for it: which values a cache or an array can hold in fp16 as they
are, and the power of two that brings others into range (a power of two changes no bit of a value
and no cosine)."""

from __future__ import annotations

import math

import torch


def peak_scale(peak: float) -> float:
    """The power of two that takes a largest |value| `peak` (> 0, finite) to [8, 16): in fp16 that
    is 2¹² below its largest value and 2¹⁷ above its least normal one. At most 2¹²⁷, the largest
    power of two fp32 holds (features are scaled in fp32): only a peak below fp32's own normal
    range stays under 8."""
    return 2.0 ** min(3 - math.floor(math.log2(peak)), 127)


FP16_STORED_AS_IS = (2.0**-4, 2.0**10)
"""The probe peaks (`Extractor.probe_peak`) of layers a cache stores as they are (`feature_scale`
1): 2⁷ either side of the [8, 16) `peak_scale` aims at. Above, real images may exceed the seeded
probe image 2⁵-fold before fp16 overflows (2¹⁰ · 2⁵ = 2¹⁵ < 65504; 40 Imagenette images peaked
1.6–4× their layer's probe on EfficientNet-Lite0 blocks.5 and random-init EfficientNet-B0 and
MobileNet-V3-Large); below, values 2⁻¹⁰ of the peak still hold fp16's 11 bits (its normal range
starts at 2⁻¹⁴). Every ordinary layer measured falls inside (EfficientNet-Lite0 2³–2⁵, random-init
ResNet-50 layer4 2⁸, ViT-S and ConvNeXt-T 2²): their caches stay as before, bit for bit."""


def cache_feature_scale(probe_peak: float) -> float:
    """The power of two a cache stores a layer's features times (its `feature_scale`), decided
    once from the largest |value| the layer gave the seeded probe image: 1 within
    `FP16_STORED_AS_IS` or where the peak tells nothing (0, NaN, inf), else `peak_scale` — tiny
    layers (random-init EfficientNet-B0 features.6 peaks at 1e-10, below fp16's least subnormal)
    keep their values, huge ones do not overflow."""
    if fp16_holds(probe_peak) or probe_peak == 0 or not math.isfinite(probe_peak):
        return 1.0
    return peak_scale(probe_peak)


def fp16_holds(probe_peak: float) -> bool:
    """Whether a layer whose seeded probe image peaks at `probe_peak` can run in fp16 (a GPU's
    autocast) as it is: a tiny one would underflow inside the network, before any scale applies."""
    low, high = FP16_STORED_AS_IS
    return low <= probe_peak <= high


def stored_features(features: torch.Tensor, feature_scale: float) -> torch.Tensor:
    """A layer's fp32 features as a cache of `feature_scale` stores them, in fp16: scaled first, so
    that tiny values stay above fp16's subnormals and huge ones below its overflow (a power of two
    changes no bit of a value nor any cosine)."""
    return (features if feature_scale == 1 else features * feature_scale).to(torch.float16)
