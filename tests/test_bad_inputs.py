"""Bad input gets a clear message and the rest of the work goes on.

A corpus of broken, odd-but-legal and hostile files is generated here (nothing downloaded) and
pushed through a real build with the embedded EfficientNet-Lite0 (64 px input for speed), the
CLI, queries and damaged caches:

- images: good ones are stored; odd but legal ones (16-bit, CMYK, palette with transparency,
  greyscale, grey+alpha, float TIFF, EXIF-rotated, 1×1, GIF, huge but legal) are stored after
  normalisation; broken ones (zero-byte, truncated, text named .jpg, unsupported formats,
  decompression bombs) are skipped and listed in the build report with the reason;
- the CLI's `search --image <bad file>` and bad mask files exit 2 with one `error:` line;
- queries: empty, thin, faint, wrong-shape and non-finite masks, non-finite features;
- caches: another model/layer/size than the extractor, an unsupported format version, missing
  or truncated chunk files, a NaN cache, manifests that point outside their root.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numcodecs
import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from vfs.cache import CacheError, open_cache
from vfs.cli import main
from vfs.data import open_dataset
from vfs.images import ImageError, load_image
from vfs.jobs import BuildJob, build_cache
from vfs.masks import crop_mask, grid_mask
from vfs.search import RegionQuery, search_regions
from vfs.sources import ArrayFeatures

SIZE = 64  # model input: Lite0 blocks.5 gives a 2×2 grid


# --------------------------------------------------------------------------- the corpus


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds no pixel data: tiny file, huge header (a bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def two_colour(size=(48, 24)) -> Image.Image:
    """Left half red, right half blue: shows which way an image was rotated."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def corpus() -> tuple[dict[str, bytes], dict[str, bytes], dict[str, tuple[bytes, str]]]:
    """(good, odd but legal, bad with the expected reason), as file name → bytes."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    png, jpeg = encode(noise, "PNG"), encode(noise, "JPEG", quality=90)
    gradient = Image.fromarray(
        np.broadcast_to(np.linspace(0, 255, 90, dtype=np.uint8)[None, :, None], (70, 90, 3)).copy()
    )

    palette = Image.new("P", (40, 30))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 20, 30))  # left half red, right half index 0 = transparent
    grey_alpha = Image.new("LA", (40, 30), (90, 255))
    grey_alpha.paste((0, 0), (20, 0, 40, 30))  # right half fully transparent
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    gif = Image.new("P", (30, 30))
    gif.putpalette([0, 128, 0] * 256)

    good = {
        "good_noise.png": png,
        "good_noise.jpg": jpeg,
        "sub/good_gradient.jpg": encode(gradient, "JPEG", quality=95),
    }
    odd = {
        "deep16.png": encode(
            Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "PNG"
        ),
        "cmyk.jpg": encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95),
        "palette_transparent.png": encode(palette, "PNG", transparency=0),
        "grey.png": encode(Image.new("L", (40, 30), 100), "PNG"),
        "grey_alpha.png": encode(grey_alpha, "PNG"),
        "float.tif": encode(Image.fromarray(rng.random((30, 40)).astype(np.float32)), "TIFF"),
        "exif_rotated.jpg": encode(two_colour(), "JPEG", exif=exif, quality=95),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
        "animated.gif": encode(gif, "GIF", save_all=True, append_images=[gif.copy()]),
        "huge_legal.jpg": encode(Image.new("RGB", (8192, 4800), (20, 160, 40)), "JPEG", quality=75),
        "wide_legal.png": encode(Image.new("RGB", (6000, 40), (20, 160, 40)), "PNG"),
    }
    bad = {
        "zero.jpg": (b"", "empty file"),
        "zero.png": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated image"),
        "truncated.png": (png[: len(png) // 2], "truncated image"),
        "truncated_header.png": (png[:40], "not an image"),
        "text.jpg": (b"hello, I am not a JPEG\n" * 8, "not an image"),
        "vector.png": (b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>", "not an image"),
        "phone.jpg": (
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
            "not an image",
        ),  # HEIC
        "bad_header.bmp": (b"BM" + bytes(60), "corrupt or unsupported"),
        "bomb.png": (png_header(10_000, 10_000), "exceeds the limit"),  # 1e8 px: over VFS's limit
        "bomb_huge.png": (png_header(40_000, 40_000), "exceeds the limit"),  # PIL's own guard fires
    }
    return good, odd, bad


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build over the whole corpus; returns (cache, folder, good, odd, bad)."""
    folder = tmp_path_factory.mktemp("corpus")
    good, odd, bad = corpus()
    write(folder, good | odd | {name: content for name, (content, _) in bad.items()})
    (folder / "not_an_image.txt").write_text("ignored: not an image extension")
    (folder / "folder.jpg").mkdir()  # a folder with an image's name is not a candidate
    out = tmp_path_factory.mktemp("caches") / "corpus.zarr"
    cache = build_cache(  # bomb.png is refused in words, without PIL's warning
        BuildJob(
            layer="blocks.5", data=str(folder), out=str(out), image_size=SIZE, batch_size=8, device="cpu"
        )
    )
    return cache, folder, good, odd, bad


# --------------------------------------------------------------------------- images in a build


def test_build_stores_good_and_odd_images_and_reports_bad_ones(built):
    cache, _, good, odd, bad = built
    assert cache.complete
    stored = set(cache.manifest["path"])
    assert stored == set(good) | set(odd)
    skipped = {s["path"]: s["reason"] for s in cache.report["skipped"]}
    assert set(skipped) == set(bad)
    for name, (_, reason) in bad.items():
        assert reason in skipped[name], (name, skipped[name])
        assert "\n" not in skipped[name] and len(skipped[name]) < 300
    assert cache.report["candidates"] == len(good) + len(odd) + len(bad) == cache.n + len(bad)
    x = cache.features[:]
    assert np.isfinite(x.astype(np.float32)).all() and (cache.sqnorm[:] > 0).all()


