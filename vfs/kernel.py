"""The "pairs" form's compiled kernel (`kernel.c`) on x86 CPUs: per image, one dot product for each
(data cell, query cell) pair that some placement uses, read from the fp16 features as stored
(F16C, fp32 multiply-adds), from fp32 ones rounded to fp16 as they are read (a notebook's fp32
array searched as its fp16 copy, without the copy), or from a bf16 copy (AVX512-BF16 dot
products), sums in fp32; in a
search, each image's placements are then scored and bounded in the same pass (`best_placements`:
no (placements, n) arrays and no torch operators over them, which took 0.9–3 ms of a 10,000-image
search on Zen 4 where the kernel now spends 0.3–0.9 ms).

oneDNN's products score every cell against every query cell (cells form) or whole rows padded
with zeros (band form): 2–2.3× the pairs a 3×3 region needs on a 7×7 grid; and without
AVX512-FP16 or AMX its fp16 products run far below the read speed. The source is compiled once per
machine and compiler (`-O3 -march=native`, 256-bit where torch dispatches to AVX2 only) by the C
compiler found ($CC, cc, gcc, clang) into the user's cache folder, then loaded with ctypes.
Without a compiler, or on a CPU without AVX2 + F16C + FMA, `library()` is None and the oneDNN
forms run: the same exact top-k. `VFS_KERNEL=off` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernel.c")
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_ARGS: list[Any] = [_P, _I64, _I64, _I32, _I32, _P, _I32, _P, _P, _P, _I32, _P, _I64, _P, _P]
_TEAM_ARGS: list[Any] = [_P, _P, _P, ctypes.c_int, ctypes.c_int, _P, _I64, *_ARGS[3:]]  # team, n
_BF16_WIDTH = 32  # bf16 values per AVX-512 vector
_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # kernel.c's F16, BF16, F32
_CHANNELS_FIRST = {torch.float16: 3, torch.float32: 4}  # CF16, CF32
_WHOLE_GRID = {torch.float16: 5, torch.float32: 6}  # WCF16, WCF32: channels-first, one placement
_BITS = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 4}  # of vfs_kernel_info: built
_FUNCTIONS = {d: f"vfs_pairs_{name}" for d, name in zip(_KINDS, ("f16", "bf16", "f32"))}


class _Best(ctypes.Structure):
    """kernel.c's `struct vfs_best`: where the kernel scores each image's placements itself."""

    _fields_ = [
        ("sq", _P),
        ("m2", _P),
        ("origin", _P),
        *((name, _I32) for name in ("k", "ph", "pw", "w")),
        *((name, ctypes.c_float) for name in ("qnorm", "smallest", "output_error", "weight_term", "scale")),
        ("best", _P),
        ("upper", _P),
        ("runner", _P),
        ("where", _P),
        ("fill", _I32),
    ]


@dataclass(frozen=True)
class Library:
    """The compiled kernel: which operand types it has, and its fp16 vector width."""

    cdll: ctypes.CDLL
    dtypes: frozenset[torch.dtype]
    lanes: int

    def function(self, dtype: torch.dtype):
        return getattr(self.cdll, _FUNCTIONS[dtype])

    def width(self, dtype: torch.dtype) -> int:
        """Channels per vector: the weights are zero-padded to a multiple of it."""
        return _BF16_WIDTH if dtype == torch.bfloat16 else self.lanes


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("VFS_KERNEL_DIR") or Path(root) / "vfs")


def compiler() -> str | None:
    """The C compiler the kernel is built with: $CC, cc, gcc or clang, the first found."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model and flags (a home folder may be shared
    between machines)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor()


