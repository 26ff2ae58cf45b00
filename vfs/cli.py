"""`python -m vfs`: list models and layers, build caches, inspect them, search them."""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shlex
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from .errors import error_line, out_of_memory
from .interrupts import Terminated, sigterm_stops_builds

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import numpy as np
    from tqdm import tqdm

    from .cache import FeatureCache
    from .jobs import BuildProgress
    from .search import SearchResult


def parse_bytes(text: str) -> int:
    """`--memory-budget`'s type: `vfs.devices.memory_bytes`, its refusal argparse's."""
    from .devices import memory_bytes  # torch: loaded by the search this budget is for anyway

    try:
        return memory_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_models(args: argparse.Namespace) -> None:
    from .models import DEFAULT_MODEL, KINDS

    lines = [(syntax, what) for kind in KINDS.values() for syntax, what in kind.usage]
    width = max(len(syntax) for syntax, _ in lines)
    print("Model specs (offline ones first):")
    for syntax, what in lines:
        print(f"  {syntax:<{width}}   {what}{' (default)' if syntax == DEFAULT_MODEL else ''}")
    print("List a model's layers with: python -m vfs layers SPEC")


def _cmd_layers(args: argparse.Namespace) -> None:
    from .models import list_layers

    layers = list_layers(args.spec, args.image_size)
    if args.json:
        rows = [
            {
                "name": info.name,
                "grid": [info.height, info.width],
                "channels": info.channels,
                "same_as": list(info.same_as),
                "calls": info.calls,
            }
            for info in layers
        ]
        print(json.dumps(rows, indent=1))
        return
    if not layers:
        size = "" if args.image_size is None else f" at {args.image_size} px"
        raise ValueError(f"{args.spec}: no layer gives a spatial map of at least 2 cells{size}")
    width = max(len(info.name) for info in layers)
    for info in layers:
        note = f"  {info.note}" if info.note else ""
        print(f"{info.name:<{width}}  {info.height}×{info.width}×{info.channels}{note}")