def test_odd_images_are_normalised_in_the_stored_view(built):
    cache, *_ = built
    row = {p: i for i, p in enumerate(cache.manifest["path"])}
    rotated = cache.thumb(row["exif_rotated.jpg"]).astype(int)  # 48×24 landscape shown as 24×48 portrait
    assert rotated[4, SIZE // 2, 0] > 200 and rotated[4, SIZE // 2, 2] < 60  # the red half is on top
    assert rotated[-5, SIZE // 2, 2] > 200 and rotated[-5, SIZE // 2, 0] < 60
    grey = cache.thumb(row["grey.png"]).astype(int)
    assert (grey == 100).all()
    palette = cache.thumb(row["palette_transparent.png"]).astype(int)
    assert tuple(palette[32, 2]) == (255, 0, 0) and tuple(palette[32, -3]) == (
        255,
        255,
        255,
    )  # transparent → white
    cmyk = cache.thumb(row["cmyk.jpg"]).astype(int)
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60
    deep = cache.thumb(row["deep16.png"]).astype(int)
    assert deep.max() > 200 and deep.std() > 20  # 16-bit scaled down, not clipped to white
    assert (cache.thumb(row["huge_legal.jpg"]).astype(int)[..., 1] > 120).all()


@pytest.mark.parametrize(
    "name",
    ["deep16.png", "cmyk.jpg", "palette_transparent.png", "grey_alpha.png", "float.tif", "exif_rotated.jpg"],
)
def test_an_image_handed_over_opened_gives_the_features_of_its_file(built, extractor, name):
    """A notebook's `ex.features(Image.open(f))` sees what a build or `--image f` sees: 16-bit
    greys rescaled, transparency on white, the EXIF orientation applied (before, a bare RGB
    convert clipped, blackened and ignored them)."""
    folder = built[1]
    with Image.open(folder / name) as opened:
        handed = extractor.features(opened)
    np.testing.assert_array_equal(handed, extractor.features(load_image(folder / name)))
    np.testing.assert_array_equal(handed, extractor.features(str(folder / name)))  # a path: the same


def test_features_of_what_is_no_image_say_so(built, extractor):
    """`ex.features("photo.jpg")` raised AttributeError ('str' object has no attribute 'load')."""
    with pytest.raises(ImageError, match="not a readable image"):
        extractor.features(built[1] / "text.jpg")
    with pytest.raises(
        TypeError, match=r"8-bit pixels, \(H, W\) or \(H, W, 3 \| 4\); got float32 \(8, 8, 3\)"
    ):
        extractor.features(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="an image array or an image file's path, not list"):
        extractor.features([[0, 0]])
    pixels = np.asarray(load_image(built[1] / "good_noise.png"))
    np.testing.assert_array_equal(extractor.features(pixels), extractor.features(Image.fromarray(pixels)))


def test_huge_legal_image_is_decoded_small(built):
    folder = built[1]
    image = load_image(folder / "huge_legal.jpg")
    assert image.size == (4096, 2400)  # drafted at half scale by the JPEG decoder: never 39 Mpx in memory
    assert max(load_image(folder / "wide_legal.png").size) == 4096
    with pytest.raises(ImageError, match="exceeds the limit of 1000000 pixels"):
        load_image(folder / "huge_legal.jpg", max_pixels=1_000_000)


def test_a_read_that_fails_through_no_fault_of_the_image_is_no_bad_image(tmp_path):
    """Too many files open (a real EMFILE) was "cannot read file", the image skipped for good by a
    build whose cache was then complete; the machine's faults are raised as they are (a build
    stops and resumes), the file's own (gone, not readable) still make an ImageError."""
    import resource

    path = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        with pytest.raises(OSError) as raised:
            while True:
                held.append(open(path, "rb"))  # held open until the limit is reached
        assert raised.value.errno == errno.EMFILE
        with pytest.raises(OSError, match="Too many open files") as raised:
            load_image(path)
        assert not isinstance(raised.value, ImageError)
    finally:
        for file in held:
            file.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert load_image(path).size == (8, 8)
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "gone.png")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def extractor():
    from vfs.models import load_extractor

    return load_extractor("embedded:efficientnet_lite0", "blocks.5", SIZE)


@pytest.fixture
def shared_extractor(extractor, monkeypatch):
    """The CLI loads the cache's extractor on each call; share one loaded model between the calls."""
    monkeypatch.setattr("vfs.cache.reader.load_extractor", lambda spec, layer, *args, **kwargs: extractor)
    return extractor


@pytest.fixture(scope="module")
def mask_file(built, tmp_path_factory):
    path = tmp_path_factory.mktemp("masks") / "all.npy"
    np.save(path, np.ones(built[0].spec.grid, np.float32))
    return path


@pytest.mark.parametrize(
    "name", ["zero.jpg", "truncated.jpg", "text.jpg", "phone.jpg", "bomb.png", "missing.png"]
)
def test_cli_search_with_a_bad_query_image_is_one_error_line(
    built, mask_file, shared_extractor, name, capsys
):
    cache, folder, *_ = built
    code = main(["search", cache.location, "--image", str(folder / name), "--mask", str(mask_file)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], err
    assert "Traceback" not in err
    if name != "missing.png":  # the file is there, but not an image VFS can decode
        assert f"{folder / name}: not a readable image — " in lines[0]
        # the formats VFS reads where the format is the question, not for an empty or cut file
        assert (".webp" in lines[0]) == (name in ("text.jpg", "phone.jpg")), lines[0]


def test_cli_image_of_the_caches_own_is_searched_as_that_image(built, mask_file, shared_extractor, capsys):
    """An --image that is a file of the cache's dataset ranked first among the others (score ≈ 1),
    and --exclude-same refused it ("an --image has no manifest row"): it is that image, searched as
    its index — left out unless --include-query, its value's images with --exclude-same (as the
    app's uploads; researcher review)."""
    cache, folder, good, *_ = built
    name = sorted(good)[0]
    index = cache.manifest["path"].tolist().index(name)
    argv = ["search", cache.location, "--image", str(folder / name), "--mask", str(mask_file), "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert (
        err == f"note: {folder / name} is image {index} of the cache (the same features): searched as it "
        "(left out of the results unless --include-query)\n"
    )
    found = json.loads(out)
    assert found["query"] == {"image": str(folder / name), "index": index} and found["excluded"] == [index]
    assert main([*argv, "--include-query"]) == 0
    assert json.loads(capsys.readouterr()[0])["results"][0]["index"] == index
    other = folder.parent / "other.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(other)
    assert (
        main(
            [
                "search",
                cache.location,
                "--image",
                str(other),
                "--mask",
                str(mask_file),
                "--exclude-same",
                "path",
            ]
        )
        == 2
    )
    assert "--exclude-same is for a query image of the cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (MemoryError(), "out of memory (MemoryError)"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory"),
            "DefaultCPUAllocator: can't allocate memory",
        ),
    ],
)
def test_cli_search_out_of_memory_is_one_error_line_with_the_way_on(
    built, mask_file, capsys, monkeypatch, error, says
):
    """A MemoryError was a traceback and exit 1 where the CLI promises one line and exit 2
    (failure-injection review); a search says how to stream the cache instead, PyTorch's allocator's
    failure too (diff review)."""

    def short(*args, **kwargs):
        raise error

    monkeypatch.setattr("vfs.search.search_regions", short)
    code = main(["search", built[0].location, "--query-index", "0", "--mask", str(mask_file)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err == f"error: {says} (--memory-budget streams a cache larger than the memory free)\n"


@pytest.mark.parametrize(
    "mask,content,message",
    [
        ("text.png", b"not a png", "cannot read the mask image"),
        ("truncated.png", None, "cannot read the mask image"),
        ("bomb.png", png_header(10_000, 10_000), "exceeds the limit"),
        # the images' own guard (vfs.images.opened_within): a mask read a 2×30,000 strip whole
        ("strip.png", png_header(2, 30_000), "a strip of 2x30000 pixels"),
        ("pickled.npy", None, "must hold numbers, not object"),  # its header says so: never loaded
        ("strings.npy", None, "must hold numbers"),
        ("wrong_shape.npy", None, "grid's shape"),
        ("zeros.npy", None, "empty"),
        ("nan.npy", None, "NaN"),
        # 200 bytes whose header declares 100,000² float64 (75 GiB): np.load allocated it first, then
        # mapping it failed with mmap's words ("mmap length is greater than file size": docs review)
        ("huge.npy", None, "grid's shape (2, 2); got (100000, 100000)"),
        ("short.npy", None, "cannot read the mask"),  # the grid's shape, but two of its four values
        ("v3.npy", None, "cannot read the mask (.npy format version 3.0"),
    ],
)
def test_cli_bad_mask_files_are_one_error_line(built, tmp_path, capsys, mask, content, message):
    cache = built[0]
    path = tmp_path / mask
    if mask == "truncated.png":
        content = encode(Image.new("L", (64, 64), 255), "PNG")[:60]
    if content is not None:
        path.write_bytes(content)
    elif mask == "pickled.npy":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif mask == "strings.npy":
        np.save(path, np.array([["a", "b"], ["c", "d"]]))
    elif mask == "short.npy":
        np.save(path, np.ones((2, 2)))
        path.write_bytes(path.read_bytes()[:-16])
    elif mask == "v3.npy":
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.ones((2, 2)), version=(3, 0))
    elif mask == "huge.npy":
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8", "fortran_order": False, "shape": (10**5,) * 2}
            )
    else:
        np.save(
            path,
            {
                "wrong_shape.npy": np.ones((3, 3)),
                "zeros.npy": np.zeros((2, 2)),
                "nan.npy": np.full((2, 2), np.nan),
            }[mask],
        )
    code = main(["search", cache.location, "--query-index", "0", "--mask", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_per_domain_on_a_cache_without_domains_names_the_flag(built, tmp_path, capsys):
    """It said "per_domain needs a dataset with a domain column": the engine's parameter, not the
    flag, nor what to do (CLI review)."""
    np.save(mask := tmp_path / "m.npy", np.ones((2, 2)))
    code = main(["search", built[0].location, "--query-index", "0", "--mask", str(mask), "--per-domain", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--per-domain needs a cache with a domain column" in err and "--domain-col" in err, (
        err
    )


def test_a_dataset_image_made_a_bomb_since_the_build_gives_no_size_and_one_error_line(tmp_path, capsys):
    """A mask painted on a dataset image is placed by that image's size, read from its header: an
    image replaced since the build by one past twice the pixel limit (PIL refuses even its header)
    raised DecompressionBombError (security review). Its size is then unknown, as for an image
    that is gone: a mask must be the view's square."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        two_colour().save(folder / f"{i}.png")
    out = tmp_path / "c.zarr"
    cache = build_cache(
        BuildJob(layer="blocks.5", data=str(folder), out=str(out), image_size=SIZE, device="cpu")
    )
    assert cache.image_size(0) == (24, 48)
    (folder / "0.png").write_bytes(png_header(20_000, 10_000))
    assert cache.image_size(0) is None
    mask = tmp_path / "mask.png"
    Image.new("L", (48, 24), 255).save(mask)  # the image's shape, not the view's square
    assert main(["search", str(out), "--query-index", "0", "--mask", str(mask)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mask.png is 48×24 px") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("given", ["0", "-1", "two"])
def test_cli_a_per_domain_limit_below_one_is_refused_in_the_clis_words(built, mask_file, capsys, given):
    """It said "per_domain must be … (or None for no limit)": Python's words in a shell."""
    cache = built[0]
    with pytest.raises(SystemExit) as exit_:
        main(
            ["search", cache.location, "--query-index", "0", "--mask", str(mask_file), "--per-domain", given]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --per-domain: a whole number ≥ 1" in err and "None" not in err


@pytest.mark.parametrize("shards", ["0", "-2", "99999"])
def test_cli_a_bad_shard_count_is_refused_before_any_cluster_starts(
    built, mask_file, capsys, monkeypatch, shards
):
    pytest.importorskip("ray")

    def no_cluster(*args, **kwargs):
        raise AssertionError("a Ray cluster was started before the shard count was checked")

    monkeypatch.setattr("vfs.cluster.sharded.connect", no_cluster)
    cache = built[0]
    code = main(
        ["search", cache.location, "--query-index", "0", "--mask", str(mask_file), "--shards", shards]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"shards must be 1..{cache.n} (the cache's images), not {shards}" in err, err


def test_cli_a_mask_painted_on_the_query_photo_is_cropped_as_the_model_saw_it(
    built, shared_extractor, tmp_path, capsys
):
    cache = built[0]
    photo = tmp_path / "photo.png"
    Image.new("RGB", (640, 480), (90, 140, 60)).save(photo)
    strip = np.zeros((480, 640), np.uint8)
    strip[:, 560:] = 255  # right of the model's centre crop (stretched, it was the last grid column)
    Image.fromarray(strip).save(tmp_path / "strip.png")
    args = ["search", cache.location, "--image", str(photo), "--mask", str(tmp_path / "strip.png")]
    assert main(args) == 2
    assert "the painted region lies outside the part of the query the model sees" in capsys.readouterr().err
    Image.fromarray(strip[::2, ::3]).save(
        tmp_path / "other.png"
    )  # 214×240: neither the photo's shape nor square
    assert main([*args[:-1], str(tmp_path / "other.png")]) == 2
    assert "paint the region on the query image (640×480 px, or its shape)" in capsys.readouterr().err
    inside = np.zeros((480, 640), np.uint8)
    inside[100:400, 150:300] = 255  # the left half of what the model sees
    Image.fromarray(inside).save(tmp_path / "inside.png")
    assert main([*args[:-1], str(tmp_path / "inside.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mask"]["box"] == [0, 0, 2, 1]


def test_cli_a_query_index_opens_its_dataset_only_for_a_mask_whose_size_leaves_it_open(
    built, mask_file, tmp_path, monkeypatch, capsys
):
    """A .npy mask or one of the view's size needs no query image; a torchvision dataset would download."""
    import vfs.data

    opened = []
    real = vfs.data.open_dataset
    monkeypatch.setattr(vfs.data, "open_dataset", lambda *a, **kw: opened.append(a) or real(*a, **kw))
    cache = built[0]
    view = tmp_path / "view.png"
    Image.new("L", (SIZE, SIZE), 255).save(view)
    for mask in (mask_file, view):
        assert main(["search", cache.location, "--query-index", "0", "--mask", str(mask)]) == 0
    assert opened == []
    other = tmp_path / "other.png"
    Image.new("L", (SIZE + 10, SIZE + 10), 255).save(other)  # square, not the view's size: the photo's?
    assert main(["search", cache.location, "--query-index", "0", "--mask", str(other)]) == 0
    assert len(opened) == 1
    capsys.readouterr()


def test_cli_text_table_shows_no_column_the_cache_lacks(built, mask_file, capsys):
    cache = built[0]
    assert cache.label_col == "label" and cache.domain_col is None  # a folder of images: no domains
    code = main(["search", cache.location, "--query-index", "0", "--mask", str(mask_file), "--k", "3"])
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert code == 0 and header == ["rank", "index", "score", "label", "path", "grid_box"], out
    assert "None" not in out


def test_cli_output_into_a_closed_pipe_ends_quietly():
    """`python -m vfs models | head -1`: the reader left; no 'error: [Errno 32] Broken pipe'."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        run = subprocess.run(
            [sys.executable, "-m", "vfs", "models"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=120,
        )
    finally:
        os.close(write)
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_cli_bad_layer_names_the_command_that_lists_the_layers(tmp_path, capsys):
    """The engine's error carries the facts; the CLI words the next step as a CLI command."""
    code = main(
        [
            "build",
            "--layer",
            "blocks.99",
            "--data",
            "embedded:skimage",
            "--image-size",
            str(SIZE),
            "--limit",
            "2",
            "--out",
            str(tmp_path / "c.zarr"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no layer 'blocks.99'" in err and "blocks.5" in err
    assert err.strip().endswith(
        f"(list them all with python -m vfs layers embedded:efficientnet_lite0 --image-size {SIZE})"
    )
    assert "list_layers" not in err


JOB = 'layer = "blocks.5"\ndata = "embedded:skimage"\n'


@pytest.mark.parametrize(
    "job,flags,message",
    [
        (JOB, [], "job.toml: the job needs out: set it in its [build] table or by --out"),
        (
            JOB + "batch_size = 0\n",
            ["--out", "OUT"],
            "job.toml: batch_size must be a whole number ≥ 1; got 0",
        ),
        (JOB + 'batch_size = "8"\n', ["--out", "OUT"], "batch_size must be a whole number ≥ 1; got '8'"),
        (JOB + "workers = -1\n", ["--out", "OUT"], "workers must be a whole number ≥ 0; got -1"),
        (JOB + "layer = \n", ["--out", "OUT"], "job.toml: not a valid TOML file"),
        ("build = 3\n", ["--out", "OUT"], "job.toml: a job file needs a [build] table"),
        (None, ["--batch-size", "0"], "batch_size must be a whole number ≥ 1; got 0"),
        (None, ["--workers", "-2"], "workers must be a whole number ≥ 0; got -2"),
        (None, ["--image-size", "0"], "image_size must be a whole number ≥ 1; got 0"),
        (None, ["--limit", "0"], "limit must be a whole number ≥ 1; got 0"),
        # the writer took a URL for a folder: a tree named "http:" after the whole build (review)
        (None, ["--out", "http://127.0.0.1:9/new.zarr"], "out must be a folder on this machine, not a URL"),
        ("", ["--out", "OUT"], "job.toml: no such job file (a build is described by a TOML job file"),
    ],
)
def test_cli_bad_build_settings_are_one_error_line_and_create_nothing(tmp_path, capsys, job, flags, message):
    out = tmp_path / "c.zarr"
    flags = [str(out) if f == "OUT" else f for f in flags]
    if job is None:
        args = ["build", "--layer", "blocks.5", "--data", "embedded:skimage", "--out", str(out), *flags]
    else:
        if job:  # "": no file
            (tmp_path / "job.toml").write_text(f"[build]\n{job}" if not job.startswith("build") else job)
        args = ["build", str(tmp_path / "job.toml"), *flags]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob("*.zarr")) and not Path("http:").exists()


def test_a_job_file_is_completed_by_flags(tmp_path):
    (tmp_path / "job.toml").write_text(f"[build]\n{JOB}batch_size = 4\n")
    job = BuildJob.from_toml(tmp_path / "job.toml", out=str(tmp_path / "c.zarr"), batch_size=None, limit=3)
    assert (job.layer, job.out, job.batch_size, job.limit) == ("blocks.5", str(tmp_path / "c.zarr"), 4, 3)


def test_cli_layers_refuses_an_input_size_of_zero(capsys):
    assert main(["layers", "embedded:efficientnet_lite0", "--image-size", "0"]) == 2
    assert "the input size must be a whole number of pixels ≥ 1; got 0" in capsys.readouterr().err
    assert main(["layers", "embedded:efficientnet_lite0", "--image-size", "2"]) == 2  # not an empty list
    assert "no layer gives a spatial map of at least 2 cells at 2 px" in capsys.readouterr().err


def test_a_layer_too_small_at_an_input_size_names_the_listing_at_that_size(tmp_path, capsys):
    out = str(tmp_path / "c.zarr")
    argv = ["build", "--data", "embedded:skimage", "--layer", "blocks.5", "--image-size", "8", "--out", out]
    assert main(argv) == 2
    assert "(list them all with python -m vfs layers embedded:efficientnet_lite0 --image-size 8)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "cannot be read as a table"),
        ('path\n"unclosed\n', "cannot be read as a table"),
        ("path,label\n", "lists no images"),
    ],
)
def test_an_unreadable_or_empty_manifest_is_named(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ValueError, match=rf"manifest '.*m\.csv' {message}"):
        open_dataset(str(tmp_path / "m.csv"))


def test_cli_refuses_a_manifest_pointing_outside_its_root(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path,label\n../outside.png,x\n")
    code = main(["build", "--data", str(manifest), "--layer", "blocks.5", "--out", str(tmp_path / "c.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "outside the dataset root" in err and not (tmp_path / "c.zarr").exists()


def test_a_build_that_stores_no_image_fails_and_leaves_no_cache(tmp_path, capsys):
    """Every image unreadable (a manifest copied away from its images): an error naming the first
    reason, exit 2, and no 'complete' cache of nothing that a rerun after the fix would return."""
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path,label\na.png,x\nb.png,y\n")
    (tmp_path / "data" / "b.png").write_bytes(b"not an image")
    out = tmp_path / "c.zarr"
    code = main(
        ["build", "--data", str(manifest), "--layer", "blocks.5", "--image-size", "64", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "none of the 2 images could be read (the first, a.png:" in err, err
    assert "no cache is left" in err and not out.exists()


def test_a_rerun_of_a_complete_build_says_its_skipped_images_were_not_retried(tmp_path, capsys):
    """An image fixed after the build, the same build run again: it exited 0 and listed the image
    as skipped ("truncated") as if it had just been tried (API review)."""
    (tmp_path / "data").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "b.png").write_bytes(b"not an image")
    argv = ["build", "--data", str(tmp_path / "data"), "--layer", "blocks.5", "--image-size", "64"]
    argv += ["--out", str(tmp_path / "c.zarr")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "1 skipped\n" in first and "  skipped b.png:" in first and "not retried" not in first
    Image.fromarray(np.full((32, 32, 3), 40, np.uint8)).save(tmp_path / "data" / "b.png")  # fixed
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "1 skipped (as when it was built: it was complete, nothing was built now)" in again
    assert "not retried: a complete cache is not built again" in again
    chunks = sorted((tmp_path / "c.zarr" / "features").rglob("c/*/*/*/*"))
    chunks[0].unlink()  # a complete cache that lost a chunk file: the rerun computes its images again
    assert main(argv) == 0
    resumed = capsys.readouterr().out
    assert "nothing was built now" not in resumed and "not retried" not in resumed, resumed


@pytest.mark.parametrize("bad", ["../outside.png", "sub/../../outside.png", "/etc/hostname", "~/x.png"])
def test_manifest_paths_outside_the_root_are_refused(tmp_path, bad):
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "m.csv"
    pd.DataFrame({"path": ["ok.png", bad]}).to_csv(manifest, index=False)
    if bad.startswith("~"):  # a literal "~" folder inside the root is fine: it is not expanded
        assert open_dataset(str(manifest)).reader.resolve(bad).is_relative_to(tmp_path / "data")
        return
    with pytest.raises(ValueError, match="outside the dataset root.*link the image folder inside"):
        open_dataset(str(manifest))  # what to do about it too


# --------------------------------------------------------------------------- queries


def features(seed=0, n=12, grid=(5, 6), c=8):
    return np.maximum(np.random.default_rng(seed).standard_normal((n, *grid, c)), 0).astype(np.float16)


@pytest.mark.parametrize(
    "mask,message",
    [
        (np.zeros((5, 6)), "region is empty"),
        (np.ones((4, 6)), r"feature grid \(5, 6\): a mask holds one weight per feature cell, a 5×6 array"),
        (np.ones((5, 6, 1)), "a mask must be 2-D"),
        (np.full((5, 6), np.nan), "NaN or inf"),
        (np.where(np.eye(5, 6) > 0, np.inf, 0), "NaN or inf"),
        (-np.ones((5, 6)), "≥ 0"),
    ],
)
def test_bad_masks_are_refused_with_a_reason(mask, message):
    with pytest.raises(ValueError, match=message):
        search_regions(features(), 0, mask, device="cpu")


def test_a_stroke_thinner_than_a_cell_is_kept_with_small_weights():
    drawing = np.zeros((224, 224), bool)
    drawing[100, 40:180] = True  # one pixel high: 1/32 of a 7×7 cell
    mask = grid_mask(drawing, (7, 7))
    assert mask.max() == pytest.approx(1 / 32) and (mask > 0).sum() == 5
    assert mask.mean() == pytest.approx(drawing.mean())
    x = features(1, 20, (7, 7), 16)
    thin = search_regions(x, 3, mask, k=5, device="cpu")
    scaled = search_regions(x, 3, mask * 32, k=5, device="cpu")  # the same shape at full strength
    assert thin.top["index"].tolist() == scaled.top["index"].tolist() and thin.top["index"].iloc[0] == 3
    np.testing.assert_allclose(thin.scores, scaled.scores, atol=1e-6)


def test_a_faint_mask_does_not_underflow():
    """Scores do not depend on the mask's scale: 1e-5 × a mask must search like the mask itself,
    on the fast float16 path (the weights are rescaled to a peak of 1, nothing underflows)."""
    mask = np.zeros((5, 6), np.float32)
    mask[1:4, 2:5] = [[1, 0.5, 0.2], [0.7, 1, 0.3], [0.1, 0.9, 1]]
    x = features(2, 40)
    ref = search_regions(x, 7, mask, k=5, device="cpu")
    faint = search_regions(x, 7, mask * 1e-5, k=5, device="cpu")
    assert faint.top["index"].tolist() == ref.top["index"].tolist()
    np.testing.assert_array_equal(faint.scores, ref.scores)
    assert faint.rescored == ref.rescored < 40
    assert crop_mask(mask * 1e-30).weights.max() == 1


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(value):
    x = features(3).astype(np.float32)
    q = x[0].copy()
    q[2, 3, 1] = value
    mask = np.ones((5, 6), np.float32)
    with pytest.raises(ValueError, match="query features contain NaN or inf"):
        search_regions(x, q, mask, device="cpu")
    x[4, 1, 1, 0] = value
    with pytest.raises(
        ValueError, match=r"features of image\(s\) 4 \(1 in all\) contain NaN or inf: fix or drop"
    ):
        ArrayFeatures(x)
    with pytest.raises(ValueError, match="contain NaN or inf"):
        RegionQuery.create(q, mask)


# --------------------------------------------------------------------------- caches


def test_cache_of_another_model_layer_or_size_is_refused(built):
    cache = built[0]
    d = {
        "spec": cache.spec.model,
        "layer": cache.spec.layer,
        "input_size": SIZE,
        "grid": list(cache.spec.grid),
        "channels": cache.spec.channels,
    }
    cache.check_extractor(d)
    for key, other, message in [
        ("spec", "timm:resnet50", "spec 'embedded:efficientnet_lite0', not 'timm:resnet50'"),
        ("layer", "blocks.6", "layer 'blocks.5', not 'blocks.6'"),
        ("input_size", 224, "input_size 64, not 224"),
        ("channels", 320, "channels 192, not 320"),
    ]:
        with pytest.raises(CacheError, match=message):
            cache.check_extractor(d | {key: other})


def test_cache_of_another_layer_refused_for_a_real_extractor(built, extractor, tmp_path, capsys):
    from vfs.models import load_extractor

    ex = load_extractor("embedded:efficientnet_lite0", "blocks.4", SIZE)
    with pytest.raises(CacheError, match="layer 'blocks.5', not 'blocks.4'"):
        built[0].check_extractor(ex.describe())
    built[0].check_extractor(extractor.describe())  # its own extractor is accepted


def test_a_checkpoint_loaded_as_a_near_relative_of_its_architecture_is_refused(built, tmp_path):
    """The embedded model is timm's tf_efficientnet_lite0; its weights fit efficientnet_lite0 too,
    key for key — a network with other padding and normalisation, whose features scored the
    query's own image 0.58 against itself. Its weights digest is the cache's: the probe refuses it."""
    import torch

    from vfs.models import load_model

    cache = built[0]
    torch.save(load_model(cache.spec.model)[0].state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(CacheError, match=r"probe image features 0\.[5-9].* apart.*arch=efficientnet_lite0"):
        cache.extractor(f"file:{tmp_path / 'lite0.pth'}?arch=efficientnet_lite0")
    same = cache.extractor(f"file:{tmp_path / 'lite0.pth'}?arch=tf_efficientnet_lite0")
    assert same.weights == cache.spec.weights


def copy_cache(built, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "copy.zarr"
    shutil.copytree(built[0].location, dst)
    return dst


def chunk_file(cache_path: Path, array: str, chunk: int) -> Path:
    arr = zarr.open_array(str(cache_path / array), mode="r")
    return cache_path / array / arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))


@pytest.fixture
def small_chunked(tmp_path):
    """A 30-image cache written in 7-image chunks (through the real writer)."""
    from cachehelpers import synthetic_spec

    from vfs.cache import CacheWriter

    spec = synthetic_spec((2, 3), 4)
    cand = pd.DataFrame({"path": [f"{i}.png" for i in range(30)]})
    w = CacheWriter.open(tmp_path / "c.zarr", spec, cand, 8, chunk_images=7)
    x = features(5, 30, (2, 3), 4)
    x[8:14] = 0  # an all-zero chunk's worth of rows: still stored, so "missing" is never ambiguous
    for i in range(30):
        w.add(i, x[i], np.full((8, 8, 3), i, np.uint8))
    w.finish(cand)
    return tmp_path / "c.zarr", x


@pytest.mark.parametrize(
    "array,damage",
    [("features", "delete"), ("features", "truncate"), ("sqnorm", "delete"), ("sqnorm", "truncate")],
)
def test_missing_or_truncated_chunks_are_a_clear_error(small_chunked, array, damage):
    path, x = small_chunked
    ok = search_regions(open_cache(path), 0, np.ones((2, 3)), k=3, device="cpu")
    f = chunk_file(path, array, 2)  # rows 14..20
    assert f.is_file()
    if damage == "delete":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    for budget in (None, 1000):  # resident and streamed reads
        with pytest.raises(CacheError, match=r"copy|c\.zarr") as e:
            search_regions(open_cache(path), 0, np.ones((2, 3)), k=3, device="cpu", memory_budget=budget)
        assert "rows 14.." in str(e.value) and str(path) in str(e.value)  # streamed reads are smaller
        assert ("missing" if damage == "delete" else "cannot read") in str(e.value)
    if array == "features":  # the rows read for exact re-scoring, straight from their chunk files
        with pytest.raises(CacheError, match="rows 14.."):
            open_cache(path).rows(np.array([0, 20]))
    # rows elsewhere still read: the damage is reported where it is
    np.testing.assert_array_equal(open_cache(path).rows(np.array([0, 1, 27])), x[[0, 1, 27]])
    assert ok.top["index"].iloc[0] == 0


@contextmanager
def within(seconds: int):
    """Fail, rather than hang, where a read waits for ever (a pipe)."""

    def expired(*_):
        raise TimeoutError(f"still reading after {seconds} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def zstd_frame_declaring(size: int) -> bytes:
    """A zstd frame that declares `size` bytes decoded (RFC 8878: single segment, an 8-byte size) and
    holds one RLE block of one byte: all a hostile cache needs to make numcodecs allocate `size`."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little") + bytes([0x0B, 0, 0, 7])


@pytest.fixture
def zstd_features(small_chunked):
    """small_chunked with its features zstd-compressed (a codec a cache may use): each chunk file
    is then read and decoded whole."""
    path, x = small_chunked
    meta = path / "features" / "zarr.json"
    doc = json.loads(meta.read_text())
    zstd = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
    meta.write_text(json.dumps(doc | {"codecs": [*doc["codecs"], zstd]}))
    for f in (path / "features").rglob("c/**/*"):
        if f.is_file():
            f.write_bytes(numcodecs.Zstd().encode(f.read_bytes()))
    return path, x


@pytest.mark.parametrize(
    "stored,kind",
    [(stored, kind) for stored in ("plain", "zstd") for kind in ("/dev/zero", "a pipe", "a link out")]
    # a plain chunk file is read at the rows' offsets, never decoded: zstd data matters in zstd chunks
    + [("zstd", "a zstd bomb"), ("zstd", "two zstd frames")],
)
def test_a_chunk_file_no_build_writes_is_refused_before_it_is_read(
    small_chunked, zstd_features, stored, kind
):
    """A cache from someone else may hold a link to /dev/zero (a read without end: a MemoryError
    after gigabytes, or zeros taken as features), a pipe (a read that waits for ever), a link to a
    file outside it, or a zstd frame declaring any size (security review): each is refused at once,
    naming the rows it held."""
    path, x = zstd_features if stored == "zstd" else small_chunked
    cache = open_cache(path)
    np.testing.assert_array_equal(cache.rows(np.arange(30)), x)  # as written, before the damage
    target = chunk_file(path, "features", 1)  # rows 7..13
    target.unlink()
    if kind == "/dev/zero":
        target.symlink_to("/dev/zero")
    elif kind == "a pipe":
        os.mkfifo(target)
    elif kind == "a link out":
        outside = path.parent / "elsewhere.bin"
        outside.write_bytes(bytes(7 * 2 * 3 * 4 * 2))
        target.symlink_to(outside)
    elif kind == "a zstd bomb":
        target.write_bytes(zstd_frame_declaring(1 << 40))
    else:  # an empty first frame, then 30 MB: numcodecs decodes them all (code review)
        target.write_bytes(numcodecs.Zstd().encode(b"") + numcodecs.Zstd().encode(bytes(30 << 20)))
    why = {
        "/dev/zero": "leads out of the cache",
        "a pipe": "no regular file",
        "a link out": "leads out",
        "a zstd bomb": "declares 1,099,511,627,776 bytes",
        "two zstd frames": "declares 31,457,280 bytes",
    }[kind]
    match = rf"features rows 7..13 of the cache at {path}: .*{why}"
    with within(20):
        for read in (lambda: cache.rows(np.array([9])), lambda: search_regions(cache, 0, np.ones((2, 3)))):
            with pytest.raises(CacheError, match=match):
                read()
        np.testing.assert_array_equal(cache.rows(np.array([0, 20])), x[[0, 20]])  # the others still read


def test_metadata_or_a_zarr_decoded_chunk_no_build_writes_is_refused(small_chunked):
    """The same through zarr's reads: a `zarr.json` linked to /dev/zero (the app lists every cache
    in its folder) and a thumbnails chunk (zstd, decoded by zarr) that declares a terabyte."""
    path, _ = small_chunked
    per = open_cache(path).thumbs.chunks[0]
    bomb = chunk_file(path, "thumbs", 0)
    bomb.write_bytes(zstd_frame_declaring(1 << 40))
    with within(20), pytest.raises(CacheError, match="declares 1,099,511,627,776 bytes decoded"):
        open_cache(path).thumb(0)
    chunk_bytes = per * 8 * 8 * 3  # valid zstd of one byte more than a chunk: it would decode
    bomb.write_bytes(numcodecs.Zstd().encode(bytes(chunk_bytes + 1)))
    with pytest.raises(
        CacheError, match=f"declares {chunk_bytes + 1:,} bytes decoded, more than .*{chunk_bytes:,}"
    ):
        open_cache(path).thumb(0)
    assert open_cache(path).thumb(per).shape == (8, 8, 3)  # another chunk still reads
    meta = path / "sqnorm" / "zarr.json"
    meta.unlink()
    meta.symlink_to("/dev/zero")
    with within(20), pytest.raises(CacheError, match="sqnorm.*leads out of the cache"):
        open_cache(path)


def test_damaged_thumbs_and_manifest_are_a_clear_error(small_chunked):
    path, _ = small_chunked
    per = open_cache(path).thumbs.chunks[0]  # thumbnails have chunks of their own
    chunk_file(path, "thumbs", 9 // per).unlink()
    missing = f"thumbs rows {9 // per * per}..{9 // per * per + per - 1} are missing"
    cache = open_cache(path)
    assert cache.thumb(0)[0, 0, 0] == 0
    with pytest.raises(CacheError, match=missing):
        cache.thumb(9)
    with pytest.raises(CacheError, match=missing):
        cache.thumbs_at([0, 1, 9])
    assert cache.thumbs_at([0, 20]).shape == (2, 8, 8, 3)
    m = next((path / "manifest" / "path").rglob("c/*"))
    m.write_bytes(m.read_bytes()[:5])
    with pytest.raises(CacheError, match="cannot read the manifest"):
        open_cache(path).manifest


def test_unsupported_format_version_and_damaged_attributes(small_chunked):
    path, _ = small_chunked
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps(doc | {"attributes": doc["attributes"] | {"format_version": 3}}))
    with pytest.raises(
        CacheError, match=r"format version 3; this VFS reads versions 1, 2 \(a newer VFS made it\?\)"
    ):
        open_cache(path)
    meta.write_text(json.dumps(doc | {"attributes": {**doc["attributes"], "spec": {"model": "x"}}}))
    with pytest.raises(CacheError, match="attributes are damaged"):
        open_cache(path)
    meta.write_text("{ not json")
    with pytest.raises(CacheError, match="cannot open the cache"):
        open_cache(path)


@pytest.mark.parametrize(
    "where,value",
    [
        (("spec", "data", "label_col"), ["a"]),
        (("spec", "data", "source"), 5),
        (("spec", "model"), 5),
        (("spec", "layer"), {"a": 1}),
        (("spec", "preprocess", "resize_size"), 10**9),
        (("spec", "preprocess", "input_size"), 224.5),
        (("report",), "x"),
        (("report", "skipped"), "abc"),
        (("report", "skipped"), [{"path": 3}]),
        (("progress",), "x"),
        (("complete",), "false"),
        (("n",), 30.0),
    ],
)
def test_attributes_of_the_wrong_kind_are_damage_not_a_traceback(small_chunked, capsys, where, value):
    """A cache's attributes of another type than its writer's (a list for a column name, a number
    for the model, a report that is text, a resize to 10⁹ px) raised TypeError, AttributeError or
    MemoryError where they were used — `info`, a search by image, the app's cache picker (security
    review): they are damage, said when the cache is opened."""
    path, _ = small_chunked
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    attrs = doc["attributes"]
    *parents, last = where
    node = attrs
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    meta.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=f"{path}: its attributes are damaged"):
        open_cache(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err


def test_a_cache_holding_nan_is_refused(small_chunked):
    path, _ = small_chunked
    sq = zarr.open_array(str(path / "sqnorm"), mode="r+")
    sq[20] = np.nan  # a hostile or corrupted cache: the writer itself never stores NaN
    with pytest.raises(CacheError, match="NaN or inf features \\(first at row 20\\)"):
        search_regions(open_cache(path), 0, np.ones((2, 3)), device="cpu")


def test_the_writer_skips_images_whose_features_overflow(tmp_path):
    from cachehelpers import synthetic_spec

    from vfs.cache import CacheWriter

    spec = synthetic_spec((2, 2), 3, input_size=8, model="m", layer="l")
    cand = pd.DataFrame({"path": ["a.png", "b.png", "c.png"]})
    w = CacheWriter.open(tmp_path / "c.zarr", spec, cand, 4)
    x = np.ones((3, 2, 2, 3), np.float16)
    x[1, 0, 0, 0] = np.inf
    for i in range(3):
        w.add(i, x[i], np.zeros((4, 4, 3), np.uint8))
    w.finish(cand)
    c = open_cache(tmp_path / "c.zarr")
    assert c.n == 2 and c.report["skipped"][0]["path"] == "b.png"
    assert "NaN or inf" in c.report["skipped"][0]["reason"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hostile_cache_formats_are_refused_before_decoding(small_chunked, tmp_path):
    path, _ = small_chunked
    meta = path / "sqnorm" / "zarr.json"
    doc = json.loads(meta.read_text())
    meta.write_text(
        json.dumps(doc | {"codecs": doc["codecs"] + [{"name": "numcodecs.bz2", "configuration": {}}]})
    )
    with pytest.raises(CacheError, match="uses codec\\(s\\) numcodecs.bz2, which VFS does not read"):
        open_cache(path)
    meta.write_text(json.dumps(doc | {"codecs": [{"name": "no.such.codec", "configuration": {}}]}))
    with pytest.raises(CacheError, match="the metadata of its 'sqnorm' array cannot be read"):
        open_cache(path)
    # codecs whose decoded size no header bounds, and sharding (inner chunks read by byte range): no
    # VFS wrote them, and a 300 KB gzip chunk decoded to 300 MB (code review)
    gzip = {"name": "gzip", "configuration": {"level": 5}}
    meta.write_text(json.dumps(doc | {"codecs": [*doc["codecs"], gzip]}))
    with pytest.raises(CacheError, match="uses codec\\(s\\) gzip, which VFS does not read"):
        open_cache(path)
    dotted = {"name": "default", "configuration": {"separator": "."}}  # keys the stores' checks do not read
    meta.write_text(json.dumps(doc | {"chunk_key_encoding": dotted}))
    with pytest.raises(CacheError, match="'sqnorm' names its chunks otherwise than VFS writes them"):
        open_cache(path)
    meta.write_text(json.dumps(doc | {"data_type": "float64"}))
    with pytest.raises(CacheError, match="holds float64, not float32"):
        open_cache(path)
    huge = {**doc["chunk_grid"], "configuration": {"chunk_shape": [2**40, 2, 3]}}
    meta.write_text(json.dumps(doc | {"chunk_grid": huge}))
    with pytest.raises(CacheError, match="declares chunks .* of more than 1024 MiB"):
        open_cache(path)
    meta.write_text(json.dumps(doc))
    column = path / "manifest" / "path" / "zarr.json"  # the tables too (read when first asked for)
    text = json.loads(column.read_text())
    column.write_text(
        json.dumps(text | {"chunk_grid": {**text["chunk_grid"], "configuration": {"chunk_shape": [2**40]}}})
    )
    with pytest.raises(CacheError, match="'manifest/path' declares chunks .* of more than 1024 MiB"):
        open_cache(path).manifest
    column.write_text(
        json.dumps(
            text
            | {
                "data_type": "float64",
                "fill_value": 0.0,
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            }
        )
    )
    with pytest.raises(CacheError, match="column 'path' holds float64, not text"):
        open_cache(path).manifest
    # a zarr 2 group (whose codecs could include pickle) is not even looked into
    v2 = tmp_path / "v2.zarr"
    (v2 / "features").mkdir(parents=True)
    (v2 / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (v2 / ".zattrs").write_text(json.dumps({"format": "vfs-feature-cache", "format_version": 1}))
    with pytest.raises(CacheError, match="a VFS cache is a zarr 3 group"):
        open_cache(v2)


def test_an_older_cache_without_its_all_zero_chunk_files_still_searches(small_chunked):
    """Caches written before `all_chunks_stored` may lack the files of all-zero chunks (zarr skips
    them): those read as zeros through every path (resident, streamed, rows), not as damage."""
    path, x = small_chunked
    mask = np.ones((2, 3))
    before = search_regions(open_cache(path), 0, mask, k=5, device="cpu")
    g = zarr.open_group(str(path), mode="r+")
    for name in ("features", "sqnorm"):
        g[name][7:14] = 0  # chunk 1 all zeros, as such a cache would hold it
        chunk_file(path, name, 1).unlink(missing_ok=True)  # zarr drops an all-fill-value chunk itself
    del g.attrs["all_chunks_stored"]
    x = x.copy()
    x[7:14] = 0
    ref = search_regions(x, 0, mask, k=5, device="cpu")
    for budget in (None, 1000):
        got = search_regions(open_cache(path), 0, mask, k=5, device="cpu", memory_budget=budget)
        np.testing.assert_allclose(got.scores, ref.scores, atol=2e-3)
        assert got.top["index"].tolist() == ref.top["index"].tolist()
    assert not open_cache(path).rows(np.array([8, 20])).astype(bool)[0].any()
    assert before.top["index"].iloc[0] == 0


def test_cli_names_a_manifest_column_lost_on_disk_and_its_rerun_writes_it_again(tmp_path, capsys):
    """`info` says DAMAGED and which column; the rerun of the same build says it in one line (not
    Python's warning with its file, line and source, which reads as a trace) and mends it."""
    (tmp_path / "data").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(tmp_path / "data" / f"{i}.png")
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path,label\n0.png,a\n1.png,b\n2.png,a\n")
    out = tmp_path / "c.zarr"
    argv = ["build", "--data", str(manifest), "--layer", "blocks.5", "--image-size", "64", "--out", str(out)]
    assert main(argv) == 0
    (out / "manifest" / "label" / "c" / "0").unlink()
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "DAMAGED: manifest column 'label' missing on disk — rerun its build" in capsys.readouterr().out
    assert main(argv) == 0
    said = capsys.readouterr()
    err = said.err
    assert (
        f"warning: {out}: its manifest's column(s) 'label' are missing, garbled or cut short on disk" in err
    )
    assert (
        "(repaired: what it had lost or garbled on disk was written again" in said.out
    )  # not as a fresh build's
    assert "UserWarning" not in err and "CacheWriter.open" not in err
    assert open_cache(out).manifest["label"].tolist() == ["a", "b", "a"]


@pytest.mark.parametrize("budget", ["1e400", "inf", "nan"])
def test_a_memory_budget_beyond_any_number_is_a_usage_error(budget, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["search", "c.zarr", "--query-index", "0", "--mask", "m.npy", "--memory-budget", budget])
    assert stopped.value.code == 2
    assert f"--memory-budget: not a size: '{budget}'" in capsys.readouterr().err


def test_bad_arguments_are_one_error_line_naming_the_usage(capsys):
    """argparse printed its usage block before the error, where docs/cli.md promises one line."""
    with pytest.raises(SystemExit) as stopped:
        main(["search", "c.zarr", "--query-index", "0", "--mask", "m.npy", "--k", "abc"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "python -m vfs search: error: argument --k: invalid int value: 'abc' "
        "(usage: python -m vfs search --help)\n"
    )
    assert main([]) == 2  # no command: the commands, not an error
    assert "{models,layers,build,info,check,search}" in capsys.readouterr().err
    # an option the command does not have: its usage, not the top one's, which lists no options (review)
    with pytest.raises(SystemExit) as stopped:
        main(["search", "c.zarr", "--query-index", "0", "--mask", "m.npy", "--layer", "x"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "python -m vfs search: error: unrecognized arguments: --layer x (usage: python -m vfs search --help)\n"
    )


def test_an_input_size_at_which_no_layer_is_spatial_says_so():
    """`--image-size 1`: 'slice step cannot be zero' (helper trial)."""
    from vfs.models import load_extractor

    with pytest.raises(
        ValueError, match="no layer gives a spatial map at input size 1: choose a larger input"
    ):
        load_extractor("embedded:efficientnet_lite0", "blocks.5", image_size=1)


def test_a_complex_array_or_a_bool_query_is_refused_not_taken_for_another():
    """A complex64 array lost its imaginary parts with a warning, and `query=True` was image 1
    (helper trial)."""
    feats = np.random.default_rng(0).standard_normal((5, 3, 3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="features must be real numbers, not torch.complex64"):
        search_regions(feats.astype(np.complex64), 0, np.ones((3, 3)))
    with pytest.raises(TypeError, match="an image index, a feature map or a RegionQuery, not a bool"):
        search_regions(feats, True, np.ones((3, 3)))


def test_a_job_file_that_is_no_text_or_a_folder_is_named(tmp_path, capsys):
    (tmp_path / "mask.npy").write_bytes(b"\x93NUMPY\x01\x00")
    for job, message in [
        (tmp_path / "mask.npy", "not a valid TOML file"),
        (tmp_path, "a folder, not a job file"),
    ]:
        assert main(["build", str(job)]) == 2
        assert f"error: {job}: {message}" in capsys.readouterr().err


def test_a_float_image_with_nan_and_inf_is_read_without_warnings(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0], values[1, 1], values[2, 2] = np.nan, np.inf, -np.inf
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(tmp_path / "f.tif")
    pixels = np.asarray(image)[..., 0]
    assert pixels[1, 1] == 255 and pixels[0, 0] == pixels[2, 2] == 0 and pixels[7, 7] == 255
