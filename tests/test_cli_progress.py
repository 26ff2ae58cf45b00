"""`python -m vfs build > build.log 2>&1`: plain progress lines, not tqdm's carriage returns."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 24, 4  # six batches of the embedded images
LINE = re.compile(rf"^small\.zarr: (\d+) / {N} images · \d+\.\d images/s · ETA (\d+ s|\d+ min|…)$")


def build_command(tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vfs",
        "build",
        "--layer",
        "blocks.5",
        "--data",
        "embedded:skimage",
        "--limit",
        str(N),
        "--batch-size",
        str(BATCH),
        "--out",
        str(tmp_path / "small.zarr"),
    ]


def build_logged(tmp_path: Path, every_s: str) -> tuple[str, list[int]]:
    """Build with stderr redirected to a file; stdout, and the images done in each progress line."""
    log = tmp_path / "build.log"
    with open(log, "w") as stderr:
        stdout = subprocess.run(
            build_command(tmp_path),
            cwd=ROOT,
            env=os.environ | {"VFS_PROGRESS_EVERY_S": every_s},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=600,
            check=True,
        ).stdout
    text = log.read_text()
    assert "\r" not in text and text.endswith("\n"), repr(text[-500:])
    progress = [line for line in text.splitlines() if "images/s" in line]
    assert all(LINE.match(line) for line in progress), progress
    return stdout, [int(LINE.match(line).group(1)) for line in progress]


def test_every_report_is_a_line_of_its_own(tmp_path):
    stdout, done = build_logged(tmp_path, "0")
    assert done == list(range(BATCH, N + 1, BATCH))
    assert f"small.zarr: {N} images, grid (7, 7), 192 channels; 0 skipped" in stdout


def test_lines_come_at_most_once_an_interval_and_the_last_at_the_end(tmp_path):
    _, done = build_logged(tmp_path, "3600")
    assert done == [BATCH, N]


def test_a_build_whose_progress_reader_died_does_not_say_it_succeeded(tmp_path):
    """stderr's reader gone (a log collector that died) stops the build: not exit 0, as a closed
    stdout (`… | head`) is."""
    read, write = os.pipe()
    os.close(read)
    try:
        run = subprocess.run(
            build_command(tmp_path),
            cwd=ROOT,
            env=os.environ | {"VFS_PROGRESS_EVERY_S": "0"},
            stdout=subprocess.PIPE,
            stderr=write,
            timeout=600,
        )
    finally:
        os.close(write)
    assert run.returncode != 0