class _ProgressBar:
    """Build progress on a terminal: a tqdm bar, made at the first report (so a refusal prints on a clean
    line)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: tqdm | None = None

    def __call__(self, p: BuildProgress) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(unit="img", dynamic_ncols=True, desc=self.name, initial=p.done, total=p.total)
        self.bar.n = p.done
        self.bar.set_postfix(stored=p.stored, skipped=p.skipped, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _ProgressLines:
    """Build progress in a log or CI (stderr is no terminal): a plain line at the first report, then one every
    `every_s` seconds, and the last at the end; tqdm's carriage-return updates would make one endless line."""

    def __init__(self, name: str, every_s: float) -> None:
        self.name, self.every_s = name, every_s
        self.last: BuildProgress | None = None
        self.shown: BuildProgress | None = None
        self.at: float | None = None

    def __call__(self, p: BuildProgress) -> None:
        self.last = p
        if self.at is None or time.monotonic() - self.at >= self.every_s:
            self._print(p)

    def _print(self, p: BuildProgress) -> None:
        self.at, self.shown = time.monotonic(), p
        print(f"{self.name}: {p.summary()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.last is not None and self.last is not self.shown:
            self._print(self.last)


def _at_least_one(text: str) -> int:
    """argparse's type of a count ≥ 1: its own message ("argument --per-domain: …"), not Python's."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number ≥ 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number ≥ 1, not {value} (leave it out for no limit)")
    return value


def _complete(location: str | Path) -> bool:
    """Whether a cache is complete at `location` already (a build there then does nothing)."""
    from .cache import open_cache

    try:
        return open_cache(location).complete
    except Exception:  # noqa: BLE001 - none there, or one the build itself will judge and report
        return False


def _progress_every_s() -> float:
    """Seconds between progress lines in a log: $VFS_PROGRESS_EVERY_S, default 10."""
    text = os.environ.get("VFS_PROGRESS_EVERY_S", "10")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"VFS_PROGRESS_EVERY_S={text!r}: expected a number of seconds, e.g. 10") from None


def _cmd_build(args: argparse.Namespace) -> None:
    from .jobs import BuildJob, build_cache

    flags = {
        k: getattr(args, k)
        for k in (
            "model",
            "layer",
            "data",
            "out",
            "label_col",
            "domain_col",
            "image_size",
            "batch_size",
            "device",
            "workers",
            "limit",
            "chunk_images",
            "engine",
            "address",
            "gpus_per_worker",
        )
    }
    if args.job:
        job = BuildJob.from_toml(args.job, **flags)
    else:
        missing = [f"--{k}" for k in ("layer", "data", "out") if flags[k] is None]
        if missing:
            raise ValueError(
                f"build needs a job file or {', '.join(missing)} (see python -m vfs build --help)"
            )
        job = BuildJob(**{k: v for k, v in flags.items() if v is not None})
    name = Path(job.out).name
    show: _ProgressBar | _ProgressLines = (
        _ProgressBar(name) if sys.stderr.isatty() else _ProgressLines(name, _progress_every_s())
    )
    finished_before = _complete(job.out)
    computed = []  # a progress report: images were computed (a complete cache's lost chunks, too)

    def progress(p: BuildProgress) -> None:
        computed.append(True)
        show(p)

    try:
        cache = build_cache(job, progress=progress)
    finally:
        show.close()
    untouched = finished_before and not computed  # complete before, and nothing computed now
    # complete before, damaged since and written again: its summary read as a fresh build's
    repaired = finished_before and bool(computed)
    assert cache is not None  # None means cancelled, and the CLI never cancels
    report = cache.report
    print(
        f"{cache.location}: {cache.n} images, grid {cache.spec.grid}, {cache.spec.channels} channels; "
        f"{len(report.get('skipped', []))} skipped"
        + (" (as when it was built: it was complete, nothing was built now)" if untouched else "")
        + (
            " (repaired: what it had lost or garbled on disk was written again, as the warnings above say)"
            if repaired
            else ""
        )
    )
    for s in report.get("skipped", []):
        print(f"  skipped {s['path']}: {s['reason']}")
    if untouched and report.get("skipped"):
        print(
            "  (not retried: a complete cache is not built again — to retry images fixed since, build "
            "into another --out, or delete this one first)"
        )
    if report.get("repeated_paths"):  # a long-format manifest, or a mistake: each row is an image of its own
        print(
            f"  note: {report['repeated_paths']} manifest rows repeat an earlier row's path; each is stored"
        )


def _cmd_info(args: argparse.Namespace) -> None:
    from .cache import open_cache

    cache = open_cache(args.cache)
    info = cache.info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    s = cache.spec
    lost = [] if info["lost_from"] is None else [f"images from {info['lost_from']} missing or cut short"]
    columns = info["lost_columns"]
    lost += (
        ["the manifest missing"] if columns is None else [f"manifest column {c!r} missing" for c in columns]
    )
    damage = f", DAMAGED: {', '.join(lost)} on disk — rerun its build" if lost else ""
    print(f"{info['location']}  ({'complete' if cache.complete else 'PARTIAL'}{damage})")
    print(
        f"  model {s.model}  layer {s.layer}  input {s.input_size}px  "
        f"grid {s.grid[0]}×{s.grid[1]}×{s.channels}"
    )
    print(f"  weights {s.weights or '(not recorded: built before VFS kept their digest)'}")
    print(f"  view: {s.preprocess.describe()}")  # what a mask painted on the query photo is cropped to
    print(
        f"  images {cache.stored}{'' if cache.complete else f' of {cache.candidates} stored so far'}  "
        f"data {s.data.source}  "
        f"labels {s.data.label_col or '(none)'}  domains {s.data.domain_col or '(none)'}"
    )
    print(f"  features {info['nbytes_features'] / 1e6:.1f} MB fp16, chunk {info['chunk']} images")
    if cache.feature_scale != 1:  # the layer's values are beyond fp16's range as they are
        print(f"  stored as the layer's features × 2^{math.log2(cache.feature_scale):g} (feature_scale)")
    for column in info["columns"] or []:
        role = f" ({column['role']})" if column["role"] else ""
        counts = column.get("counts")
        shown = ", ".join(f"{value} {n}" for value, n in list(counts.items())[:8]) if counts else ""
        more = f", … ({len(counts) - 8} more)" if counts and len(counts) > 8 else ""
        values = f"{column['distinct']} value{'' if column['distinct'] == 1 else 's'}"
        print(f"  column {column['column']}{role}: {values}" + (f": {shown}{more}" if shown else ""))
    for sk in cache.report.get("skipped", []):
        print(f"  skipped {sk['path']}: {sk['reason']}")


def _cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 where damage is found, so that a script copying caches can stop on it."""
    from .cache import CacheError, open_cache
    from .settings import is_url

    try:
        cache = open_cache(args.cache, allow_partial=True)
    except CacheError as e:
        if is_url(args.cache) or not (Path(args.cache) / "zarr.json").is_file():  # no zarr group there
            raise
        if args.json:  # a script reads JSON whatever it found (review: it got this line)
            problem = f"it cannot be opened: {e}"
            print(
                json.dumps(
                    {"location": args.cache, "opened": False, "ok": False, "problems": [problem]}, indent=1
                )
            )
        else:
            print(f"{args.cache}: DAMAGED, it cannot be opened: {e}")  # an array's metadata gone, say
        return 1
    bar = None

    every_s, said = _progress_every_s(), time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal bar, said
        if not sys.stderr.isatty():  # a log: a line every VFS_PROGRESS_EVERY_S, as a build's
            if time.monotonic() - said >= every_s and done < total:
                print(f"check: {done} / {total} images", file=sys.stderr, flush=True)
                said = time.monotonic()
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(unit="img", dynamic_ncols=True, desc="check", total=total)
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        found = cache.check(progress)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps(found.to_dict() | {"opened": True, "seconds": round(seconds, 2)}, indent=1))
        return 0 if found.ok else 1
    state = "complete" if found.complete else "PARTIAL: its images stored so far"
    images = f"{found.images} image{'' if found.images == 1 else 's'}"
    arrays = sorted({name.split("/")[0] for name in found.unverified})
    unverified = (
        f"  (its {', '.join(arrays)} were written without checksums, by a VFS before it stored them: "
        "a chunk of them garbled on disk may decode unnoticed)"
    )
    if found.ok:
        print(
            f"{found.location}: OK ({state}) — {images} read in {seconds:.1f} s: every chunk "
            "decodes, every cell's features are those of its stored norm, no file is missing"
        )
        if arrays:
            print(unverified)
        return 0
    print(f"{found.location}: DAMAGED ({state}), {images} read in {seconds:.1f} s:")
    for problem in found.problems():
        print(f"  {problem}")
    if arrays:
        print(unverified)
    print("rerun the build that made it (the same command) to repair it, or copy it again")
    return 1