def build(flags: tuple[str, ...] = ("-march=native",)) -> Library | None:
    """Compile (once: the result is kept in `cache_dir()`, named by a hash of the source, the
    compiler, the flags and the CPU) and load the kernel; None where that is not possible."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cc = compiler()
    if cc is None:
        log.info("vfs: no C compiler found; the pairs kernel is off (oneDNN forms run)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_identity()]).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"pairs-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                cmd = [cc, "-O3", *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    log.info("vfs: the pairs kernel did not compile (%s): %s", cc, done.stderr[-500:])
                    return None
                os.replace(built, target)  # atomic: another process may be building the same
        cdll = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("vfs: the pairs kernel is off: %s", e)
        return None
    info = cdll.vfs_kernel_info()
    dtypes = {dtype for dtype, bit in _BITS.items() if info & bit}
    for dtype in dtypes:
        fn = getattr(cdll, _FUNCTIONS[dtype])
        fn.argtypes, fn.restype = _ARGS, None
    cdll.vfs_pairs_team.argtypes, cdll.vfs_pairs_team.restype = _TEAM_ARGS, None
    cdll.vfs_sqnorms_f16.argtypes, cdll.vfs_sqnorms_f16.restype = [_P, _I64, _I64, _I32, _P], ctypes.c_int
    cdll.vfs_sqnorms_team.argtypes = [_P, _P, _P, ctypes.c_int, _P, _I64, _I32, _P, _P]
    cdll.vfs_sqnorms_team.restype = None
    cdll.vfs_thread_floats.argtypes, cdll.vfs_thread_floats.restype = [_I32, ctypes.c_int, _I32, _I32], _I64
    cdll.vfs_pairs_channels_first.argtypes = [ctypes.c_int, *_ARGS]
    cdll.vfs_pairs_channels_first.restype = None
    cdll.vfs_whole_channels_first.argtypes = [ctypes.c_int, _P, _I64, _I64, _I32, _I32, _P, _I32, _P, _P, _P]
    cdll.vfs_whole_channels_first.restype = None
    cdll.vfs_whole_grid_block.argtypes, cdll.vfs_whole_grid_block.restype = [_I32, _I32, _P], _I32
    return Library(cdll, frozenset(dtypes), (info >> 8) & 0xFF)


def kernel_setting() -> str:
    """`VFS_KERNEL`: `auto` (the default), `on` or `off` — the compiled kernels, this CPU one and the
    GPU's Triton products (`vfs.triton_products`)."""
    choice = os.environ.get("VFS_KERNEL", "auto")
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"VFS_KERNEL={choice!r}: expected auto, on, off")
    return choice


def native_flags() -> tuple[str, ...]:
    """This CPU's instructions, but no wider vectors than PyTorch dispatches to: where its
    capability is limited to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, e.g. to keep a Xeon's clock up),
    the kernel's 256-bit build runs too."""
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return ("-march=native", "-mno-avx512f")
    return ("-march=native",)


@cache
def library() -> Library | None:
    """The kernel for this machine, built on first use; None where it is off or cannot be built."""
    return None if kernel_setting() == "off" else build(native_flags())


