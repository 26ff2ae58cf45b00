"""Where computation runs: one rule for builds and searches."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" → cuda, then mps, then cpu; anything else must exist here."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or mps") from error
    available: dict[str, Callable[[], bool]] = {
        "cuda": torch.cuda.is_available,
        "mps": torch.backends.mps.is_available,
    }
    if resolved.type in available and not available[resolved.type]():
        raise ValueError(f"device {device!r} is not available on this machine")
    return resolved


def device_choices() -> list[str]:
    """What `resolve_device` takes on this machine, as a form lists it: auto, cpu, each accelerator found."""
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return ["auto", "cpu", *(name for name, present in found.items() if present)]


def cuda_free_bytes(device: torch.device) -> int:
    """Memory a GPU can still give this process: what the driver reports free, plus what PyTorch's
    caching allocator holds but no tensor uses (the driver counts that as taken). Read from the
    allocator's nested statistics: `torch.cuda.memory_reserved` flattens all of them first, 0.7 ms
    of host time per call on an H200's host (a search asks twice)."""
    free, _ = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    held = stats.get("reserved_bytes", {}).get("all", {}).get("current", 0)
    used = stats.get("allocated_bytes", {}).get("all", {}).get("current", 0)
    return free + held - used


def working_bytes(limits: dict[str, int], device: torch.device, free_share: int, floor: int = 0) -> int:
    """A buffer size by device type (`limits`, the CPU's for any other type); on a GPU at most
    1/`free_share` of its free memory, but not under `floor`."""
    limit = limits.get(device.type, limits["cpu"])
    if device.type == "cuda":
        limit = min(limit, max(floor, cuda_free_bytes(device) // free_share))
    return limit


def memory_bytes(size: int | float | np.integer | np.floating | str) -> int:
    """A memory budget in bytes: a whole number, or text such as '2GB', '512 MiB', '1e9' (decimal and
    binary units) — the CLI's `--memory-budget` and `search_regions`'s take the same."""
    if isinstance(size, str):
        m = re.fullmatch(r"\s*([\d.eE+]+)\s*(?:([kKmMgGtT])(i?))?[bB]?\s*", size)
        try:
            if not m:
                raise ValueError
            unit = (m.group(2) or " ").upper()
            value = float(m.group(1)) * (1024 if m.group(3) else 1000) ** " KMGT".index(unit)
        except ValueError:  # "1.2.3", "e"
            raise ValueError(f"not a size: {size!r} (e.g. 2GB, 512MiB)") from None
        if not math.isfinite(value):
            raise ValueError(f"not a size: {size!r} is beyond any memory")
    else:
        value = size
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not 1 <= value < math.inf:
        raise ValueError(f"a memory budget is a positive number of bytes (or e.g. '2GB'), not {size!r}")
    return int(value)
