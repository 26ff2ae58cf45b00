"""Shared helpers for the benchmarks: environment record, timing, memory, JSON output.

Not part of the package: the scripts in bench/ put the repository root on sys.path themselves.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def log(*args) -> None:
    """Progress goes to stderr; stdout carries exactly one JSON document."""
    print(*args, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_fp16",
    "amx_int8",
)


def cpu_isa() -> dict:
    """The CPU's family/model and which of the vector ISA flags that decide the search's kernels it
    has (/proc/cpuinfo): every figure is recorded with them, as machines differ from day to day."""
    info: dict = {"flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("cpu family", "model", "vendor_id") and key not in info:
                info[key] = value
            elif key == "flags":
                have = set(value.split())
                info["flags"] = [f for f in ISA_FLAGS if f in have]
                break
    except OSError:
        pass
    return info


def git_state() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": run("git", "rev-parse", "--short", "HEAD"),
        "dirty_files": [
            line[3:]
            for line in run("git", "status", "--porcelain").splitlines()
            if line[3:].startswith("vfs/")
        ],
    }


def environment(device: torch.device) -> dict:
    """What the figures were measured on (goes into every JSON document)."""
    env = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": cpu_isa(),
        # what limits or overrides the choices above (an AVX2 proxy on an AVX-512 CPU sets the first two)
        "settings": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "VFS_KERNEL", "VFS_FAST_DTYPE")
            if k in os.environ
        },
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "device": str(device),
        "versions": {},
        "git": git_state(),
    }
    for name in ("torch", "numpy", "zarr", "visualfeaturesearch", "timm"):
        try:
            env["versions"][name] = version(name)
        except PackageNotFoundError:
            env["versions"][name] = None
    from vfs.kernel import library
    from vfs.scoring import fast_dtype  # the operand type search chose here (VFS_FAST_DTYPE)

    # per channel count of the grid's layers (Lite0 blocks.5, ViT-B/16, R50 layer3, layer4)
    env["vfs_fast_dtype"] = {
        c: str(fast_dtype(device, c)).removeprefix("torch.") for c in (192, 768, 1024, 2048)
    }
    lib = library()  # the pairs kernel (VFS_KERNEL), where it is built
    env["vfs_kernel"] = (
        None if lib is None else {"lanes": lib.lanes, "dtypes": sorted(str(d)[6:] for d in lib.dtypes)}
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(milliseconds, result) of one call, device work included."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3, out


def timed_metered(fn, device: torch.device):
    """(milliseconds, result, share of the CPUs other processes used meanwhile) of one call."""
    with CpuMeter() as m:
        ms, out = timed(fn, device)
    return ms, out, m.result["foreign_cpu_frac"]


QUIET = 0.10  # a repeat counts as quiet when other processes used < 10% of the CPUs during it


def summary(times_ms: list[float], foreign: list[float] | None = None) -> dict:
    """min / median of repeats; with `foreign` (per-repeat share of the CPUs other processes used)
    also the median over the quiet repeats only."""
    if not times_ms:
        return {"min_ms": None, "median_ms": None, "repeats": 0, "times_ms": []}
    out = {
        "min_ms": round(min(times_ms), 3),
        "median_ms": round(float(np.median(times_ms)), 3),
        "repeats": len(times_ms),
        "times_ms": [round(t, 3) for t in times_ms],
    }
    if foreign is not None:
        quiet = [t for t, f in zip(times_ms, foreign) if f < QUIET]
        out |= {
            "foreign_cpu_frac": [round(f, 3) for f in foreign],
            "quiet_repeats": len(quiet),
            "quiet_median_ms": round(float(np.median(quiet)), 3) if quiet else None,
        }
    return out


def vm_status(key: str) -> int | None:
    """A /proc/self/status field in bytes (VmHWM = peak resident set, VmRSS = current)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def emit(doc: dict, out: str | None, indent: int | None = 2) -> None:
    """Print the JSON document to stdout, and also write it to `out` when given (indent=None: one line)."""
    text = json.dumps(doc, indent=indent, default=_jsonable)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        log(f"wrote {out}")
    print(text)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o)}")


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f[:8]) - idle, sum(f[:8])


class CpuMeter:
    """How much of the machine other processes used while we measured (this is a shared box).

    `foreign_cpu_frac` = (all CPUs' busy time − this process's CPU time, children included) /
    (wall time × CPU count): 0 means we had the machine to ourselves. /proc/stat ticks are 10 ms,
    so it is only meaningful over measurements of a second or more.
    """

    def __enter__(self) -> CpuMeter:
        self.t0, self.own0, self.busy0 = time.perf_counter(), _own_cpu(), _busy_jiffies()[0]
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        own = _own_cpu() - self.own0
        busy = (_busy_jiffies()[0] - self.busy0) / os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        self.result = {
            "wall_s": round(wall, 3),
            "own_cpu_s": round(own, 3),
            "all_busy_s": round(busy, 3),
            "foreign_cpu_frac": round(max(0.0, busy - own) / max(wall * ncpu, 1e-9), 3),
        }


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(max_wait_s: float = 300, threshold: float = 0.10, window_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until the whole machine is < threshold busy over window_s; returns that fraction.

    For a shared box: start a measurement when other people's jobs are not running.
    """
    deadline = time.time() + max_wait_s
    frac = 1.0
    while True:
        b0, t0 = _busy_jiffies()
        time.sleep(window_s)
        b1, t1 = _busy_jiffies()
        frac = (b1 - b0) / max(1, t1 - t0)
        if frac < threshold or time.time() > deadline:
            return frac
        time.sleep(1.0)


if __name__ == "__main__":  # python bench/_common.py wait-quiet [max seconds]
    if sys.argv[1:2] == ["wait-quiet"]:
        t = time.time()
        f = wait_quiet(float(sys.argv[2]) if len(sys.argv) > 2 else 300)
        log(f"machine busy fraction {f:.2f} after waiting {time.time() - t:.0f} s")