def _cmd_search(args: argparse.Namespace) -> None:
    from .cache import open_cache
    from .images import upright_size
    from .masks import load_mask
    from .models import model_kind

    cache = open_cache(args.cache, allow_partial=args.allow_partial)
    for flag, given in (("--model", args.model), ("--trust-model-code", args.trust_model_code)):
        if given and not args.image:
            raise ValueError(f"{flag} is for an --image query; a --query-index searches the stored features")
    if (
        args.image
        and not args.model
        and model_kind(cache.spec.model).runs_user_code
        and not args.trust_model_code
    ):
        raise ValueError(
            f"the cache's model {cache.spec.model!r} is code that would run here; "
            "pass --trust-model-code if you trust whoever built the cache"
        )
    if args.address and args.shards is None:
        raise ValueError("--address is for a search on a Ray cluster: add --shards N")
    if args.shards is not None and args.memory_budget is not None:
        raise ValueError("--memory-budget is for a search on this machine: shards hold their rows in memory")
    if args.per_domain is not None and not cache.domain_col:  # the engine's words name its parameter
        raise ValueError(
            f"--per-domain needs a cache with a domain column; {args.cache} has none (build it with "
            "--domain-col COLUMN)"
        )
    with _searcher(args, cache) as (search, out):
        query_size: Callable[[], tuple[int, int] | None]
        if args.image:
            query: int | np.ndarray = _image_query(args, cache, search)
            query_size = partial(upright_size, args.image)
        else:
            query, query_size = args.query_index, partial(cache.image_size, args.query_index)
        mask = load_mask(args.mask, cache.spec.grid, cache.spec.preprocess.painted_on(query_size))
        index = query if isinstance(query, int) else None  # an --image of the cache's: its row
        desc: dict[str, object] = {"image": str(args.image)} if args.image else {}
        desc |= {"index": index} if index is not None else {}
        if args.exclude_same and index is None:
            raise ValueError(
                f"--exclude-same is for a query image of the cache: {args.image} is none of its images "
                "(its features are not any image's)"
            )
        exclude: list[int] = [] if args.include_query or index is None else [index]
        if args.exclude_same and index is not None:
            exclude += cache.images_sharing(args.exclude_same, index).tolist()
        candidates = _labelled(cache, args.label) if args.label else None
        result = search(
            query, mask, k=args.k, exclude=exclude or None, per_domain=args.per_domain, candidates=candidates
        )
        _show_result(cache, result, desc, args.json, out, args.label or (), args.exclude_same)


