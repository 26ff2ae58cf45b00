"""Cache-build speed: `vfs.jobs.build_cache` images/s against the model's forward pass alone.

Both sides use the same `Extractor` (loaded once), layer, batch size and device. The forward-only
rate runs `Extractor.features_batch` on pre-decoded, pre-normalised tensors already on the device
(the same `vfs.jobs.ModelInputView` preprocessing the build uses), with device synchronisation. The build rate is
the wall time of a whole `build_cache(job, extractor=...)` call — DataLoader start-up, decoding,
writes and the final manifest included — into a fresh temporary cache, for each worker count.

Data: ../shared/data/imagenette160_mini (500 JPEGs, 224×224) when present, else embedded:skimage.
On a GPU 500 images take about the DataLoader's start-up: `--copies 20` builds from them 20 times
over (10,000 images); `--model 'timm:resnet50?pretrained=false' --layer layer4` is a model whose
forward pass, not JPEG decoding, can bound the build.

    .venv/bin/python bench/build_bench.py                        # CPU: workers 0,1,2
    .venv/bin/python bench/build_bench.py --device cuda --workers 4,8 --batch-size 128 --copies 20

Prints ONE JSON document on stdout; progress on stderr. Target: build ≥ 0.85 × forward-only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import ROOT, CpuMeter, emit, environment, log, resolve, summary, sync, vm_status, wait_quiet

DATA = ROOT.parent / "shared" / "data" / "imagenette160_mini" / "manifest.csv"


def replicated(manifest: Path, copies: int, folder: Path, limit: int | None) -> Path:
    """A manifest listing every image of `manifest` (its first `limit`) `copies` times, through
    symlinks to its folder (a dataset's paths may not leave its root; a link inside it may point
    anywhere)."""
    import pandas as pd

    records = pd.read_csv(manifest).head(limit)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(copies):
        link = folder / f"copy{i}"
        if not link.exists():
            link.symlink_to(manifest.parent.resolve(), target_is_directory=True)
        parts.append(records.assign(path=f"copy{i}/" + records["path"].astype(str)))
    out = folder / "manifest.csv"
    pd.concat(parts).to_csv(out, index=False)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--model", default="embedded:efficientnet_lite0")
    ap.add_argument("--layer", default="blocks.5", help="default blocks.5 (7×7×192 at 224 for Lite0)")
    ap.add_argument(
        "--data", default=None, help="dataset source (default imagenette160_mini, else embedded:skimage)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to try")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument(
        "--copies",
        type=int,
        default=1,
        help="build from the manifest's images this many times over (symlinked folders): a rate past "
        "the DataLoader's start-up, from a few hundred images that travel (default 1)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="builds per worker count (default 1)")
    ap.add_argument("--forward-repeats", type=int, default=2, help="forward-only passes (default 2)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        help="before each timed run, wait up to this many seconds for the (shared) machine to be idle",
    )
    ap.add_argument("--workdir", default=None, help="where the temporary caches go (default a temp dir)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    from vfs.data import TorchImageDataset, open_dataset
    from vfs.jobs import BuildJob, ModelInputView, build_cache
    from vfs.models import load_extractor

    device = resolve(args.device)
    env = environment(device)
    data = args.data or (str(DATA) if DATA.exists() else "embedded:skimage")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vfs-build-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    forward_data = data
    if args.copies > 1 and not data.lower().endswith(
        ".csv"
    ):  # e.g. embedded:skimage, without the shared data
        log(f"--copies {args.copies} replicates a .csv manifest's rows; {data} is built once")
        args.copies = 1
    if args.copies > 1:
        data = str(replicated(Path(data), args.copies, work / "data", args.limit))
    dataset = open_dataset(forward_data)
    if args.limit is not None:
        dataset = dataset.limit(args.limit)
    n = len(dataset)
    t0 = time.perf_counter()
    ex = load_extractor(args.model, args.layer, device=str(device))
    load_s = time.perf_counter() - t0
    log(
        f"{args.model} {args.layer} on {device}: grid {ex.grid}×{ex.channels}, loaded in {load_s:.1f} s; "
        f"{n} images × {args.copies} from {data}"
    )

    # Pre-decoded, pre-normalised input on the device: what the forward pass alone needs.
    t0 = time.perf_counter()
    view = ModelInputView(ex.preprocess)
    tds = TorchImageDataset(dataset, view)
    views = torch.stack([v for _, v, err in (tds[i] for i in range(n)) if err is None])
    decode_s = time.perf_counter() - t0
    # the build's own normalisation: Preprocess.normalize, on the device
    inputs = [
        ex.preprocess.normalize(views[a : a + args.batch_size].to(device))
        for a in range(0, len(views), args.batch_size)
    ]
    log(f"decoded {len(views)} images in {decode_s:.1f} s on one core ({len(views) / decode_s:.0f} images/s)")

    fwd_share: list[float] = []

    def forward_pass() -> float:
        if args.quiet_wait > 0:
            wait_quiet(args.quiet_wait, window_s=1.0)
        with CpuMeter() as m:
            sync(device)
            t = time.perf_counter()
            for x in inputs:
                ex.features_batch(x)
            sync(device)
            t = time.perf_counter() - t
        fwd_share.append(m.result["foreign_cpu_frac"])
        return t

    ex.features_batch(inputs[0])  # warm-up (kernel selection, allocator)
    workers = [int(w) for w in args.workers.split(",")]
    fwd_times: list[float] = []
    builds: dict[int, list[dict]] = {w: [] for w in workers}

    def run_build(w: int, r: int) -> dict:
        out = work / f"build_w{w}_r{r}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        job = BuildJob(
            layer=args.layer,
            data=data,
            out=str(out),
            model=args.model,
            batch_size=args.batch_size,
            device=str(device),
            workers=w,
            limit=None if args.copies > 1 else args.limit,
        )
        last = {}
        if args.quiet_wait > 0:
            wait_quiet(args.quiet_wait, window_s=1.0)
        with CpuMeter() as m:
            t = time.perf_counter()
            cache = build_cache(job, progress=lambda p: last.update(rate=p.images_per_s), extractor=ex)
            wall = time.perf_counter() - t
        rec = {
            "wall_s": round(wall, 3),
            "stored": cache.n,
            "images_per_s": round(cache.n / wall, 2),
            "progress_rate_images_per_s": round(last.get("rate", 0.0), 2),
            "own_cpu_s": m.result["own_cpu_s"],
            "foreign_cpu_frac": m.result["foreign_cpu_frac"],
        }
        shutil.rmtree(out, ignore_errors=True)
        return rec

    # interleaved so that drift in the machine's load hits both sides alike
    for r in range(max(args.repeats, args.forward_repeats)):
        if r < args.forward_repeats:
            fwd_times.append(forward_pass())
            log(
                f"forward-only pass {r}: {len(views) / fwd_times[-1]:.1f} images/s (others used {fwd_share[-1]:.0%} of the CPUs)"
            )
        if r < args.repeats:
            for w in workers:
                rec = run_build(w, r)
                builds[w].append(rec)
                log(
                    f"build workers={w} rep {r}: {rec['images_per_s']:.1f} images/s ({rec['wall_s']:.1f} s; "
                    f"others used {rec['foreign_cpu_frac']:.0%} of the CPUs)"
                )
    shutil.rmtree(work, ignore_errors=True) if args.workdir is None else None

    fwd_rate = len(views) / min(fwd_times)
    fwd_rate_med = len(views) / sorted(fwd_times)[len(fwd_times) // 2]
    per_workers = {}
    for w, recs in builds.items():
        best = max(r["images_per_s"] for r in recs)
        per_workers[str(w)] = {
            "builds": recs,
            "best_images_per_s": best,
            "ratio_to_forward": round(best / fwd_rate, 3),
        }
    best_w = max(per_workers, key=lambda w: per_workers[w]["best_images_per_s"])
    ratio = per_workers[best_w]["ratio_to_forward"]
    doc = {
        "benchmark": "build",
        "args": vars(args),
        "data": data,
        "copies": args.copies,
        "images": n * args.copies,
        "decoded": len(views),
        "model": args.model,
        "layer": args.layer,
        "grid": list(ex.grid),
        "channels": ex.channels,
        "input_size": ex.preprocess.input_size,
        "device": str(device),
        "model_load_s": round(load_s, 2),
        "decode_single_core_images_per_s": round(len(views) / decode_s, 1),
        "forward_only": summary([t * 1e3 for t in fwd_times], fwd_share)
        | {
            "images_per_s": round(fwd_rate, 2),
            "images_per_s_median": round(fwd_rate_med, 2),
        },
        "build": per_workers,
        "best_workers": int(best_w),
        "best_build_images_per_s": per_workers[best_w]["best_images_per_s"],
        "ratio": ratio,
        "targets": {"spec": "build ≥ 0.85 × forward-only rate", "ratio_ge_0_85": ratio >= 0.85},
        "peak_rss_bytes": vm_status("VmHWM"),
        "environment": env | {"loadavg_at_end": list(os.getloadavg())},
    }
    emit(doc, args.out)


if __name__ == "__main__":
    main()
