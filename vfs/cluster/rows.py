"""A contiguous row range of a cache held resident: what one search shard searches.

Only the range is read (features and their stored squared norms), so a shard holds its share of
the cache and nothing more; indices it takes and reports are local to the range (0 = `start`).
The cache's stored squared norms are used as they are, so the shard's fast scores and bounds are
computed from exactly what a search of the whole cache uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..cache import FeatureCache
from ..sources import Columns, converted, even_slices, gather_rows, resident_slices

LOAD_BLOCK_BYTES = 256 << 20
"""Features read per step while a shard loads its rows."""


class CacheRows:
    """Rows start..stop-1 of a cache, resident on `device`: a search source (`vfs.sources.FeatureSource`)."""

    def __init__(self, cache: FeatureCache, start: int, stop: int, device: torch.device):
        n = cache.shape[0]
        if not 0 <= start < stop <= n:
            raise ValueError(f"rows {start}..{stop - 1} are not within the cache's 0..{n - 1}")
        self.cache, self.start, self.stop = cache, start, stop
        _, h, w, c = cache.shape
        self._x = torch.empty((stop - start, h, w, c), dtype=torch.float16, device=device)
        self._sq = torch.empty((stop - start, h, w), dtype=torch.float32, device=device)
        # Block by block into the device's tensors (a shard of 32 GB on a GPU never needs 32 GB of host
        # memory), read as a resident search reads them: a missing or truncated chunk file, or a NaN /
        # inf squared norm, is a CacheError naming the rows.
        for a, b in even_slices(stop - start, h * w * c * 2, LOAD_BLOCK_BYTES):
            features, sq = cache.read_range(start + a, start + b)
            self._x[a:b].copy_(torch.from_numpy(features))
            self._sq[a:b].copy_(torch.from_numpy(sq))
        self._held: dict[torch.dtype, torch.Tensor] = {torch.float16: self._x}
        self._slices = resident_slices(stop - start, h * w * c * 2, self._x.device)
        domains = cache.domains
        self.domains = None if domains is None else domains[start:stop]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self._x.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self._x.device

    @property
    def nonnegative(self) -> bool:
        return self.cache.nonnegative

    @property
    def nbytes(self) -> int:
        """Bytes held resident (features and squared norms)."""
        return self._x.nbytes + self._sq.nbytes

    def chunks(
        self, device: torch.device, memory_budget: int | None = None, dtype: torch.dtype = torch.float16
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if device != self._x.device:
            raise ValueError(f"this shard holds its rows on {self._x.device}, not {device}")
        if dtype not in self._held:  # as a resident cache does: a copy in the operand type, made once
            self._held[dtype] = converted(self._x, dtype)
        x = self._held[dtype]
        for a, b in self._slices:
            yield a, x[a:b], self._sq[a:b]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        return gather_rows(self._x, indices).cpu().numpy()

    def resident_on(self, device: torch.device) -> torch.Tensor | None:
        return self._x if device == self._x.device else None

    def describe_rows(self, indices: np.ndarray, grid_boxes: list[tuple[int, int, int, int]]) -> Columns:
        return self.cache.describe_rows(np.asarray(indices, dtype=np.int64) + self.start, grid_boxes)