def _labelled(cache: FeatureCache, labels: list[str]) -> np.ndarray:
    """The images with any of `labels` (a '|'-joined label counts for each of its values)."""
    from .stats import column_groups, in_any_group

    if not cache.label_col:
        raise ValueError(f"--label needs a cache with a label column; {cache.location} has none")
    return in_any_group(column_groups(cache.manifest, cache.label_col), labels, cache.location)


def _image_query(
    args: argparse.Namespace, cache: FeatureCache, search: Callable[..., SearchResult]
) -> int | np.ndarray:
    """An --image's features by the cache's model, or, where it is one of the cache's images (the same
    features: a file of its dataset), that image's index, said on stderr: searched as a query image it
    ranked among the others, about 1, where --include-query, --exclude-same apply to an index."""
    from .images import load_image
    from .search import image_searched

    features = cache.extractor(args.model).features(load_image(args.image))
    index = image_searched(search, features, cache.spec.grid)
    if index is None:
        return features
    left = "" if args.include_query else " (left out of the results unless --include-query)"
    print(
        f"note: {args.image} is image {index} of the cache (the same features): searched as it{left}",
        file=sys.stderr,
    )
    return index


@contextmanager
def _searcher(
    args: argparse.Namespace, cache: FeatureCache
) -> Iterator[tuple[Callable[..., SearchResult], TextIO]]:
    """The search the command runs, on this machine or (--shards) on a Ray cluster, and where its
    answer is printed (stdout; Ray's own lines go to stderr meanwhile)."""
    if args.shards is None:
        from .search import search_regions

        yield partial(search_regions, cache, device=args.device, memory_budget=args.memory_budget), sys.stdout
        return
    from .cluster.sharded import ShardedSearch

    with (
        _ray_prints_to_stderr() as out,
        ShardedSearch(
            cache.location,
            shards=args.shards,
            address=args.address,
            device=args.device,
            allow_partial=args.allow_partial,
        ) as sharded,
    ):
        yield partial(sharded.search, all_scores=False), out  # the CLI prints the ranked table only


def _show_result(
    cache: FeatureCache,
    result: SearchResult,
    desc: dict,
    as_json: bool,
    out: TextIO,
    labels: Sequence[str] = (),
    exclude_same: str | None = None,
) -> None:
    """The search's answer on `out`: its JSON (docs/cli.md), or a summary line and the ranked table."""
    from .export import search_json

    if as_json:
        document = search_json(cache, result, desc, labels, exclude_same)
        print(json.dumps(document, indent=1, default=str), file=out)
        return
    print(result.caption(), file=out)
    roles = {"label": cache.label_col, "domain": cache.domain_col}  # none in the cache: not shown
    names = ("rank", "index", "score", "label", "domain", "path", "grid_box")
    cols = [c for c in names if roles.get(c, c in result.top)]
    table = result.top[cols].copy()
    for c in ("label", "domain"):  # an image without one: a dash, whether stored as None or NaN
        if c in table:
            table[c] = table[c].astype(object).where(table[c].notna(), "–")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=out)


