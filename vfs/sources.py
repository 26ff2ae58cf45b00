"""What a search reads: the `FeatureSource` protocol, and `ArrayFeatures` for arrays in memory.

The other sources are a cache (`vfs.cache.FeatureCache`) and a Ray shard's rows of one
(`vfs.cluster.rows.CacheRows`); each hands the search features (fp16 as stored, or a bf16 / fp32
copy) and fp32 squared norms on its device, slice by slice, and fp16 rows for re-scoring.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch

from . import kernel
from .devices import working_bytes
from .fp16 import peak_scale

Columns = dict[str, np.ndarray | list]
"""Named columns of the ranked table, one value per image."""


class FeatureSource(Protocol):
    """What search reads: a cache, or arrays in memory (see `ArrayFeatures`)."""

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    @property
    def nonnegative(self) -> bool | None:
        """Every feature is ≥ 0 (post-ReLU layers): makes the fast score's bound relative to it.
        None: not known before a search reads them (the pairs kernel then takes each image's)."""
        ...

    @property
    def domains(self) -> np.ndarray | None:
        """(N,) each image's domain, for results limited per domain; None when there are none."""
        ...

    def chunks(
        self, device: torch.device, memory_budget: int | None = None, dtype: torch.dtype = torch.float16
    ) -> Iterator[tuple[int, torch.Tensor | list[torch.Tensor], torch.Tensor | None]]:
        """(start, features (n, h, w, C), fp32 squared norms (n, h, w)) on `device`: features held
        resident in `dtype` (fp16 as stored, or bf16 / fp32 where their products run faster —
        converted once; fp16 where that copy would not fit), streamed ones in fp16. They may come
        as a list of tensors holding consecutive images (files mapped in place); a chunk's tensors
        are only read until the next chunk is asked for. Norms None: the pairs kernel takes them
        (`UnpreparedArray`)."""
        ...

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """fp16 features of some images, (m, h, w, C) — for exact re-scoring."""
        ...

    def resident_on(self, device: torch.device) -> torch.Tensor | None:
        """The fp16 features if held whole on `device` (re-scored rows are then gathered there)."""
        ...

    def describe_rows(self, indices: np.ndarray, grid_boxes: list[tuple[int, int, int, int]]) -> Columns:
        """Columns the ranked table adds for some images (path, label, ...), one value per image:
        columns, not a frame, so that the table is built once (0.5 ms of pandas per search less)."""
        ...


RESIDENT_SLICE_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}
"""A resident source is scored in slices of at most this: the work per slice beyond the product
(≈ K + 12 small operations) is paid once per slice, and one large product runs faster than two.
On a GPU that work is launches the host makes while the GPU waits: on an H200, N = 20,000 at
14×14×1024 ran 6.7 / 10.9 ms (square3 / blob, cells form) in 4 GiB slices against 7.4–11.7 /
16.4 ms in 1 GiB ones (a noisy host; at 50,000 × 7×7×2048 no change, 11.8 against 12.0 ms).
Above the CPU's 1 GiB a GPU's slice is at most 1/16 of its free memory: the cells form's product
outputs and their copy take 4·K/C of a slice (2× at C = 64, K = 32), beside the features."""


