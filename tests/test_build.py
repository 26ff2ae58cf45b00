"""End-to-end builds with the embedded model, and the CLI's JSON round trip."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfs import BuildJob, build_cache, open_cache, search_regions
from vfs.cli import main
from vfs.masks import grid_mask

SHARED = Path(os.environ.get("VFS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "demo.zarr"
    seen = []
    cache = build_cache(
        BuildJob(layer="blocks.5", data="embedded:skimage", out=str(out), limit=24, batch_size=8),
        progress=seen.append,
    )
    return cache, seen


def test_an_uploaded_querys_view_is_shown_as_the_caches_images_are(tmp_path):
    """The app showed an upload's view resized by PIL's bicubic filter, the cache's images by
    torchvision's antialiased one (up to 23 levels apart on a 240 px Lite1 view; code review)."""
    from vfs.jobs import view_thumbnail

    out = tmp_path / "c.zarr"
    cache = build_cache(
        BuildJob(layer="blocks.5", data="embedded:skimage", out=str(out), limit=3, image_size=288)
    )
    assert cache.thumbs.shape[1] < cache.spec.input_size == 288  # thumbnails smaller than the views
    for i in range(3):
        view = cache.spec.preprocess.view(cache.image(i))
        np.testing.assert_array_equal(view_thumbnail(view, cache.thumbs.shape[1]), cache.thumb(i))


def test_embedded_build(demo):
    cache, seen = demo
    assert cache.complete and cache.n == 24 and cache.shape == (24, 7, 7, 192)
    assert cache.spec.model == "embedded:efficientnet_lite0" and cache.spec.input_size == 224
    assert cache.thumbs.shape == (24, 224, 224, 3) and cache.thumb(0).std() > 0
    assert cache.label_col == "label" and cache.domain_col == "source"
    assert seen[-1].done == seen[-1].total == 24 and seen[-1].stored == 24
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    # stored features are the extractor's features of the stored view
    from vfs.data import open_dataset
    from vfs.devices import resolve_device
    from vfs.models import load_extractor

    ex = load_extractor(cache.spec.model, cache.spec.layer)
    ref = ex.features(open_dataset("embedded:skimage").load(3))
    stored = cache.features[3].astype(np.float32)
    if resolve_device("auto").type == "cpu":  # where the build ran
        np.testing.assert_allclose(stored, ref, rtol=2e-2, atol=2e-2)
    else:  # built under fp16 autocast on a GPU: each cell within 1% of the CPU's fp32 features
        error = np.linalg.norm(stored - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1.0)
        assert error.max() < 1e-2, error.max()


def test_a_rerun_of_a_finished_build_succeeds_with_nothing_to_do(demo, tmp_path, capsys, monkeypatch):
    """Scripts rerun builds: a finished one is the answer (exit 0), not an error — also for a cache
    whose recorded preprocessing this version would no longer choose for the model."""
    import shutil

    import zarr

    cache, _ = demo
    monkeypatch.setattr("vfs.jobs._run_from_next", lambda *a: pytest.fail("a finished build computed again"))
    flags = ["--layer", "blocks.5", "--data", "embedded:skimage", "--limit", "24", "--batch-size", "8"]
    assert main(["build", *flags, "--out", cache.location]) == 0
    assert f"{cache.location}: 24 images" in capsys.readouterr().out
    older = tmp_path / "older.zarr"
    shutil.copytree(cache.location, older)
    group = zarr.open_group(str(older), mode="r+")
    group.attrs["spec"] = group.attrs["spec"] | {
        "preprocess": group.attrs["spec"]["preprocess"] | {"resize_size": 288}
    }
    assert main(["build", *flags, "--out", str(older)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "1"])
