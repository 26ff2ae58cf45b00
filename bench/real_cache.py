"""The real-feature cache of issue 11: the embedded default model over ../shared/data, to N images.

EfficientNet-Lite0 (`embedded:efficientnet_lite0`), layer `blocks.5` (7×7×192, signed features),
over the real images of ../shared/data (nih_cxr_kcr64, imagenette160_mini, pacs_mini: 2,060
images) and deterministic flips / crops of them, until there are N images (default 10,000):

    variant 0 `orig`       the image itself (a symlink to it: nothing is copied)
    variant 1 `hflip`      horizontal flip
    variant 2 `crop80_c`   central 80% crop
    variant 3 `crop80_tl`  80% crop, top-left corner
    variant 4 `crop80_br`  80% crop, bottom-right corner
    variant 5..8           flipped 80% corner crops, central 60% crop and its flip

Images are taken variant by variant, each in one fixed shuffled order of the sources, so a partial
last variant still spreads over all three sets. The augmented images (same format as their source;
JPEG at quality 95) and `manifest.csv` (path, label, domain, dataset, variant, source_path) go to a
work folder outside the repository (default /tmp/vfs-bench/real10k/); `domain` is the PACS domain,
and the set's name for the two sets without domains. The cache is built there with the project's
own `vfs.jobs.build_cache` (the code `python -m vfs build` runs), labels and domains recorded.

A complete cache of the same model, layer, manifest and N is reused (nothing rebuilt); an
interrupted one is resumed; anything else is refused unless `--rebuild`. Prints ONE JSON line on
stdout (progress on stderr; `--out FILE` also writes it):

    nice -n 19 .venv/bin/python bench/real_cache.py                       # ≈10 min on 2 cores
    .venv/bin/python bench/real_cache.py --n 500 --work /tmp/vfs-bench/real500
    .venv/bin/python bench/search_bench.py --from-cache /tmp/vfs-bench/real10k.zarr --n 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from _common import ROOT, emit, environment, log

DATASETS = ("nih_cxr_kcr64", "imagenette160_mini", "pacs_mini")
MODEL = "embedded:efficientnet_lite0"
LAYER = "blocks.5"
# name -> (horizontal flip, crop fraction, crop anchor (y, x) in [0, 1])
VARIANTS = {
    "orig": (False, 1.0, (0.5, 0.5)),
    "hflip": (True, 1.0, (0.5, 0.5)),
    "crop80_c": (False, 0.8, (0.5, 0.5)),
    "crop80_tl": (False, 0.8, (0.0, 0.0)),
    "crop80_br": (False, 0.8, (1.0, 1.0)),
    "hflip_crop80_tr": (True, 0.8, (0.0, 1.0)),
    "hflip_crop80_bl": (True, 0.8, (1.0, 0.0)),
    "crop60_c": (False, 0.6, (0.5, 0.5)),
    "hflip_crop60_c": (True, 0.6, (0.5, 0.5)),
}


def default_name(n: int) -> str:
    return f"real{n // 1000}k" if n % 1000 == 0 else f"real{n}"


def sources(data_root: Path):
    """All source images: a DataFrame (dataset, source_path, abs_path, label, domain), fixed order."""
    import pandas as pd

    frames = []
    for name in DATASETS:
        folder = data_root / name
        m = pd.read_csv(folder / "manifest.csv")
        frames.append(
            pd.DataFrame(
                {
                    "dataset": name,
                    "source_path": m["path"].astype(str),
                    "abs_path": [str(folder / p) for p in m["path"]],
                    "label": m["label"] if "label" in m else None,
                    "domain": m["domain"] if "domain" in m else name,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def plan(src, n: int, seed: int):
    """The N output images: (variant, source row) in order, as a manifest DataFrame."""
    import pandas as pd

    s = len(src)
    if n > s * len(VARIANTS):
        raise SystemExit(
            f"--n {n}: at most {s * len(VARIANTS)} images from {s} sources × {len(VARIANTS)} variants"
        )
    order = np.random.default_rng(seed).permutation(s)
    names = list(VARIANTS)
    rows = []
    for i in range(n):
        v, j = names[i // s], int(order[i % s])
        r = src.iloc[j]
        rows.append(
            {
                "path": f"images/{v}/{r['dataset']}/{r['source_path']}",
                "label": r["label"],
                "domain": r["domain"],
                "dataset": r["dataset"],
                "variant": v,
                "source_path": r["source_path"],
                "abs_path": r["abs_path"],
            }
        )
    return pd.DataFrame(rows)


def augment(src_path: str, dst: Path, variant: str) -> None:
    """Write one variant of one image (deterministic; atomically, so an interrupted run resumes)."""
    from PIL import Image, ImageOps

    flip, frac, (ay, ax) = VARIANTS[variant]
    with Image.open(src_path) as im:
        fmt = (im.format or "PNG").upper()
        im = ImageOps.exif_transpose(im)
        w, h = im.size
        if frac < 1:
            cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
            left, top = round((w - cw) * ax), round((h - ch) * ay)
            im = im.crop((left, top, left + cw, top + ch))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tmp = dst.with_name(dst.name + ".tmp")
        if fmt == "JPEG":
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            im.save(tmp, format="JPEG", quality=95)
        else:
            im.save(tmp, format="PNG")
    os.replace(tmp, dst)


def prepare(work: Path, manifest) -> int:
    """Write the images (skipping those already there) and manifest.csv; returns images written."""
    written = 0
    t0 = time.perf_counter()
    for i, r in enumerate(manifest.itertuples(index=False)):
        dst = work / r.path
        if dst.is_symlink() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if r.variant == "orig":
            os.symlink(r.abs_path, dst)
        else:
            augment(r.abs_path, dst, r.variant)
            written += 1
        if (i + 1) % 1000 == 0:
            log(f"  images: {i + 1}/{len(manifest)} ({time.perf_counter() - t0:.0f} s)")
    text = manifest.drop(columns="abs_path").to_csv(index=False)
    path = work / "manifest.csv"
    if not path.exists() or path.read_text() != text:
        path.with_name("manifest.csv.tmp").write_text(text)
        os.replace(path.with_name("manifest.csv.tmp"), path)
    return written


def existing(cache_path: Path, manifest_path: Path, n: int) -> str:
    """'absent', 'complete' (same model / layer / data / N: reuse), 'partial' (resume) or why it differs."""
    from vfs.cache import CacheError, open_cache

    if not cache_path.exists():
        return "absent"
    try:
        c = open_cache(str(cache_path))
    except CacheError as e:
        return f"unreadable ({e})"
    same = (
        c.spec.model == MODEL
        and c.spec.layer == LAYER
        and Path(c.spec.data.source).resolve() == manifest_path.resolve()
    )
    if not same:
        return f"a different cache ({c.spec.model} {c.spec.layer} over {c.spec.data.source})"
    if not c.complete:
        return "partial"
    if c.report.get("candidates", c.n) != n:
        return f"complete, built from {c.report.get('candidates')} images, not {n}"
    return "complete"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000, help="images in the cache (default 10000)")
    ap.add_argument(
        "--data-root",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder holding the three image sets (default ../shared/data)",
    )
    ap.add_argument(
        "--work",
        help="folder for the augmented images and manifest.csv (default /tmp/vfs-bench/real<N/1000>k)",
    )
    ap.add_argument("--cache", help="the cache to build (default <work>.zarr)")
    ap.add_argument("--seed", type=int, default=0, help="order of the sources within a variant (default 0)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decoding processes (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ap.add_argument("--rebuild", action="store_true", help="delete a cache that cannot be reused, and build")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    work = Path(args.work or f"/tmp/vfs-bench/{default_name(args.n)}").resolve()
    cache_path = Path(args.cache).resolve() if args.cache else work.with_suffix(".zarr")
    if work.is_relative_to(ROOT) or cache_path.is_relative_to(ROOT):
        raise SystemExit(
            f"write the images and cache outside the repository ({ROOT}), not {work} / {cache_path}"
        )
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = work / "manifest.csv"

    log(f"planning {args.n} images from {args.data_root} into {work}")
    manifest = plan(sources(Path(args.data_root)), args.n, args.seed)
    written = prepare(work, manifest)
    prepare_s = time.perf_counter() - t_start
    log(f"images and manifest ready in {prepare_s:.0f} s ({written} written now)")

    state = existing(cache_path, manifest_path, args.n)
    log(f"cache {cache_path}: {state}")
    if state not in ("absent", "complete", "partial"):
        if not args.rebuild:
            raise SystemExit(f"{cache_path} is {state}; pass --rebuild to replace it, or choose --cache")
        shutil.rmtree(cache_path)
        state = "absent"

    from vfs.cache import open_cache

    build_s = None
    if state != "complete":
        from vfs.jobs import BuildJob, build_cache

        job = BuildJob(
            layer=LAYER,
            data=str(manifest_path),
            out=str(cache_path),
            model=MODEL,
            label_col="label",
            domain_col="domain",
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
        )
        last = [0.0]

        def progress(p) -> None:
            if time.perf_counter() - last[0] > 15 or p.done == p.total:
                last[0] = time.perf_counter()
                log(f"  build: {p.summary()}")

        t0 = time.perf_counter()
        build_cache(job, progress=progress)
        build_s = time.perf_counter() - t0
        log(f"built in {build_s:.0f} s")

    cache = open_cache(str(cache_path))
    n, h, w, c = cache.shape
    sample = np.asarray(cache.features[: min(n, 256)], dtype=np.float32)
    doc = {
        "benchmark": "real_cache",
        "path": str(cache_path),
        "work": str(work),
        "manifest": str(manifest_path),
        "n": n,
        "shape": [n, h, w, c],
        "model": cache.spec.model,
        "layer": cache.spec.layer,
        "input_size": cache.spec.input_size,
        "signed": not cache.nonnegative,
        "negative_fraction_first256": round(float((sample < 0).mean()), 4),
        "reused": state == "complete",
        "resumed": state == "partial",
        "images_written": written,
        "prepare_s": round(prepare_s, 1),
        "build_s": None if build_s is None else round(build_s, 1),
        "images_per_s": None if not build_s else round(args.n / build_s, 1),
        "seconds": round(time.perf_counter() - t_start, 1),
        "variants": manifest["variant"].value_counts(sort=False).to_dict(),
        "datasets": manifest["dataset"].value_counts(sort=False).to_dict(),
        "args": vars(args),
        "environment": environment(torch.device(args.device if args.device != "auto" else "cpu")),
    }
    doc["cpu"] = doc["environment"]["cpu"]
    emit(doc, args.out, indent=None)


if __name__ == "__main__":
    main()