def resident_slices(n: int, row_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    """`even_slices` of a resident source on `device`."""
    limit = working_bytes(RESIDENT_SLICE_BYTES, device, free_share=16, floor=RESIDENT_SLICE_BYTES["cpu"])
    return even_slices(n, row_bytes, limit)


def even_slices(n: int, row_bytes: int, slice_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest slices of n rows within slice_bytes each, of near-equal sizes
    (no small tail)."""
    count = max(1, math.ceil(n * row_bytes / max(1, slice_bytes)))
    edges = [round(i * n / count) for i in range(count + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def gather_rows(x: torch.Tensor, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows `indices` of an (N, ...) tensor, as a new tensor on its device. index_select on a 2-D
    view: on the 4-D tensor, torch's CPU kernel copies element by element, ~20× slower (and
    fancy indexing slower still). One row (a query's image) is a slice copied: no index to copy
    to a GPU first."""
    if isinstance(indices, np.ndarray) and len(indices) == 1 and 0 <= int(indices[0]) < len(x):
        i = int(indices[0])
        return x[i : i + 1].clone(memory_format=torch.contiguous_format)
    index = torch.as_tensor(indices, dtype=torch.long, device=x.device)
    return x.reshape(len(x), -1).index_select(0, index).view(len(index), *x.shape[1:])


CONVERT_BLOCK_BYTES = 4 << 20
"""fp32 bytes per block of a CPU conversion to bf16 (`copy_converted`): fits a core's L2/L3 share."""


def copy_converted(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`dst.copy_(src)`, from fp16 to bf16 on the CPU in blocks through one reused fp32 buffer:
    torch converts fp16 → bf16 directly at ≈ 1 GB/s, the two exact-then-rounding steps in
    cache-sized blocks about twice as fast, with the same result (fp16 → fp32 is exact)."""
    if not (dst.device.type == src.device.type == "cpu" and dst.dtype == torch.bfloat16 and dst.ndim):
        return dst.copy_(src)
    flat_dst, flat_src = dst.view(-1, dst.shape[-1]), src.reshape(-1, src.shape[-1])
    rows = max(1, CONVERT_BLOCK_BYTES // (4 * dst.shape[-1]))
    buffer = torch.empty(min(rows, len(flat_src)), dst.shape[-1], dtype=torch.float32)
    for a in range(0, len(flat_src), rows):
        block = buffer[: len(flat_src[a : a + rows])].copy_(flat_src[a : a + rows])
        flat_dst[a : a + rows].copy_(block)
    return dst


def converted(fp16: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """fp16 features as operands in `dtype` on `device` (default: where they are): the tensor itself
    where nothing changes, else a copy (`copy_converted`). What every resident source holds beside
    its fp16 features for the chosen operand type."""
    device = fp16.device if device is None else device
    if dtype == torch.float16:
        return fp16.to(device)
    return copy_converted(torch.empty(fp16.shape, dtype=dtype, device=device), fp16)


SQNORM_BLOCK_BYTES = 4 << 20
"""fp32 bytes of the one buffer `ArrayFeatures` converts the features into, block by block, for
their squared norms: cache-sized, reused (a fresh fp32 copy costs its page faults, ≈ 3× the pass)."""


@torch.no_grad()
def _fp16_and_sqnorms(
    t: torch.Tensor, copy: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`t` (times `scale`, when given) as contiguous fp16 (`t` itself when it is one: no copy),
    each cell's squared norm in fp32, and whether every value is ≥ 0 — by the compiled kernel where
    `t` is contiguous fp16 on the CPU and no copy is asked for, else in one pass over `t`, a few
    images at a time: each block (converted to fp16 first where `t` is not) goes into one reused
    fp32 buffer, read there for its norms and its least value while in cache (and written into
    `copy`, when given: an operand copy in bf16 or fp32)."""
    n, h, w, c = t.shape
    if t.dtype == torch.float16 and t.is_contiguous() and scale is None:
        fp16 = t
    else:
        fp16 = torch.empty(t.shape, dtype=torch.float16, device=t.device)
    sqnorm = torch.zeros(n, h, w, device=t.device)
    if not t.numel():
        return fp16, sqnorm, True
    # One read where the kernel is built (3-5× faster than the blocks); the same on every call of
    # every process of this machine and VFS_KERNEL, so sources prepared anywhere agree bit for bit.
    lib = kernel.library() if fp16 is t and copy is None and t.device.type == "cpu" else None
    if lib is not None:
        sqnorm, nonnegative = kernel.squared_norms(lib, t)
        return fp16, sqnorm, nonnegative
    step = max(1, SQNORM_BLOCK_BYTES // (4 * h * w * c))  # images per block
    buffer = torch.empty(min(step, n), h, w, c, device=t.device)
    least = torch.empty(math.ceil(n / step), device=t.device)
    for i, a in enumerate(range(0, n, step)):
        block = fp16[a : a + step]
        if fp16 is not t:
            block.copy_(t[a : a + step] if scale is None else t[a : a + step] * scale)
        block = buffer[: len(block)].copy_(block)
        torch.amin(block, out=least[i])  # before the norms: the block is hotter in cache
        torch.linalg.vector_norm(block, dim=-1, out=sqnorm[a : a + step])
        if copy is not None:
            copy[a : a + step].copy_(block)
    return fp16, sqnorm.square_(), bool((least >= 0).all())


def some_images(indices: Sequence[int] | np.ndarray) -> str:
    """Images named in an error: "image(s) 3, 17, … (12 in all)", the first five."""
    if not len(indices):
        return "no image"
    shown = ", ".join(map(str, list(indices[:5]))) + (", …" if len(indices) > 5 else "")
    return f"image(s) {shown} ({len(indices)} in all)"


def nonfinite_features(sqnorm: torch.Tensor) -> ValueError:
    """The error for an array whose cells' squared norms (n, h, w) are not all finite: which images."""
    bad = torch.nonzero(~torch.isfinite(sqnorm.reshape(len(sqnorm), -1)).all(1)).flatten().tolist()
    return ValueError(
        f"the features of {some_images(bad)} contain NaN or inf: fix or drop them "
        "(np.isfinite(features).all(axis=(1, 2, 3)) is False for each)"
    )


def fp16_with_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An `UnpreparedArray`'s slice as its contiguous fp16 copy (itself where it is one) and each
    cell's squared norm (fp32), (n, h, w, C) → (n, h, w), summed as for the copy wherever the slice
    came from: for a form other than the pairs kernel's (a test's forced one, Triton's
    interpreted)."""
    own = x.dtype == torch.float16 and x.is_contiguous()
    fp16 = x if own else torch.empty(x.shape, dtype=torch.float16).copy_(x)
    _, sqnorm, _ = _fp16_and_sqnorms(fp16)
    return fp16, sqnorm


FP16_SAFE_SQNORM = 2.0**-12
"""The least largest squared cell norm of an array taken in fp16 as it is: cells of norm ≥ 2⁻⁶
hold values of fp16's normal range (≥ 2⁻¹⁴). A smaller array loses its values' bits to fp16's
subnormals, or every value, and is scaled first (`_fp16_scale`)."""


def _fp16_holds(largest_sqnorm: float) -> bool:
    """Whether an array whose fp16 copy's largest squared cell norm is this keeps its values in
    fp16 as it is: no cell infinite (overflow), not every one tiny (underflow)."""
    return FP16_SAFE_SQNORM <= largest_sqnorm < math.inf


def _fp16_scale(t: torch.Tensor, sqnorm: torch.Tensor) -> float | None:
    """The power of two that takes an array's largest |value| to [8, 16) where its fp16 copy lost
    range (`_fp16_holds` not), else None: the usual case, decided by one max over the norms.
    Scaling changes no cosine, and a power of two changes no bit of a value."""
    largest = float(sqnorm.max()) if sqnorm.numel() else 0.0
    if _fp16_holds(largest) or not t.numel():
        return None
    low, high = torch.aminmax(t)
    peak = max(-float(low), float(high))
    if peak == 0 or not math.isfinite(peak):  # all zero, or NaN / inf in the array: refused later
        return None
    return peak_scale(peak)


class ArrayFeatures:
    """An (N, h, w, C) array held in memory as a search source (tests, notebooks, benchmarks)."""

    domains: np.ndarray | None = None

    def __init__(
        self,
        features: np.ndarray | torch.Tensor,
        slice_bytes: int | None = None,
        cpu_dtype: torch.dtype = torch.float16,
        domains: Sequence[object] | np.ndarray | None = None,
    ):
        """`cpu_dtype`: the operand type CPU searches will ask for (`vfs.scoring.fast_dtype`); a
        bf16 or fp32 copy is written in the preparing pass rather than in one more pass at the
        first search. `slice_bytes`: the slices it is scored in (default: the device's
        `RESIDENT_SLICE_BYTES`). `domains`: one per image (e.g. PACS's photo / sketch), for
        `search_regions`'s `per_domain`."""
        t = _as_tensor(features)
        if t.ndim != 4:
            raise ValueError(f"features must be (N, h, w, C); got shape {tuple(t.shape)}")
        if domains is not None:
            self.domains = np.asarray(domains, dtype=object)
            if self.domains.shape != (len(t),):
                raise ValueError(
                    f"domains must have one entry per image ({len(t)}); got shape {self.domains.shape}"
                )
        self.cpu_dtype = cpu_dtype
        copy = (
            None
            if cpu_dtype == torch.float16 or t.device.type != "cpu"
            else torch.empty(t.shape, dtype=cpu_dtype)
        )
        self._fp16, self._sqnorm, self.nonnegative = _fp16_and_sqnorms(t, copy)
        scale = _fp16_scale(t, self._sqnorm)
        if scale is not None:  # values beyond fp16's range either way
            self._fp16, self._sqnorm, self.nonnegative = _fp16_and_sqnorms(t, copy, scale)
        if not torch.isfinite(self._sqnorm).all():
            raise nonfinite_features(self._sqnorm)
        self._slice_bytes = slice_bytes
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        if copy is not None:
            self._on[torch.device("cpu"), cpu_dtype] = (copy, self._sqnorm)

    @classmethod
    def _reusing(cls, features: np.ndarray | torch.Tensor, kept: _Kept) -> ArrayFeatures:
        """The source of `features` from the preparation `prepared` kept of it."""
        source = cls.__new__(cls)
        source.cpu_dtype, source._slice_bytes = kept.cpu_dtype, None
        source._fp16 = _as_tensor(features) if kept.fp16_copy is None else kept.fp16_copy
        source._sqnorm, source.nonnegative, source._on = kept.sqnorm, kept.nonnegative, kept.copies
        return source

    def _kept(self, features: np.ndarray | torch.Tensor, version: tuple) -> _Kept:
        """What `prepared` keeps between calls: none of the array's own memory (the fp16 features
        only where they are a copy; operand copies never are), so that dropping it frees it."""
        own = self._fp16.untyped_storage().data_ptr() == _as_tensor(features).untyped_storage().data_ptr()
        return _Kept(
            version, None if own else self._fp16, self._sqnorm, self.nonnegative, self.cpu_dtype, self._on
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self._fp16.shape
        return n, h, w, c

    def __repr__(self) -> str:
        n, h, w, c = self.shape
        domains = "" if self.domains is None else f", {len(set(self.domains))} domains"
        return f"ArrayFeatures({n} images × {h}×{w}×{c}, held in fp16{domains})"

    def chunks(
        self, device: torch.device, memory_budget: int | None = None, dtype: torch.dtype = torch.float16
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if dtype == torch.float16 and device == self._fp16.device:
            x, s = self._fp16, self._sqnorm  # the features as held: no copy, none kept
        else:
            if (device, dtype) not in self._on:
                self._on[device, dtype] = (converted(self._fp16, dtype, device), self._sqnorm.to(device))
            x, s = self._on[device, dtype]
        n, row_bytes = len(x), math.prod(x.shape[1:]) * 2
        if self._slice_bytes is None:
            slices = resident_slices(n, row_bytes, device)
        else:
            slices = even_slices(n, row_bytes, self._slice_bytes)
        for a, b in slices:
            yield a, x[a:b], s[a:b]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        return gather_rows(self._fp16, indices).cpu().numpy()

    def resident_on(self, device: torch.device) -> torch.Tensor | None:
        if self._fp16.device == device:  # the array as passed, wherever it lives
            return self._fp16
        held = self._on.get((device, torch.float16))
        return None if held is None else held[0]

    def describe_rows(self, indices: np.ndarray, grid_boxes: list[tuple[int, int, int, int]]) -> Columns:
        """Bare arrays know nothing of their images but the domains they were given."""
        return {} if self.domains is None else {"domain": self.domains[np.asarray(indices, dtype=np.int64)]}


FP16_OVERFLOW = 65520.0
"""The least |fp32 value| that rounds to an infinite fp16 (to nearest: halfway past 65,504)."""


class BeyondFp16(ValueError):
    """An fp32 array searched unprepared (`UnpreparedArray`) holds values its fp16 copy loses:
    beyond fp16's largest, or all so small that they fall to its subnormals. `search_regions`
    then searches an `ArrayFeatures` of it, scaled by a power of two first."""


class UnpreparedArray:
    """An fp16 or fp32 array on the CPU searched as it is, on every call: the pairs kernel takes
    each cell's squared norm in the pass that reads it (`PairKernel.best_placements`, `fill`), and
    rounds fp32 values to fp16 as it loads them — the answers of the array's fp16 copy, as
    `ArrayFeatures` holds it, without the copy. Nothing is prepared before a search nor kept after
    it, so a changed array is never searched stale, however it was changed — what `search_regions`
    makes of such an array where the kernel runs. The array is contiguous, or the (N, h, w, C) view
    of a contiguous (N, C, h, w) one (a CNN's output, permuted: `kernel.channels_first`), which the
    kernel reads as it is."""

    domains: np.ndarray | None = None
    nonnegative: bool | None = None  # not known before the kernel reads it: bounded for either sign

    def __init__(self, features: np.ndarray | torch.Tensor):
        if not self.takes(features):
            raise ValueError(
                "an UnpreparedArray is an (N, h, w, C) fp16 or fp32 array on the CPU, contiguous or a"
                " channels-first one's permuted view"
            )
        self._array = _as_tensor(features).detach()

    @staticmethod
    def takes(features: np.ndarray | torch.Tensor) -> bool:
        """Whether `features` can be searched without a preparation (else: `ArrayFeatures`)."""
        if isinstance(features, np.ndarray):
            if min(features.strides, default=0) < 0:  # torch takes no negative strides
                return False
            features = _as_tensor(features)
        return (
            features.ndim == 4
            and features.dtype in (torch.float16, torch.float32)
            and features.device.type == "cpu"
            and (features.is_contiguous() or kernel.channels_first(features))
        )

    @property
    def array(self) -> torch.Tensor:
        """The array searched (no copy): `search_regions` given this source searches it anew."""
        return self._array

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self._array.shape
        return n, h, w, c

    def chunks(
        self, device: torch.device, memory_budget: int | None = None, dtype: torch.dtype = torch.float16
    ) -> Iterator[tuple[int, torch.Tensor | list[torch.Tensor], torch.Tensor | None]]:
        """The array's slices as they are (a channels-first view's too), with no norms: the pairs
        kernel's pass takes them (`check_norms` after it)."""
        x = self._array
        if device.type != "cpu" or dtype != x.dtype:
            raise ValueError(f"it is searched in {x.dtype} on the CPU, not {dtype} on {device}")
        for a, b in resident_slices(len(x), x[:1].nbytes, device):
            yield a, x[a:b], None

    def check_norms(self, sqnorm: torch.Tensor) -> None:
        """After the kernel's pass, its squared norms of every cell: ValueError where a value is
        NaN or infinite; `BeyondFp16` where an fp32 array's fp16 copy loses its values, as
        `ArrayFeatures` decides it (`_fp16_holds`) — on norms summed in another order than its
        own, so a largest norm within their rounding of the limit goes to `ArrayFeatures` too."""
        if self._array.dtype == torch.float16:
            if not bool(torch.isfinite(sqnorm).all()):
                raise nonfinite_features(sqnorm)
            return
        largest = float(sqnorm.max()) if sqnorm.numel() else FP16_SAFE_SQNORM
        if not _fp16_holds(largest / (1 + (2 * self._array.shape[-1] + 8) * 2.0**-24)):  # NaN too
            raise BeyondFp16("the array holds values fp16 cannot: NaN, inf, beyond ±65,504 or all tiny")

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """fp16 rows, an fp32 array's rounded as the kernel reads them. `BeyondFp16` where one
        becomes infinite (the whole array is then scaled); and where every value is below fp16's
        normal range but not every one zero, if the whole array is so small that its copy is
        scaled (a query of such rows could round to zero and be refused before `check_norms`)."""
        if self._array.is_contiguous():
            rows = gather_rows(self._array, indices)
        else:  # a channels-first view: from its own memory, then channels last
            rows = gather_rows(self._array.permute(0, 3, 1, 2), indices).permute(0, 2, 3, 1).contiguous()
        if rows.dtype == torch.float16:
            return rows.numpy()
        low, high = torch.aminmax(rows) if rows.numel() else (torch.zeros(()), torch.zeros(()))
        peak = max(-float(low), float(high))
        if not peak < FP16_OVERFLOW:  # NaN too: the preparation names it
            raise BeyondFp16("these rows hold values fp16 cannot: NaN, inf or beyond ±65,504")
        if 0 < peak < torch.finfo(torch.float16).smallest_normal:  # rare: one more pass, to decide
            _, sqnorm, _ = _fp16_and_sqnorms(self._array)
            if not _fp16_holds(float(sqnorm.max())):
                raise BeyondFp16("the array's values are all below fp16's normal range")
        return rows.to(torch.float16).numpy()

    def resident_on(self, device: torch.device) -> torch.Tensor | None:
        """The array where it is the fp16 features, contiguous; other rows come from `rows`."""
        x = self._array
        return x if device.type == "cpu" and x.dtype == torch.float16 and x.is_contiguous() else None

    def describe_rows(self, indices: np.ndarray, grid_boxes: list[tuple[int, int, int, int]]) -> Columns:
        return {}


def _as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The array as a tensor on its memory (no copy; a copy of a numpy view with negative strides,
    `a[::-1]` or `np.flip`'s, which no tensor can view); complex numbers refused (their imaginary
    parts would be dropped with no more than a warning)."""
    if isinstance(features, np.ndarray) and any(stride < 0 for stride in features.strides):
        features = features.copy()
    with warnings.catch_warnings():  # a read-only array: only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.as_tensor(features)
    if tensor.is_complex():
        raise ValueError(f"features must be real numbers, not {tensor.dtype}")
    return tensor


@dataclass(frozen=True)
class _Kept:
    """An array's preparation between calls (`ArrayFeatures._kept`)."""

    version: tuple  # `_unchanged_since` when it was prepared
    fp16_copy: torch.Tensor | None  # None: the array itself is the fp16 features
    sqnorm: torch.Tensor
    nonnegative: bool
    cpu_dtype: torch.dtype
    copies: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


PREPARED_ARRAYS = 4
"""Arrays whose preparation `prepared` keeps for the next call: a notebook's few. An array's entry
goes when the array does."""
_prepared: OrderedDict[int, tuple[weakref.ref, _Kept]] = OrderedDict()
_prepared_lock = threading.Lock()


_gone: list[tuple[int, weakref.ref]] = []  # arrays gone while the lock was held: forgotten next call


def _forget(key: int, ref: weakref.ref) -> None:
    """The array of `ref` is gone: so is its preparation (unless the key holds a newer array's). A
    weakref callback runs wherever the array dies, maybe inside `prepared` while it holds the lock
    (a garbage collection during its allocations): then the entry goes at the next call."""
    if not _prepared_lock.acquire(blocking=False):
        _gone.append((key, ref))
        return
    try:
        if key in _prepared and _prepared[key][0] is ref:
            del _prepared[key]
    finally:
        _prepared_lock.release()


def prepared(features: np.ndarray | torch.Tensor, cpu_dtype: torch.dtype = torch.float16) -> ArrayFeatures:
    """`ArrayFeatures(features, cpu_dtype=cpu_dtype)`, reused across calls while the array has not
    changed as far as its own bookkeeping tells: a GPU tensor whose version counter (bumped by
    every in-place write through it) is the same, or a numpy array that is read-only, as is every
    array it views (README: writes that bypass these are not seen). Any other array — a CPU tensor
    too: numpy writes to its memory (`torch.from_numpy(a)`, then `a[i] = …`) bump no counter — is
    prepared anew, in fp16 only: its squared norms are one more pass over it, but never stale; a
    bf16 copy for one search would cost about what it saves."""
    version = _unchanged_since(features)
    if version is None:
        return ArrayFeatures(features)
    key = id(features)
    with _prepared_lock:
        while _gone:
            gone, ref = _gone.pop()
            if gone in _prepared and _prepared[gone][0] is ref:
                del _prepared[gone]
        held = _prepared.get(key)
        kept = held[1] if held is not None and held[0]() is features and held[1].version == version else None
        if kept is not None:
            _prepared.move_to_end(key)
    if kept is not None:
        return ArrayFeatures._reusing(features, kept)
    source = ArrayFeatures(features, cpu_dtype=cpu_dtype)
    with _prepared_lock:
        _prepared[key] = (weakref.ref(features, partial(_forget, key)), source._kept(features, version))
        while len(_prepared) > PREPARED_ARRAYS:
            _prepared.popitem(last=False)
    return source


def _unchanged_since(features: np.ndarray | torch.Tensor) -> tuple | None:
    """What must be equal for `features` to be unchanged, or None where nothing can tell."""
    if isinstance(features, torch.Tensor):
        # on the CPU a numpy array may share its memory; under inference mode no counter is kept
        if features.device.type == "cpu" or features.is_inference():
            return None
        return (
            features._version,
            features.data_ptr(),
            tuple(features.shape),
            tuple(features.stride()),
            features.dtype,
        )
    array: object = features
    while isinstance(array, np.ndarray):
        if array.flags.writeable:
            return None
        array = array.base
    if array is not None:  # a view of a buffer numpy does not own (mmap, bytes, …): may change
        return None
    return features.__array_interface__["data"][0], features.shape, features.strides, features.dtype.str
