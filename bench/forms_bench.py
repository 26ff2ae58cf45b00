"""Every exact form of the fast pass, forced in turn, on one device: each search's time, the images
it re-scores, against the form `plan_query` picks — the figures `vfs.scoring._PRODUCT_COST` is
fitted from on a device (a GPU's row stays a guess until a run like this one) — and, with
`--profile`, where the planned search spends its time (torch.profiler: the device's kernels and the
host's operators, by self time).

    .venv/bin/python bench/forms_bench.py --device cuda --shape r50l4 --n 50000 --profile --out f.json
"""

from __future__ import annotations

import argparse
from unittest import mock

import _common  # noqa: F401
import torch
from _common import emit, environment, log, resolve, summary, timed
from search_bench import MASKS, SHAPES, make_mask, synthetic


def forms(mask_spans: bool, device: torch.device, channels: int) -> list[str]:
    """The exact forms that can score a mask (spanning the grid or not) on `device`."""
    from vfs.kernel import library
    from vfs.scoring import fast_dtype

    lib = library()
    pairs = device.type == "cpu" and lib is not None and fast_dtype(device, channels) in lib.dtypes
    return ["cells", "band"] + ["whole", "whole_cells"] * mask_spans + ["pairs"] * pairs


def profile(search, device: torch.device, rows: int = 12) -> dict:
    """The planned search three times under torch.profiler (its top operators by self time), then
    under cProfile (vfs's functions by cumulative time: where the host's fixed work goes)."""
    from profile_search import sections
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            search()
    table = prof.key_averages()
    out = {"host": table.table(sort_by="self_cpu_time_total", row_limit=rows)}
    if device.type == "cuda":
        out["device"] = table.table(sort_by="self_cuda_time_total", row_limit=rows)
    return out | {"python": sections(search, 3)}


def shape_cases(args, shape_name: str, device: torch.device) -> list[dict]:
    """Every mask of one shape: each form forced, then the planned one (the source is freed when
    this returns)."""
    import vfs.search
    from vfs.masks import crop_mask
    from vfs.scoring import QueryPlan
    from vfs.search import search_regions
    from vfs.sources import ArrayFeatures

    x = synthetic(
        args.n,
        SHAPES[shape_name],
        gen_device=device if device.type == "cuda" else None,
        features=args.features,
    )
    source, query = ArrayFeatures(x), args.n // 3
    cases = []
    for mask_name in list(MASKS) if args.mask == "all" else args.mask.split(","):
        mask = make_mask(mask_name, SHAPES[shape_name][:2])

        def search(mask=mask):
            return search_regions(source, query, mask, k=10, exclude=query, device=device)

        case = {"shape": shape_name, "n": args.n, "mask": mask_name, "planned": search().method, "forms": {}}
        for form in forms(crop_mask(mask).shape == mask.shape, device, x.shape[-1]):
            plan = QueryPlan(form)
            with mock.patch.object(vfs.search, "plan_query", lambda *a, plan=plan: plan):
                rescored = search().rescored
                times = [timed(search, device)[0] for _ in range(args.repeats)]
            case["forms"][form] = summary(times) | {"rescored": rescored}
            log(f"{shape_name}/{mask_name} {form}: {min(times):.2f} ms, {rescored} re-scored")
        case["planned_time"] = summary([timed(search, device)[0] for _ in range(args.repeats)])
        if args.profile:
            try:
                case["profile"] = profile(search, device)
            except RuntimeError as error:  # e.g. no CUPTI under this machine's sandbox
                case["profile"] = {"error": str(error)}
        cases.append(case)
    return cases


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", default="r50l4", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--mask", default="all", help=f"comma-separated, of {', '.join(MASKS)}, or all")
    ap.add_argument("--features", default="relu", help="relu | signed")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also profile the planned search per mask")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    device = resolve(args.device)
    cases = []
    for shape_name in args.shape.split(","):
        cases += shape_cases(args, shape_name, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit(
        {"benchmark": "forms", "args": vars(args), "cases": cases, "environment": environment(device)},
        args.out,
    )


if __name__ == "__main__":
    main()