class _Parser(argparse.ArgumentParser):
    """Bad arguments end as every other bad input does: one `error:` line, exit 2 (argparse's own
    way prints its usage block first), naming where the usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m vfs", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list model specs")
    lp = sub.add_parser("layers", help="list a model's spatial layers with (h, w, C)")
    lp.add_argument("spec", help="a model spec, as `models` lists them (timm:…, torchvision:…, file:…)")
    lp.add_argument("--image-size", type=int, help="input side in px (default: the model's own)")
    lp.add_argument("--json", action="store_true", help="print JSON")
    bp = sub.add_parser("build", help="build or resume a feature cache")
    bp.add_argument("job", nargs="?", help="a job file (TOML with a [build] table); flags override it")
    bp.add_argument("--model", help="model spec (default: the embedded EfficientNet-Lite0; see `models`)")
    bp.add_argument("--layer", help="the layer whose features are stored (see `layers SPEC`)")
    bp.add_argument(
        "--data", help="folder, manifest .csv/.parquet, embedded:skimage or torchvision:<Dataset>"
    )
    bp.add_argument(
        "--out",
        help="the cache to write, a folder (NAME.zarr: the app lists those; an unfinished one resumes)",
    )
    bp.add_argument(
        "--label-col", help="the labels' column (default: 'label' where there is one; \"\" for none)"
    )
    bp.add_argument(
        "--domain-col", help="the domains' column (default: 'domain' where there is one; \"\" for none)"
    )
    bp.add_argument("--image-size", type=int, help="input side in px (default: the model's own)")
    bp.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    bp.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    bp.add_argument("--workers", type=int, help="local: decoding processes; ray: extractor actors")
    bp.add_argument("--limit", type=int, help="only the first N images of the dataset (a quick try)")
    bp.add_argument(
        "--chunk-images", type=int, help="images per stored chunk (default: ≤ 16 MiB of features; new caches)"
    )
    bp.add_argument(
        "--engine", choices=("local", "ray"), help="ray: build on a Ray cluster (docs/cluster.md)"
    )
    bp.add_argument(
        "--address", help="ray: the cluster (auto, HOST:6379); default: this machine's or a local one"
    )
    bp.add_argument(
        "--gpus-per-worker", type=float, help="ray: GPUs per extractor actor (default 1 where there are GPUs)"
    )
    ip = sub.add_parser("info", help="describe a cache")
    ip.add_argument("cache", help="a cache's path or URL")
    ip.add_argument("--json", action="store_true", help="print JSON")
    cp = sub.add_parser(
        "check", help="read every chunk of a cache and check it: damage a copy, crash or disk left"
    )
    cp.add_argument("cache", help="a cache's path or URL")
    cp.add_argument("--json", action="store_true", help="print JSON")
    sp = sub.add_parser("search", help="rank a cache's images by similarity to a masked query region")
    sp.add_argument("cache", help="a cache's path or URL")
    q = sp.add_mutually_exclusive_group(required=True)
    q.add_argument("--query-index", type=int, help="the query: an image of the cache, by its index")
    q.add_argument("--image", type=Path, help="the query: an image file, through the cache's own model")
    sp.add_argument(
        "--mask",
        required=True,
        type=Path,
        help="PNG (alpha or grey) of the model's square view or the query photo's size or shape "
        "(docs/cli.md), or .npy of the grid's shape",
    )
    sp.add_argument("--k", type=int, default=10, help="results to rank (default 10)")
    sp.add_argument(
        "--per-domain",
        type=_at_least_one,
        help="at most N results from any one domain (N ≥ 1; default: no limit)",
    )
    sp.add_argument(
        "--label",
        action="append",
        metavar="LABEL",
        help="rank only the images with this label ('|'-joined labels count for each value); repeat for any "
        "of several",
    )
    sp.add_argument("--include-query", action="store_true", help="keep the query image in the results")
    sp.add_argument(
        "--exclude-same",
        metavar="COLUMN",
        help="leave out the other images whose manifest COLUMN holds the query's value (e.g. patient_id)",
    )
    sp.add_argument(
        "--allow-partial", action="store_true", help="search the images an unfinished build has stored"
    )
    sp.add_argument(
        "--trust-model-code", action="store_true", help="allow a python: model spec named by the cache"
    )
    sp.add_argument(
        "--model",
        help="with --image: the model spec to load instead of the cache's, e.g. its checkpoint at a new "
        "path (it must hold the weights the cache was built with)",
    )
    sp.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    sp.add_argument("--memory-budget", type=parse_bytes, help="stream from disk beyond this (e.g. 2GB)")
    sp.add_argument("--shards", type=int, help="search on a Ray cluster, the cache split across N actors")
    sp.add_argument(
        "--address",
        help="with --shards: the Ray cluster (auto, ray://HOST:10001); default: this machine's or a new one",
    )
    sp.add_argument("--json", action="store_true", help="print JSON (ranks, scores, boxes, the query)")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "models": _cmd_models,
    "layers": _cmd_layers,
    "build": _cmd_build,
    "info": _cmd_info,
    "check": _cmd_check,
    "search": _cmd_search,
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    if not (sys.argv[1:] if argv is None else argv):  # no command at all: what the commands are
        parser.print_help(sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser: argparse's own named the top one's usage (review)
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subcommands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with _warnings_in_words(), sigterm_stops_builds() if args.command == "build" else nullcontext():
            status = COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, where it is caught, not at the interpreter's exit
    except BrokenPipeError:
        if not _reader_gone(sys.stdout):  # stderr's reader died (a log collector): the work is undone
            return 1
        # `… | head`: the reader of the output has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except KeyboardInterrupt as e:
        resume = ": rerun the same command to resume" if args.command == "build" else ""
        terminated = isinstance(e, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}{resume}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except (
        ValueError,
        RuntimeError,
        OSError,
        MemoryError,
    ) as e:  # CacheError, ImageError, ModelUnavailable, …
        stream = out_of_memory(e) and args.command == "search"
        hint = " (--memory-budget streams a cache larger than the memory free)" if stream else ""
        print(f"error: {_in_cli_words(e)}{hint}", file=sys.stderr)
        return 2
    except Exception as e:
        if not type(e).__module__.startswith(
            "ray."
        ):  # a Ray error (a worker that could not start): its words
            raise
        print(
            f"error: on the Ray cluster: {error_line(e, 'last', named=True)}",
            file=sys.stderr,
        )
        return 2
    return status or 0


@contextmanager
def _warnings_in_words() -> Iterator[None]:
    """A warning (a resumed build's images lost on disk, a library's notice) as one line
    `warning: …`, not Python's file, line and source line, which read as a stack trace."""

    def show(message: Warning | str, *_: object, **__: object) -> None:
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextmanager
def _ray_prints_to_stderr() -> Iterator[TextIO]:
    """Ray's driver prints its workers' and raylet's lines ("(raylet) A worker died…") to
    `sys.stdout`, at any moment: sent to stderr while a command works on the cluster, so that stdout
    holds the answer alone (`--json`), written to the stdout this yields."""
    out = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield out
    finally:
        sys.stdout = out


def _reader_gone(stream: TextIO) -> bool:
    """Whether `stream` is a pipe whose reader has closed it (poll reports an error on it)."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or not a file
        return False


def _in_cli_words(error: Exception) -> str:
    """An engine error as a CLI user needs it: a bad layer names the command that lists the layers."""
    from .models import LayerError

    if isinstance(error, LayerError):
        size = "" if error.image_size is None else f" --image-size {error.image_size}"
        return error.message(f"python -m vfs layers {shlex.quote(error.spec)}{size}")
    if isinstance(error, MemoryError):  # Python's or numpy's, often without a word
        return f"out of memory ({error_line(error, named=True)})"
    return str(error)
