"""Markdown tables from benchmark JSON files (for docs/performance.md).

.venv/bin/python bench/report.py bench/results/cpu/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def search_table(d: dict) -> str:
    lines = [
        "| shape | N | mask (cells, box) | method | vfs ms min / median | paper ms min / median | floor ms min (how) | "
        "× paper | × floor | vfs GB/s | same top-10 | re-scored | others' CPU share (vfs / paper) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in d["cases"]:
        p = c.get("paper", {})
        mi = c["mask_info"]
        fv = c["vfs"].get("foreign_cpu_frac") or [0]
        fp = p.get("foreign_cpu_frac") or [0]
        lines.append(
            f"| {c['shape']} {c['grid'][0]}×{c['grid'][1]}×{c['channels']} | {c['n']:,} | {c['mask']} ({mi['cells']}, "
            f"{mi['box'][0]}×{mi['box'][1]}{', soft' if mi['soft'] else ''}) | {c['vfs']['method']} | "
            f"{fmt(c['vfs']['min_ms'])} / {fmt(c['vfs']['median_ms'])} | {fmt(p.get('min_ms'), 0)} / {fmt(p.get('median_ms'), 0)} | "
            f"{fmt(c['floor']['min_ms'])} ({c['floor']['used']}) | {fmt((c.get('speedup_vs_paper') or {}).get('min'))} | "
            f"{fmt(c['vfs_over_floor']['min'], 2)} | {fmt(c['effective_gb_per_s']['vfs'], 2)} | {fmt(c.get('same_top10'))} | "
            f"{c['vfs']['rescored']} | {max(fv):.2f} / {max(fp):.2f} |"
        )
    return "\n".join(lines)


def ooc_table(d: dict) -> str:
    ci = d["cache"]
    lines = [
        f"cache: {ci['n']:,} × {'×'.join(map(str, ci['shape'][1:]))} fp16 ({ci['bytes_features_sqnorm'] / 1e9:.2f} GB in "
        f"{ci['files']} chunk files of {ci['chunk_rows']} images), memory budget {d['memory_budget_bytes'] / 1e9:.2f} GB",
        "",
        "| page cache | raw read ms min (GB/s) | search ms min / median (GB/s) | throughput / raw (min, median) | "
        "peak RSS MiB (after imports) | peak anon MiB (after imports) | re-scored | ≥ 0.70 | RSS ≤ budget + 0.5 GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ("cold", "warm"):
        r = d[t]
        s = r["search"]
        lines.append(
            f"| {t} | {fmt(r['raw_read']['min_ms'], 0)} ({r['raw_read']['gb_per_s']:.2f}) | {fmt(s['min_ms'], 0)} / "
            f"{fmt(s['median_ms'], 0)} ({s['gb_per_s']:.2f}) | {r['throughput_over_raw']['min']:.2f}, "
            f"{r['throughput_over_raw']['median']:.2f} | {s['peak_rss_bytes'] >> 20} ({s['rss_after_imports_bytes'] >> 20}) | "
            f"{s['peak_anon_bytes'] >> 20} ({s['anon_after_imports_bytes'] >> 20}) | {s['rescored']} | "
            f"{fmt(r['targets']['throughput_ge_0_70'])} | {fmt(r['targets']['peak_rss_within'])} "
            f"(above imports: {fmt(r['targets']['peak_rss_above_imports_within'])}) |"
        )
    return "\n".join(lines)


def build_table(d: dict) -> str:
    lines = [
        f"{d['images']} images ({d['data']}), {d['model']} {d['layer']} ({d['grid'][0]}×{d['grid'][1]}×{d['channels']}), "
        f"batch {d['args']['batch_size']}, device {d['device']}",
        "",
        "| run | images/s (best) | all runs | ratio to forward-only |",
        "|---|---|---|---|",
        f"| forward only (pre-decoded) | {d['forward_only']['images_per_s']:.1f} | "
        f"{', '.join(f'{len_ / t * 1e3:.1f}' for len_, t in ((d['decoded'], t) for t in d['forward_only']['times_ms']))} | 1 |",
    ]
    for w, v in d["build"].items():
        lines.append(
            f"| build_cache, workers={w} | {v['best_images_per_s']:.1f} | "
            f"{', '.join(str(b['images_per_s']) for b in v['builds'])} | {v['ratio_to_forward']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if not sys.argv[1:] or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return
    for f in sys.argv[1:]:
        d = json.loads(Path(f).read_text())
        print(
            f"### {Path(f).name}  ({d['environment']['date_utc']}, {d['environment']['cpu']}, "
            f"{d['environment']['cpu_count']} CPUs, load {d['environment']['loadavg_at_start'][0]:.1f})\n"
        )
        if d.get("benchmark") == "search" and d.get("mode") == "in-memory":
            print(search_table(d))
        elif d.get("benchmark") == "search":
            print(ooc_table(d))
        elif d.get("benchmark") == "build":
            print(build_table(d))
        print()


if __name__ == "__main__":
    main()