def test_memory_run_out_stops_a_build_that_resumes_with_every_image(tmp_path, capsys, monkeypatch, workers):
    """Memory run out while a good image decoded skipped it for good as "corrupt or unsupported
    (MemoryError)", and the cache was marked complete without it (failure-injection review); in a
    decoding worker it reached the build as PyTorch's traceback text (diff review)."""
    from PIL import ImageFile

    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 40)] * 4 + [(77, 55)]):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "c.zarr"
    argv = ["build", "--layer", "blocks.5", "--data", str(tmp_path), "--batch-size", "2", "--out", str(out)]
    argv += ["--workers", workers]  # a worker forks from here: the patch below holds there too
    load = ImageFile.ImageFile.load

    def short_of_memory(image):
        if image.size == (77, 55):
            raise MemoryError
        return load(image)

    with monkeypatch.context() as patched:
        patched.setattr(ImageFile.ImageFile, "load", short_of_memory)
        assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress lines: one line, the worker's traceback not in it
    assert last.startswith(f"error: out of memory building {out} (MemoryError): lower the batch size"), err
    assert "Traceback" not in err
    assert "rerun the same build to resume it" in err
    assert main(argv) == 0, capsys.readouterr().err
    cache = open_cache(out)
    assert cache.n == 5 and not cache.report.get("skipped")