def squared_norms(lib: Library, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Each cell's squared norm (fp32) of contiguous fp16 features on the CPU, (n, h, w, C) →
    (n, h, w), and whether every value is ≥ 0 (none negative or NaN): one read of the features."""
    n, h, w, c = x.shape
    rows = n * h * w
    sq = torch.empty(n, h, w, dtype=torch.float32)
    threads = max(1, torch.get_num_threads())
    below = np.zeros(threads, np.int32)
    team = openmp()
    if team is not None:
        lib.cdll.vfs_sqnorms_team(*team, threads, x.data_ptr(), rows, c, sq.data_ptr(), below.ctypes.data)
    else:
        bounds = np.linspace(0, rows, threads + 1).astype(np.int64)

        def run(t: int) -> None:
            fn = lib.cdll.vfs_sqnorms_f16
            below[t] = fn(x.data_ptr(), int(bounds[t]), int(bounds[t + 1]), c, sq.data_ptr())

        list(_pool(threads).map(run, range(threads)))
    return sq, not below.any()


def channels_first(x: torch.Tensor) -> bool:
    """Whether an (N, h, w, C) tensor is a channels-first array's permuted view: its (N, C, h, w)
    memory contiguous, as a CNN's output permuted without moving it. The kernel reads such fp16
    and fp32 views as they are (kernel.c's CF16 / CF32: a few images at a time transposed in
    cache; under a region that covers the grid, WCF16 / WCF32: in order, one dot product per
    image), where torch's strided copy of one ran at a tenth of the memory's speed."""
    return x.ndim == 4 and x.permute(0, 3, 1, 2).is_contiguous()


@cache
def openmp() -> tuple[int, int, int] | None:
    """GOMP_parallel, omp_get_thread_num and omp_get_num_threads of the OpenMP runtime PyTorch
    runs its operators on (torch's own first, among the libraries mapped into the process), or
    None. The kernel runs on that team: threads of another pool would compete for the cores with
    the team's threads, which spin a while after each operator (2× slower, measured)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = {ln.split()[-1] for ln in maps.splitlines() if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", ln)}
    for path in sorted(found, key=lambda p: ("/torch/" not in p, p)):
        try:
            lib = ctypes.CDLL(path)
            names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
            found_at = (ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names)
            parallel, thread_num, num_threads = found_at
        except (OSError, AttributeError):
            continue
        if parallel and thread_num and num_threads:
            return parallel, thread_num, num_threads
    return None


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="vfs-pairs")


@dataclass(frozen=True)
class PairKernel:
    """One query's pairs on one grid, with its weights in the kernel's type for one operand type:
    fp16 features, and fp32 ones it rounds to fp16, → fp32 weights; bf16 features → bf16 weights,
    subnormals flushed to zero (as the instruction reads them)."""

    library: Library
    dtype: torch.dtype  # of the features it reads
    weights: torch.Tensor  # (K, cp), zero-padded channels
    start: np.ndarray  # (cells + 1,) int32: data cell d's pairs are start[d]..start[d+1]
    query_cell: np.ndarray  # (pairs,) int32
    placement: np.ndarray  # (pairs,) int32: py * pw + px
    shape: tuple[int, int]  # placements (ph, pw)
    origin: np.ndarray  # (K,) int32: the data cell (y·w + x) each query cell covers at placement (0, 0)
    grid: tuple[int, int]
    channels: int

    @classmethod
    def create(
        cls,
        library: Library,
        dtype: torch.dtype,
        weights: torch.Tensor,
        cells: tuple[tuple[int, int], ...],
        grid: tuple[int, int],
        placements: tuple[int, int],
    ) -> PairKernel:
        """`weights`: (K, C) float64, the query cells' kernel in `cells` order."""
        start, query_cell, placement = pair_tables(cells, grid, placements)
        width = library.width(dtype)
        c = weights.shape[1]
        padded = torch.zeros(len(weights), -(-c // width) * width, dtype=torch.float64)
        padded[:, :c] = weights
        return cls(
            library,
            dtype,
            kernel_weights(padded, dtype),
            start,
            query_cell,
            placement,
            placements,
            np.array([ky * grid[1] + kx for ky, kx in cells], np.int32),
            grid,
            c,
        )

    def numerator(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """(ph, pw, n) fp32 numerators of consecutive pieces of a chunk, (n_i, h, w, C) each."""
        n = sum(len(p) for p in parts)
        out = torch.empty(*self.shape, n, dtype=torch.float32)
        self._run(parts, lambda offset: (out.data_ptr() + 4 * offset, n, None))  # out[p, i]: p·n + i
        return out

    def best_placements(
        self,
        parts: list[torch.Tensor],
        sqnorm: torch.Tensor,
        m2: Sequence[float],
        qnorm: float,
        affine: tuple[float, float, float],
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        fill: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image of consecutive pieces of a chunk: its best fast score, that placement's index,
        the largest upper bound over its placements and the largest over its other placements
        (`out`: fp32, int64, fp32, fp32, each (n,)) — scored in the kernel as each image's
        numerators are summed (kernel.c's `best_of`). `sqnorm` (n, h, w) the cells' squared norms,
        `m2` (K,) the squared mask weights in the query cells' order, `affine` the bound's
        (output_error, weight_term, scale) (`FastBound.affine`).

        `fill` (fp16 or fp32 features): `sqnorm` is a contiguous fp32 buffer the kernel writes each
        cell's squared norm into, taken in the first block that reads the cell (its sum in another
        order than `squared_norms`', within the same bound), with nothing computed before; the sign
        of the features being unknown, `affine` must be the bound's for either sign. A NaN or an
        infinite value (or an fp32 one beyond fp16's range) leaves its cell's norm NaN or ∞: the
        caller checks them."""
        n = sum(len(p) for p in parts)
        if fill:
            if self.dtype == torch.bfloat16:
                raise ValueError("the kernel takes the norms of fp16 or fp32 features only")
            if sqnorm.dtype != torch.float32 or not sqnorm.is_contiguous() or len(sqnorm) != n:
                raise ValueError(f"the kernel writes the norms of {n} images into contiguous fp32")
            sq = sqnorm.view(n, -1)
        else:
            sq = sqnorm.reshape(len(sqnorm), -1).to(torch.float32).contiguous()
        output_error, weight_term, scale = affine
        weights = np.ascontiguousarray(m2, np.float32)
        best, where, upper, runner = out
        for t, dtype in zip(out, (torch.float32, torch.int64, torch.float32, torch.float32)):
            if t.dtype != dtype or t.device.type != "cpu" or t.shape != (n,) or not t.is_contiguous():
                found = f"{t.dtype} {tuple(t.shape)} on {t.device}"
                raise ValueError(f"the kernel writes contiguous {dtype} ({n},) on the CPU, not {found}")
        cells, origin = sq.shape[1], self.origin
        smallest = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps
        scalars = (len(origin), *self.shape, self.grid[1], qnorm, smallest, output_error, weight_term, scale)

        def epilogue(offset: int) -> tuple[int, int, Any]:
            at = (best, upper, runner, where)
            ends = (t.data_ptr() + t.element_size() * offset for t in at)
            rows = sq.data_ptr() + 4 * offset * cells
            best_of = _Best(rows, weights.ctypes.data, origin.ctypes.data, *scalars, *ends, int(fill))
            return 0, 0, ctypes.byref(best_of)

        self._run(parts, epilogue)
        return out

    @cached_property
    def _whole_grid(self) -> tuple[int, torch.Tensor] | None:
        """For a channels-first view under one placement that covers the grid (kernel.c's WCF16 /
        WCF32: read in order, not transposed): its block and the weights laid out as its images
        are; None where its sums could round more often than the pairs' (`summation_depth`, which
        the bound counts) — the view is then transposed as under other queries."""
        if self.shape != (1, 1) or self.dtype not in _WHOLE_GRID:
            return None
        c, cells = self.channels, self.grid[0] * self.grid[1]
        depth = ctypes.c_int32()
        block = self.library.cdll.vfs_whole_grid_block(c, cells, ctypes.byref(depth))
        if not block or depth.value > _pairs_depth(self.library, self.dtype, c, len(self.origin)):
            return None
        lanes = self.library.lanes
        # fp32 on the CPU whatever torch's defaults; zeros past the last value: whole vectors
        weights = torch.zeros(-(-c * cells // lanes) * lanes, dtype=torch.float32, device="cpu")
        weights[: c * cells].view(c, cells)[:, torch.from_numpy(self.origin).long()] = self.weights[:, :c].T
        return block, weights

    def _run(self, parts: list[torch.Tensor], outputs: Callable[[int], tuple[int, int, Any]]) -> None:
        """The kernel over each piece, its outputs for the piece at image `offset` given by
        `outputs(offset)`: numerators (pointer, stride) or a `_Best` (by reference). A piece that
        is a `channels_first` view (fp16 or fp32) is read as it is."""
        places = self.shape[0] * self.shape[1]
        threads = max(1, torch.get_num_threads())
        team = openmp()
        tables = (self.start.ctypes.data, self.query_cell.ctypes.data, self.placement.ctypes.data)
        offset = 0
        for part in parts:
            same = part.dtype == self.dtype and self.dtype in _CHANNELS_FIRST
            as_is = same and not part.is_contiguous() and channels_first(part)
            x = part if as_is else part.contiguous()
            kind = _CHANNELS_FIRST[self.dtype] if as_is else _KINDS[self.dtype]
            w, cp = self.weights.data_ptr(), self.weights.shape[1]
            if as_is and self._whole_grid is not None:  # the weights as the images lie; cp: the block
                kind, cp, w = _WHOLE_GRID[self.dtype], self._whole_grid[0], self._whole_grid[1].data_ptr()
            m, h, w_, c = x.shape
            floats = self.library.cdll.vfs_thread_floats(places, kind, h * w_, c)
            acc = np.empty((threads, floats), np.float32)  # per thread
            args = (h * w_, c, w, cp, *tables, places, *outputs(offset))
            if team is not None:
                run = self.library.cdll.vfs_pairs_team
                run(*team, threads, kind, x.data_ptr(), m, *args, acc.ctypes.data)
            else:  # a pool of our own, one image range per thread
                self._on_pool(kind, x, np.linspace(0, m, threads + 1).astype(np.int64), args, acc)
            offset += m

    def _on_pool(self, kind: int, x: torch.Tensor, bounds: np.ndarray, args: tuple, acc: np.ndarray) -> None:
        if kind in _WHOLE_GRID.values():  # (cells, c, weights, block, out, best) of `args`
            cells, c, w, block, *_, out, _stride, best = args
            args = (cells, c, w, block, out, best)
            fn = partial(self.library.cdll.vfs_whole_channels_first, kind)
        elif kind in _CHANNELS_FIRST.values():
            fn = partial(self.library.cdll.vfs_pairs_channels_first, kind)
        else:
            fn = self.library.function(self.dtype)

        def run(t: int) -> None:
            fn(x.data_ptr(), int(bounds[t]), int(bounds[t + 1]), *args, acc[t].ctypes.data)

        list(_pool(len(acc)).map(run, range(len(acc))))


@lru_cache(maxsize=256)
def pair_tables(
    cells: tuple[tuple[int, int], ...], grid: tuple[int, int], placements: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (data cell, query cell, placement) of a query, ordered by data cell: where each data
    cell's pairs start (cells + 1), their query cell and their placement (py·pw + px), int32."""
    (h, w), (ph, pw) = grid, placements
    ky, kx = np.array(cells).T.reshape(2, -1, 1, 1)
    py, px = np.arange(ph).reshape(1, -1, 1), np.arange(pw).reshape(1, 1, -1)
    k = np.broadcast_to(np.arange(len(cells)).reshape(-1, 1, 1), (len(cells), ph, pw)).ravel()
    cell = ((py + ky) * w + px + kx).ravel()
    place = np.broadcast_to(py * pw + px, (len(cells), ph, pw)).ravel()
    order = np.argsort(cell, kind="stable")
    start = np.searchsorted(cell[order], np.arange(h * w + 1)).astype(np.int32)
    return start, k[order].astype(np.int32), place[order].astype(np.int32)


def summation_depth(dtype: torch.dtype, channels: int, pairs: int) -> int:
    """The most fp32 roundings a product passes through in the kernel's sum of one placement
    (`pairs` pairs of `channels` channels; kernel.c): its chain over the channel vectors (two
    additions per bf16 dot-product instruction), the placement's sum over its pairs, the sum
    across lanes (a tree) — the n of Higham's γₙ bound, which holds for any order of these sums."""
    lib = library()
    if lib is None:
        raise RuntimeError("the pairs kernel is not built here")
    return _pairs_depth(lib, dtype, channels, pairs)


def _pairs_depth(lib: Library, dtype: torch.dtype, channels: int, pairs: int) -> int:
    width, lanes = lib.width(dtype), 16 if dtype == torch.bfloat16 else lib.lanes
    chain = -(-channels // width) * (2 if dtype == torch.bfloat16 else 1)
    return chain + pairs + lanes.bit_length() - 1


def kernel_weights(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 weights as the kernel multiplies them for features in `dtype`: fp32 for fp16, bf16
    with subnormals flushed to zero for bf16."""
    if dtype == torch.bfloat16:
        w = weights.to(torch.bfloat16)
        return torch.where(w.abs() < torch.finfo(torch.bfloat16).smallest_normal, 0, w)
    return weights.to(torch.float32)