@pytest.mark.parametrize(
    ("number", "says"),
    [
        ("ENOSPC", "no space left on the disk holding {out}: free some and rerun the same build to resume"),
        ("EACCES", "Permission denied: {out}/features — put that right, then rerun the same build to resume"),
        (
            "EMFILE",
            "Too many open files: {out}/features — put that right, then rerun the same build to resume",
        ),
    ],
)
def test_a_write_that_fails_names_what_and_the_way_on(tmp_path, capsys, monkeypatch, number, says):
    """A full disk named the output and said a rerun resumes; a folder it may not write, or too many
    files open, was a bare "[Errno 13] Permission denied: '…'" (failure-injection review)."""
    import errno

    out = tmp_path / "c.zarr"
    code = getattr(errno, number)

    def fails(*args, **kwargs):
        raise OSError(code, os.strerror(code), f"{out}/features")

    monkeypatch.setattr("vfs.cache.writer.CacheWriter._store", fails)
    argv = ["build", "--layer", "blocks.5", "--data", "embedded:skimage", "--limit", "4", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says.format(out=out) in err, err


def interrupted_build(job: BuildJob, after: int) -> None:
    """`job` built until its progress reports `after` images done, then stopped by Ctrl-C."""

    def interrupt(report):
        if report.done >= after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(job, progress=interrupt)


def test_a_cache_on_read_only_media_is_complete_or_refused_untouched(demo, tmp_path, monkeypatch):
    """A finished cache on read-only media (a shared, read-only mount): its build's rerun answered
    "[Errno 30] Read-only file system: '….lock'" (trial). Now the rerun is the finished cache, as
    anywhere; a build to resume there, or a new one, is refused with why; nothing is written."""
    import errno
    import shutil

    from vfs.cache import BuildLock, CacheError

    def read_only(self, owner):
        raise OSError(errno.EROFS, "Read-only file system", str(self.path))

    cache, _ = demo
    done, partial = tmp_path / "done.zarr", tmp_path / "partial.zarr"
    shutil.copytree(cache.location, done)
    job = BuildJob(layer="blocks.5", data="embedded:skimage", out=str(partial), limit=24, batch_size=8)
    interrupted_build(job, after=8)

    def files():
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")}

    before = files()
    monkeypatch.setattr(BuildLock, "_enter_flock", read_only)
    monkeypatch.setattr(BuildLock, "_enter_pidfile", read_only)
    monkeypatch.setattr(
        "vfs.jobs._run_from_next", lambda *a: pytest.fail("a build ran where nothing may be written")
    )
    assert build_cache(replace(job, out=str(done))).complete
    for out in (partial, tmp_path / "new.zarr"):
        with pytest.raises(
            CacheError, match=f"cannot build or change {out}: its folder {tmp_path} is on read-only"
        ):
            build_cache(replace(job, out=str(out)))
    with pytest.raises(CacheError, match="is on read-only media"):  # the Build page's delete, say
        with BuildLock(done):
            pytest.fail("entered without a lock")

    def not_mine(self, owner):  # another user's build holds the lock: the system's error, as before
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    monkeypatch.setattr(BuildLock, "_enter_flock", not_mine)
    monkeypatch.setattr(BuildLock, "_enter_pidfile", not_mine)
    with pytest.raises(PermissionError):
        build_cache(replace(job, out=str(partial)))
    assert files() == before


def test_a_cache_folder_mounted_read_only_is_refused_before_any_work(tmp_path):
    """The folder holding it writable, the cache's own folder read-only (a bind mount): the lock
    was taken, a batch computed, then "[Errno 30] Read-only file system: '….zarr/features/c'"
    (new-user review). Now refused in words before the model runs; nothing is written."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("a read-only bind mount needs unshare -m (root)")
    partial = tmp_path / "partial.zarr"
    flags = ["--layer", "blocks.5", "--data", "embedded:skimage", "--limit", "24", "--batch-size", "8"]
    interrupted_build(
        BuildJob(layer="blocks.5", data="embedded:skimage", out=str(partial), limit=24, batch_size=8), after=8
    )
    (
        partial / "features" / "c" / "0" / "0" / "0" / "0"
    ).unlink()  # lost: its resume rewrote the progress first
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in partial.rglob("*")}
    build = " ".join([sys.executable, "-m", "vfs", "build", *flags, "--out", str(partial)])
    script = (
        f"mount --bind {partial} {partial} && mount -o remount,ro,bind {partial} {partial} && exec {build}"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"error: cannot build or change {partial}: the cache's folder is on read-only media; resume it "
        "where it can be written, or build into another folder"
    )
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in partial.rglob("*")} == before
    assert not open_cache(partial, allow_partial=True).complete


def test_ctrl_c_keeps_every_image_computed(tmp_path):
    """Ctrl-C (here: after the second batch's progress report) stores the partial chunk, as a cancel
    does: the images the progress counted as stored are on disk, and a rerun goes on from there."""
    from vfs.cache import open_cache

    out = tmp_path / "c.zarr"
    job = BuildJob(layer="blocks.5", data="embedded:skimage", out=str(out), limit=24, batch_size=8)
    interrupted_build(job, after=16)
    partial = open_cache(out, allow_partial=True)
    assert not partial.complete and partial.stored == 16
    assert build_cache(job).n == 24


def test_a_decoding_worker_killed_mid_build_is_started_again(demo, tmp_path, monkeypatch):
    """A DataLoader worker killed (the out-of-memory killer) stopped the build with a bare message
    (helper trial): the build now starts its workers again from the first image not stored, and
    gives the cache an unbroken build gives; past LOADER_RETRIES deaths it says to rerun."""
    import signal

    import vfs.jobs
    from vfs.data import TorchImageDataset

    marks = tmp_path / "deaths"
    marks.mkdir()
    decode = TorchImageDataset.__getitem__

    def dying(self, i, deaths=1):
        if i == 13 and len(list(marks.iterdir())) < deaths:  # in a forked worker: once per death
            (marks / str(len(list(marks.iterdir())))).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(self, i)

    monkeypatch.setattr(TorchImageDataset, "__getitem__", dying)
    job = BuildJob(
        layer="blocks.5",
        data="embedded:skimage",
        out=str(tmp_path / "c.zarr"),
        limit=24,
        batch_size=8,
        workers=1,
    )
    with pytest.warns(
        UserWarning, match=r"a decoding worker died .*killed by signal.*goes on from image \d+"
    ):
        cache = build_cache(job)
    clean, _ = demo
    np.testing.assert_array_equal(cache.features[:], clean.features[:])
    assert cache.report == clean.report

    monkeypatch.setattr(TorchImageDataset, "__getitem__", lambda self, i: dying(self, i, deaths=99))
    job = BuildJob(**{**vars(job), "out": str(tmp_path / "d.zarr")})
    with (
        pytest.warns(UserWarning),
        pytest.raises(RuntimeError, match=r"died 4 times.*rerun the same command to resume"),
    ):
        build_cache(job)
    assert len(list(marks.iterdir())) == 1 + vfs.jobs.LOADER_RETRIES + 1


def test_a_builds_lock_waits_out_another_builds_look_at_it(tmp_path):
    """`refuse_if_held` holds a shared lock for an instant: a build taking the lock then was refused,
    "another build is writing … owner unknown" (review)."""
    import fcntl
    import threading

    from vfs.cache import BuildLock

    out = tmp_path / "c.zarr"
    fd = os.open(tmp_path / "c.zarr.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # another process's look, 20 ms long
    threading.Timer(0.02, os.close, [fd]).start()
    with BuildLock(out):
        pass


def test_a_worker_reported_dead_while_a_stop_unwinds_is_no_death_to_retry():
    """SIGTERM to a build's process group: the main process's Terminated unwound, and torch's report
    of its workers' end (a RuntimeError raised in that unwinding) was taken for a dead worker — the
    build went on from the next image, the stop lost (review)."""
    from vfs.interrupts import Terminated
    from vfs.jobs import _retrying_dead_loaders

    runs = []

    def stopped_while_workers_end():
        runs.append(1)
        try:
            raise Terminated
        finally:  # what torch's SIGCHLD handler raises as the stop unwinds
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    with pytest.raises(Terminated):
        _retrying_dead_loaders(None, stopped_while_workers_end)  # type: ignore[arg-type]
    assert runs == [1]


def test_sigterm_stops_a_cli_build_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """`kill`, a scheduler's stop: the build keeps what it computed and says how to go on (it died
    with no word before, exit -15), and the rerun finishes it."""
    import signal

    from vfs.cache import CacheWriter, open_cache

    add, added = CacheWriter.add, []

    def add_then_kill(self, *args, **kwargs):
        add(self, *args, **kwargs)
        added.append(1)
        if len(added) == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(CacheWriter, "add", add_then_kill)
    out = tmp_path / "c.zarr"
    argv = ["build", "--layer", "blocks.5", "--data", "embedded:skimage", "--limit", "24"]
    argv += ["--batch-size", "4", "--image-size", "64", "--out", str(out)]
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 128 + signal.SIGTERM
    assert "terminated: rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was the build's only
    partial = open_cache(out, allow_partial=True)
    assert not partial.complete and partial.stored >= 10
    monkeypatch.undo()
    assert main(argv) == 0 and open_cache(out).n == 24


def test_a_manifest_row_repeating_a_path_is_stored_and_reported(tmp_path, capsys):
    """A twin found at 1.000 puzzles a user who did not know the manifest repeats a row."""
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "m.csv").write_text("path,label\n0.png,a\n1.png,b\n0.png,c\n")
    out = tmp_path / "c.zarr"
    argv = [
        "build",
        "--layer",
        "blocks.5",
        "--data",
        str(tmp_path / "m.csv"),
        "--image-size",
        "64",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "note: 1 manifest rows repeat an earlier row's path; each is stored" in capsys.readouterr().out
    from vfs.cache import open_cache

    cache = open_cache(out)
    assert cache.n == 3 and cache.report["repeated_paths"] == 1


def test_an_image_query_is_made_as_the_caches_images_were(demo, tmp_path, capsys):
    """A cache records its preprocessing; a query image goes through that one, not what this version
    would choose for the model now (timm's crop modes changed it for 137 configs), so caches built
    before still answer image queries."""
    import shutil

    import zarr

    cache, _ = demo
    older = tmp_path / "older.zarr"
    shutil.copytree(cache.location, older)
    group = zarr.open_group(str(older), mode="r+")
    spec = dict(group.attrs["spec"])
    spec["preprocess"] = spec["preprocess"] | {"resize_size": 288}  # as an older VFS chose it
    group.attrs["spec"] = spec
    mask = tmp_path / "m.npy"
    np.save(mask, np.ones((7, 7), dtype=np.float32))
    from vfs.data import open_dataset

    open_dataset("embedded:skimage").load(3).save(tmp_path / "q.png")
    argv = [
        "search",
        str(older),
        "--image",
        str(tmp_path / "q.png"),
        "--mask",
        str(mask),
        "--json",
        "--k",
        "1",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    top = json.loads(capsys.readouterr().out)["results"][0]
    assert (
        top["index"] == 3 and top["score"] < 0.999
    )  # the stored features were made at 256, the query at 288


def test_cli_json_round_trip(demo, tmp_path, capsys):
    cache, _ = demo
    drawn = np.zeros((224, 224, 4), np.uint8)
    drawn[60:150, 40:170, 3] = 255
    Image.fromarray(drawn).save(tmp_path / "m.png")
    assert (
        main(
            [
                "search",
                cache.location,
                "--query-index",
                "5",
                "--mask",
                str(tmp_path / "m.png"),
                "--k",
                "4",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    ref = search_regions(cache, 5, grid_mask(drawn, cache.spec.grid), k=4, exclude=5)
    assert [r["index"] for r in out["results"]] == ref.top["index"].tolist()
    assert [r["score"] for r in out["results"]] == pytest.approx(ref.top["score"].tolist(), abs=1e-6)
    assert out["results"][0]["path"] == ref.top["path"][0] and out["grid"] == [7, 7]
    assert set(out["results"][0]) == {
        "rank",
        "index",
        "path",
        "score",
        "grid_box",
        "pixel_box",
        "label",
        "domain",
    }
    # the same mask as .npy of the grid's shape gives the same answer
    np.save(tmp_path / "m.npy", grid_mask(drawn, cache.spec.grid))
    assert (
        main(
            [
                "search",
                cache.location,
                "--query-index",
                "5",
                "--mask",
                str(tmp_path / "m.npy"),
                "--k",
                "4",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["results"] == out["results"]
    assert out["weights"] == cache.spec.weights and cache.spec.weights.startswith("sha256:")
    assert main(["info", cache.location, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 24
    assert main(["info", cache.location]) == 0  # which weights, in words too (a checkpoint may be rewritten)
    assert f"  weights {cache.spec.weights}" in capsys.readouterr().out.splitlines()


def test_cli_errors_are_one_line(demo, tmp_path, capsys):
    cache, _ = demo
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    assert main(["search", cache.location, "--query-index", "1", "--mask", str(tmp_path / "bad.npy")]) == 2
    assert "grid's shape" in capsys.readouterr().err
    np.save(tmp_path / "empty.npy", np.zeros((7, 7)))
    assert main(["search", cache.location, "--query-index", "1", "--mask", str(tmp_path / "empty.npy")]) == 2
    assert "empty" in capsys.readouterr().err
    assert (
        main(
            [
                "build",
                "--model",
                "timm:no_such_model",
                "--layer",
                "x",
                "--data",
                "embedded:skimage",
                "--out",
                str(tmp_path / "x.zarr"),
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err


def test_query_from_an_image_file(demo, tmp_path, capsys):
    cache, _ = demo
    from vfs.data import open_dataset

    open_dataset("embedded:skimage").load(5).save(tmp_path / "q.png")
    np.save(tmp_path / "m.npy", np.pad(np.ones((3, 3)), 2))
    assert (
        main(
            [
                "search",
                cache.location,
                "--image",
                str(tmp_path / "q.png"),
                "--mask",
                str(tmp_path / "m.npy"),
                "--k",
                "1",
                "--json",
                "--include-query",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert err.startswith(f"note: {tmp_path / 'q.png'} is image 5 of the cache (the same features)")
    found = json.loads(out)
    assert found["query"]["index"] == 5 and found["results"][0]["index"] == 5
    assert found["results"][0]["score"] > 0.99


@pytest.mark.skipif(
    not (SHARED / "nih_cxr_kcr64").exists(), reason="../shared/data/nih_cxr_kcr64 not present"
)
def test_chest_xray_manifest_build(tmp_path):
    manifest = SHARED / "nih_cxr_kcr64" / "manifest.csv"
    cache = build_cache(
        BuildJob(
            layer="blocks.5",
            data=str(manifest),
            out=str(tmp_path / "cxr.zarr"),
            label_col="label",
            domain_col="view",
            image_size=96,
            batch_size=100,
        )
    )
    assert cache.n == 1000 and cache.label_col == "label" and cache.spec.grid == (3, 3)
    m = cache.manifest
    assert {"path", "label", "cardiomegaly", "age", "view"} <= set(m.columns)
    assert m["label"].str.contains("|", regex=False).any()
    assert m["age"].dtype.kind in "if" and set(m["view"]) <= {"PA", "AP"}
    result = search_regions(cache, 0, np.pad(np.ones((2, 2), np.float32), ((0, 1), (0, 1))), k=5, exclude=0)
    assert len(result.top) == 5 and result.top["label"].notna().all()


def test_cli_refuses_model_code_named_by_a_cache(demo, tmp_path, capsys):
    """A stranger's cache naming a python: model must not run that code on `--image` unless trusted."""
    import shutil

    import zarr

    cache, _ = demo
    copy = tmp_path / "stranger.zarr"
    shutil.copytree(cache.location, copy)
    g = zarr.open_group(str(copy), mode="r+")
    g.attrs["spec"] = {**g.attrs["spec"], "model": "python:os:getcwd"}
    from vfs.data import open_dataset

    open_dataset("embedded:skimage").load(5).save(tmp_path / "q.png")
    np.save(tmp_path / "m.npy", np.pad(np.ones((3, 3)), 2))
    assert (
        main(["search", str(copy), "--image", str(tmp_path / "q.png"), "--mask", str(tmp_path / "m.npy")])
        == 2
    )
    assert "--trust-model-code" in capsys.readouterr().err


def test_a_resume_with_one_setting_forgotten_says_the_settings_it_was_started_with(tmp_path):
    """Rerun without its --limit, a partial build was refused with "choose another output" alone:
    the way to lose its stored images (Build review). The refusal names the recorded settings."""
    import threading

    from vfs.cache import CacheError
    from vfs.data import EMBEDDED_DATASET

    stop = threading.Event()
    job = BuildJob(
        layer="blocks.5", data=EMBEDDED_DATASET, out=str(tmp_path / "c.zarr"), limit=12, batch_size=4
    )
    assert build_cache(replace(job, chunk_images=4), progress=lambda p: stop.set(), cancel=stop) is None
    with pytest.raises(CacheError, match="started on a dataset of 12 images") as refused:
        build_cache(replace(job, limit=None))
    said = str(refused.value)
    assert "or resume it with the settings it was started with (" in said and "limit 12" in said
    assert "layer blocks.5" in said
    assert build_cache(job) is not None and open_cache(job.out).n == 12  # as it says: nothing lost


@pytest.mark.parametrize("under", ["c.zarr", "sub/c.zarr"])
def test_an_output_under_a_file_is_refused_in_words_before_the_model_loads(
    tmp_path, monkeypatch, capsys, under
):
    """`--out afile/c.zarr` gave "error: [Errno 17] File exists" (or Errno 20 a folder deeper) after
    the model had loaded for seconds (Build review)."""
    import vfs.jobs

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(vfs.jobs, "load_extractor", lambda *a, **k: pytest.fail("the model loaded first"))
    out = tmp_path / "afile" / under
    assert main(["build", "--layer", "blocks.5", "--data", "embedded:skimage", "--out", str(out)]) != 0
    said = capsys.readouterr().err
    assert f"{tmp_path / 'afile'} is a file, not a folder; choose another output" in said, said
    assert "Errno" not in said


def test_a_complete_cache_of_other_images_says_so_before_a_setting_that_follows_from_them(tmp_path):
    """Another dataset with a domain column was refused for "data.domain_col: None ≠ 'domain'"; only
    with that setting matched did the real reason come: other images (Build review)."""
    from vfs.cache import CacheError

    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = np.random.default_rng([seed, i]).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{name}{i}.png")
        rows = "".join(f"{name}/{name}{i}.png,d{i % 2}\n" for i in range(3))
        (tmp_path / f"{name}.csv").write_text("path,domain\n" + rows)
    out = str(tmp_path / "c.zarr")
    assert (
        build_cache(BuildJob(layer="blocks.5", data=str(tmp_path / "a.csv"), out=out, domain_col=""))
        is not None
    )
    with pytest.raises(CacheError, match="built from other images than these") as refused:
        build_cache(BuildJob(layer="blocks.5", data=str(tmp_path / "b.csv"), out=out, domain_col="domain"))
    assert "domain_col" not in str(refused.value)
    with pytest.raises(
        CacheError, match="another setting \\(data.domain_col"
    ):  # the same images: the setting
        build_cache(BuildJob(layer="blocks.5", data=str(tmp_path / "a.csv"), out=out, domain_col="domain"))
