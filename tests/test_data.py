"""Tests for vfs.data: dataset sources, safe image decoding, and the DataLoader adaptor.

All inputs are generated under tmp_path; the real sets in shared/data are optional.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from vfs.data import (
    EMBEDDED_DATASET,
    DatasetUnavailable,
    DataSpec,
    TorchImageDataset,
    collate_skipping,
    open_dataset,
)
from vfs.images import ImageError, load_image
from vfs.stats import MISSING, label_groups, presence

SHARED_DATA = Path(os.environ.get("VFS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data at {SHARED_DATA}")


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds no pixel data (empty IDAT): tiny file, huge header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


# --------------------------------------------------------------------------- sources


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    save(tmp_path / "dogs" / "b.PNG", solid())
    save(tmp_path / "cats" / "x" / "a.jpg", solid())
    save(tmp_path / "root.png", solid())
    (tmp_path / "notes.txt").write_text("not an image")
    save(tmp_path / "cats" / ".hidden.png", solid())

    ds = open_dataset(str(tmp_path))

    assert ds.records["path"].tolist() == ["cats/x/a.jpg", "dogs/b.PNG", "root.png"]
    assert ds.label_col == "label" and ds.domain_col is None
    assert ds.records["label"].tolist()[:2] == ["cats", "dogs"]
    assert pd.isna(ds.records["label"].iloc[2])  # root files: missing label, not a class ""
    assert label_groups(ds.records, "label").columns.tolist() == [MISSING, "cats", "dogs"]
    assert ds.load(0).mode == "RGB" and ds.load(0).size == (12, 10)


def test_a_folder_dataset_lists_its_dangling_links_for_the_build_to_report(tmp_path: Path) -> None:
    """A link to a file gone, or a loop of links: silently left out, where a manifest naming them
    has them reported as skipped (helper trial)."""
    save(tmp_path / "a.png", solid())
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "d.png").symlink_to(tmp_path / "e.png")
    (tmp_path / "e.png").symlink_to(tmp_path / "d.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "folder.png").symlink_to(tmp_path / "sub")  # a link to a folder is no image
    ds = open_dataset(str(tmp_path))
    assert ds.records["path"].tolist() == ["a.png", "d.png", "e.png", "gone.png"]
    for i in (1, 2, 3):
        with pytest.raises(ImageError, match="cannot read file"):
            ds.load(i)


def test_folder_without_subfolders_has_no_label(tmp_path: Path) -> None:
    for name in ("b.png", "a.bmp", "c.webp"):
        save(tmp_path / name, solid())
    ds = open_dataset(str(tmp_path))
    assert ds.records.columns.tolist() == ["path"]
    assert ds.records["path"].tolist() == ["a.bmp", "b.png", "c.webp"]
    assert ds.label_col is None


def test_folder_labels_skip_shared_wrapper_folder(tmp_path: Path) -> None:
    save(tmp_path / "unzipped" / "cat" / "1.png", solid())
    save(tmp_path / "unzipped" / "dog" / "2.png", solid())
    ds = open_dataset(str(tmp_path))
    assert ds.records["label"].tolist() == ["cat", "dog"]
    assert ds.records["path"].tolist() == ["unzipped/cat/1.png", "unzipped/dog/2.png"]


def test_empty_folder_and_unknown_source_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        open_dataset(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"^no such folder or file: '.*missing'; a dataset is an image folder"
    ):
        open_dataset(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a folder or a .csv/.parquet file: give an image folder"):
        open_dataset(str(tmp_path / "notes.txt"))


def test_a_relative_dataset_path_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """The app's server runs from its own folder: "../shared/data/…/manifest.csv" typed on the Build
    page is read from there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"from {tmp_path}: {tmp_path / 'data' / 'manifest.csv'}"):
        open_dataset("data/manifest.csv")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_keeps_columns_and_resolves_relative_paths(tmp_path: Path, suffix: str) -> None:
    save(tmp_path / "img" / "a.png", solid((0, 0, 255)))
    save(tmp_path / "img" / "b.png", solid())
    table = pd.DataFrame(
        {
            "label": ["x", "y"],
            "path": ["img/a.png", str(tmp_path / "img" / "b.png")],
            "domain": ["d1", "d2"],
            "age": [3, 4],
        }
    )
    manifest = tmp_path / f"manifest{suffix}"
    if suffix == ".csv":
        table.to_csv(manifest, index=False)
    else:
        table.to_parquet(manifest)

    ds = open_dataset(str(manifest))
    unlabelled = open_dataset(str(manifest), label_col="", domain_col="")
    assert (unlabelled.label_col, unlabelled.domain_col) == (None, None)  # "": none, not the default

    assert ds.records.columns.tolist() == ["path", "label", "domain", "age"]
    assert ds.records["age"].tolist() == [3, 4]
    assert (ds.label_col, ds.domain_col) == ("label", "domain")
    assert ds.load(0).getpixel((0, 0)) == (0, 0, 255)
    assert ds.load(1).getpixel((0, 0)) == (200, 30, 30)  # absolute path inside the root is fine


def test_a_csv_manifest_keeps_its_values_as_written(tmp_path: Path) -> None:
    """pandas took "NA" (North America), "None", "null", "n/a" for missing values and read the ID
    "0012" as the number 12 (helper trial); only an empty cell is missing now, and a column with a
    number written with a leading zero stays text. Other numbers and booleans are still typed."""
    for name in "abc":
        save(tmp_path / f"{name}.png", solid())
    (tmp_path / "m.csv").write_text(
        "path,label,domain,patient,age,weight,sick\n"
        "a.png,NA,NA, 0012,3,NA,True\n"
        "b.png,None,null,0013,,nan,False\n"
        "c.png,,EU,14,5.5,70,True\n"
    )
    records = open_dataset(str(tmp_path / "m.csv")).records
    assert records["label"].tolist()[:2] == ["NA", "None"] and pd.isna(records["label"][2])
    assert records["domain"].tolist() == ["NA", "null", "EU"]
    assert records["patient"].tolist() == [" 0012", "0013", "14"]
    assert records["age"].tolist()[::2] == [3.0, 5.5] and pd.isna(records["age"][1])
    assert records["weight"].isna().tolist() == [True, True, False]  # R's NA, numpy's nan: no number
    assert str(records["weight"].dtype) == "Int64"  # whole numbers with gaps: not "70.0" (data review)
    assert records["sick"].tolist() == [True, False, True]
    # a missing value written with spaces, and a number past int64: they read, as before (review)
    (tmp_path / "n.csv").write_text("path,a,b\na.png, NA ,12345678901234567890\nb.png,,\nc.png,3,1\n")
    records = open_dataset(str(tmp_path / "n.csv")).records
    assert str(records["a"].dtype) == "Int64" and records["a"].isna().tolist() == [True, True, False]
    assert records["b"].tolist()[0] == "12345678901234567890"


@pytest.mark.parametrize("bad", ["../outside.png", "img/../../outside.png", "/etc/passwd"])
def test_manifest_path_escaping_root_is_refused(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "data"
    save(root / "img" / "a.png", solid())
    save(tmp_path / "outside.png", solid())
    pd.DataFrame({"path": ["img/a.png", bad]}).to_csv(root / "m.csv", index=False)
    with pytest.raises(ValueError, match="outside the dataset root") as info:
        open_dataset(str(root / "m.csv"))
    assert bad in str(info.value)


def test_manifest_without_path_column(tmp_path: Path) -> None:
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"no 'path' column \(columns: file\)$"):
        open_dataset(str(tmp_path / "m.csv"))
    (tmp_path / "s.csv").write_text("path;label\na.png;cat\n")  # a European spreadsheet's (data review)
    with pytest.raises(
        ValueError, match="no 'path' column .*reads as ';'-separated: VFS reads comma-separated"
    ):
        open_dataset(str(tmp_path / "s.csv"))


def test_columns_validated_spec_roundtrip_and_limit(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / "ab"[i % 2] / f"{i}.png", solid())
    with pytest.raises(ValueError, match=r"label column 'species' not found; available columns: path, label"):
        open_dataset(str(tmp_path), label_col="species")

    ds = open_dataset(str(tmp_path))
    assert (
        DataSpec.from_dict({**ds.spec.to_dict(), "future_key": 1})
        == ds.spec
        == DataSpec(str(tmp_path), "label")
    )
    small = ds.limit(2)
    assert len(small) == 2 and len(ds) == 3 and small.spec == ds.spec


def test_nih_style_labels_as_the_statistics_split_them() -> None:
    """A manifest's '|'-joined findings are split by vfs.stats, the one splitter the app uses."""
    records = pd.DataFrame({"label": ["Effusion|Cardiomegaly", "No Finding", None, "Cardiomegaly"]})
    groups = label_groups(records, "label")
    assert groups.columns.tolist() == [MISSING, "Cardiomegaly", "Effusion", "No Finding"]
    assert groups.loc[0].tolist() == [False, True, True, False]
    assert groups.loc[1].tolist() == [False, False, False, True]
    assert groups.loc[2].tolist() == [True, False, False, False]  # missing: its own group, no finding
    assert presence(records, "label", "Cardiomegaly").tolist() == [True, False, False, True]
    missing = pd.DataFrame({"label": pd.Series([None, float("nan"), pd.NA], dtype=object)})
    assert label_groups(missing, "label").columns.tolist() == [MISSING]
    assert label_groups(pd.DataFrame({"label": [3, 3]}), "label").columns.tolist() == ["3"]


def test_embedded_skimage() -> None:
    ds = open_dataset(EMBEDDED_DATASET)
    counts = ds.records["label"].value_counts()
    assert (counts["face"], counts["not face"]) == (100, 100)
    assert counts["photo"] >= 10 and len(ds) == 200 + counts["photo"]
    assert (ds.label_col, ds.domain_col) == ("label", "source")
    assert ds.records.columns.tolist() == ["path", "label", "source", "name"]
    assert {"samples/astronaut", "lfw/face_000", "lfw/nonface_099"} <= set(ds.records["path"])
    for i in range(len(ds)):
        image = ds.load(i)
        assert image.mode == "RGB"
    assert ds.load(int(ds.records.index[ds.records["path"] == "lfw/face_000"][0])).size == (25, 25)


def test_torchvision_offline_raises_dataset_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # offline even where a network exists
    with pytest.raises(DatasetUnavailable, match="embedded:skimage") as info:
        open_dataset(f"torchvision:CIFAR10?root={tmp_path}&split=test")
    assert "CIFAR10" in str(info.value) and "No internet" in str(info.value)


def test_torchvision_source_from_cached_files(tmp_path: Path) -> None:
    """A tiny fake MNIST in the cache: download=True finds it, so no network is touched."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1] = 255
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, 3, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 3) + bytes([7, 0, 7]))

    ds = open_dataset(f"torchvision:MNIST?root={tmp_path}&split=test")

    assert ds.records["path"].tolist() == ["MNIST/test/0", "MNIST/test/1", "MNIST/test/2"]
    assert ds.records["label"].tolist() == ["7 - seven", "0 - zero", "7 - seven"]
    assert ds.load(1).mode == "RGB" and ds.load(1).getpixel((5, 5)) == (255, 255, 255)
    assert pickle.loads(pickle.dumps(ds)).load(0).size == (28, 28)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("torchvision:NoSuchSet", "unknown torchvision dataset"),
        ("torchvision:CIFAR10?split=val", "only has 'train' and 'test'"),
        ("torchvision:CIFAR10?colour=1", "no option"),
    ],
)
def test_torchvision_bad_specs(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_dataset(source)


# --------------------------------------------------------------------------- bad images


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("zero.png", b"", "empty file"),
        ("text.jpg", b"hello, I am not a JPEG\n" * 4, "cannot identify"),
        ("garbage.tif", b"II*\x00" + bytes(range(256)) * 2, "cannot identify"),
        ("icon.svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>", "cannot identify"),
        ("bad_header.bmp", b"BM" + bytes(60), "unsupported"),
    ],
)
def test_bad_files_raise_image_error(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = jpeg_bytes(noise)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated image"):
        load_image(tmp_path / "cut.jpg")


def test_a_strip_beyond_500_to_1_is_refused_before_it_is_resized(tmp_path: Path) -> None:
    """A 2×30000 PNG of 400 bytes took 2 GB and 4 s to resize for the model (helper trial)."""
    Image.new("RGB", (2, 30000)).save(tmp_path / "strip.png")
    with pytest.raises(ImageError, match="a strip of 2x30000 pixels: beyond 500:1"):
        load_image(tmp_path / "strip.png")
    Image.new("RGB", (4000, 8)).save(tmp_path / "panorama.png")  # 500:1 is an image
    assert load_image(tmp_path / "panorama.png").size == (4000, 8)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "nope.png")


def test_an_unreadable_image_names_the_file_the_cause_and_the_formats(tmp_path: Path) -> None:
    """The message names the image; the short reason alone is kept for build reports. The formats
    VFS reads are named where the format is the question, not for a truncated or empty file."""
    path = tmp_path / "notes.png"
    path.write_bytes(b"plain text, not pixels")
    with pytest.raises(ImageError) as raised:
        load_image(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not a readable image — ")
    assert raised.value.reason in message and ".jpg" in message and ".webp" in message
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = jpeg_bytes(noise)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # a JPEG named .png: PIL reads its header
    with pytest.raises(ImageError, match=r"cut\.png: not a readable image — truncated image$"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match=r"^upload\.png: not a readable image — empty file$"):
        load_image(b"", name="upload.png")  # an upload: bytes, named by the caller
    missing = re.escape(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError, match=f"^{missing}: cannot read file"):
        load_image(tmp_path / "nope.png")


def test_pixel_limit_checked_before_decoding(tmp_path: Path) -> None:
    save(tmp_path / "small.png", solid(size=(20, 20)))
    with pytest.raises(ImageError, match="400 pixels exceeds the limit of 100"):
        load_image(tmp_path / "small.png", max_pixels=100)
    # Header-only files: a full decode would fail differently, so these prove the size check comes first.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own bomb warning is not passed on: the refusal says it
        with pytest.raises(
            ImageError, match="too large to decode safely: 10000x10000 = 100000000 pixels exceeds"
        ):
            load_image(png_header(10_000, 10_000))  # 1e8 px: PIL only warns, our limit refuses
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(png_header(30_000, 30_000))  # 9e8 px: PIL's own guard fires inside Image.open


# --------------------------------------------------------------------------- odd but valid images


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # really stored as 16-bit
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (4, 3, 3)
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg() -> None:
    image = load_image(jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95))
    r, g, b = image.getpixel((8, 8))
    assert image.mode == "RGB" and r > 230 and g < 30 and b < 30


def test_palette_with_transparency_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)  # red; every other pixel is index 0 = transparent black
    path = save(tmp_path / "pal.png", image, transparency=0)
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((3, 1)) == (255, 255, 255)


def test_greyscale_and_la(tmp_path: Path) -> None:
    assert load_image(save(tmp_path / "g.png", Image.new("L", (3, 3), 100))).getpixel((1, 1)) == (
        100,
        100,
        100,
    )
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))  # fully transparent black
    rgb = load_image(save(tmp_path / "la.png", la))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stream = io.BytesIO(jpeg_bytes(image, exif=exif, quality=95))

    rgb = load_image(stream)

    assert not stream.closed  # a caller's stream is read, not closed
    assert rgb.size == (20, 40)
    top, bottom = rgb.getpixel((10, 5)), rgb.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize(("fmt", "size"), [("PNG", (5000, 60)), ("JPEG", (9000, 64))])
def test_huge_legal_image_is_downscaled(tmp_path: Path, fmt: str, size: tuple[int, int]) -> None:
    path = save(tmp_path / f"wide.{fmt.lower()}", Image.new("RGB", size, (10, 200, 10)), format=fmt)
    image = load_image(path)
    assert max(image.size) == 4096 and image.width / image.height == pytest.approx(
        size[0] / size[1], rel=0.05
    )
    assert image.getpixel((100, 10))[1] > 180


# --------------------------------------------------------------------------- DataLoader adaptor

TO_TENSOR = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


def test_dataloader_workers_skip_bad_file(tmp_path: Path) -> None:
    for i in range(5):
        save(tmp_path / f"{i}.png", solid((i * 40, 0, 0)))
    (tmp_path / "2b.png").write_bytes(b"")  # sorts between 2.png and 3.png -> index 3
    dataset = TorchImageDataset(open_dataset(str(tmp_path)), TO_TENSOR)
    assert len(pickle.loads(pickle.dumps(dataset))) == 6  # what spawn/forkserver workers need

    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_skipping)
    batches = list(loader)

    assert [b[0] for b in batches] == [[0, 1, 2, 3], [4, 5]]
    indices, stacked, good, failures = batches[0]
    assert good == [0, 1, 2] and failures == [(3, "empty file")]
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (3, 3, 8, 8)
    assert batches[1][2] == [4, 5] and batches[1][3] == []


def test_collate_all_failed() -> None:
    assert collate_skipping([(7, None, "truncated image")]) == ([7], None, [], [(7, "truncated image")])


def test_embedded_dataset_pickles() -> None:
    dataset = TorchImageDataset(open_dataset(EMBEDDED_DATASET).limit(3), TO_TENSOR)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[2][1].shape == (3, 8, 8) and clone[2][2] is None


# --------------------------------------------------------------------------- real data (optional)


@needs_shared
def test_shared_nih_manifest() -> None:
    ds = open_dataset(str(SHARED_DATA / "nih_cxr_kcr64" / "manifest.csv"))
    assert len(ds) == 1000 and ds.label_col == "label"
    assert "Cardiomegaly" in label_groups(ds.records, "label").columns
    assert presence(ds.records, "label", "Cardiomegaly").sum() == 83
    assert ds.load(0).mode == "RGB"


@needs_shared
def test_shared_pacs_domains() -> None:
    ds = open_dataset(str(SHARED_DATA / "pacs_mini" / "manifest.csv"), domain_col="domain")
    assert ds.domain_col == "domain" and len(ds) == 560
    domains = label_groups(ds.records, "domain").columns.tolist()
    assert domains == ["art_painting", "cartoon", "photo", "sketch"]
    assert ds.load(len(ds) - 1).mode == "RGB"


def test_upright_size_is_the_files_own_turned_as_a_viewer_shows_it(tmp_path):
    """What a mask painted on the photo measures: not `load_image`'s size (at most 4,096 px a side)."""
    from PIL import Image

    from vfs.images import MAX_DECODED_SIDE, load_image, upright_size

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (4200, 90), (10, 20, 30)).save(tmp_path / "wide.jpg", exif=exif)
    assert upright_size(tmp_path / "wide.jpg") == (4200, 90)
    assert max(load_image(tmp_path / "wide.jpg").size) == MAX_DECODED_SIDE


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1e6"])
def test_a_pixel_limit_that_is_no_whole_number_is_said(value):
    """int()'s bare "invalid literal" broke every import of the decoder (code review)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import vfs.images"],
        capture_output=True,
        text=True,
        env={**os.environ, "VFS_MAX_IMAGE_PIXELS": value},
    )
    assert done.returncode != 0
    assert f"VFS_MAX_IMAGE_PIXELS={value!r}: expected a whole number of pixels ≥ 1" in done.stderr


def test_a_folder_dataset_goes_through_linked_folders_once(tmp_path: Path) -> None:
    """Datasets are often assembled from links: `Path.rglob` left a linked folder's images out
    without a word (20 images built of 160: data review). Each folder is listed once, however
    many links lead to it: a loop of links ends."""
    save(tmp_path / "elsewhere" / "sketch" / "s.png", solid())
    save(tmp_path / "data" / "photo" / "p.png", solid())
    (tmp_path / "data" / "sketch").symlink_to(tmp_path / "elsewhere" / "sketch")
    (tmp_path / "data" / "photo" / "loop").symlink_to(tmp_path / "data")
    ds = open_dataset(str(tmp_path / "data"))
    assert ds.records["path"].tolist() == ["photo/p.png", "sketch/s.png"]
    assert ds.records["label"].tolist() == ["photo", "sketch"]
    assert ds.load(1).size == (12, 10)
    # a link to a folder of the dataset itself is an alias: the folder is listed where it is, under
    # its own name (the alias met first in the listing's order took its images: review)
    (tmp_path / "data" / "aaa").symlink_to(tmp_path / "data" / "photo")
    assert open_dataset(str(tmp_path / "data")).records["path"].tolist() == ["photo/p.png", "sketch/s.png"]


def test_a_folder_that_cannot_be_listed_is_an_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    """`Path.rglob` left an unreadable folder's images out without a word (data review). Refused
    as a permission error says it (root lists any folder: the listing is refused here for it)."""
    save(tmp_path / "a" / "1.png", solid())
    save(tmp_path / "locked" / "2.png", solid())
    scandir = os.scandir

    def refused(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(
        ValueError, match=r"cannot list '.*locked' in the dataset folder \(Permission denied\)"
    ):
        open_dataset(str(tmp_path))


def test_a_file_name_that_is_not_utf8_is_an_error_naming_it(tmp_path: Path) -> None:
    """It stopped the build with "'utf-8' codec can't encode character '\\udce9'…", naming no file
    (data review): a cache's paths are text."""
    save(tmp_path / "ok.png", solid())
    save(Path(os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.png")), solid())
    with pytest.raises(ValueError, match=r"'caf\\\\xe9\.png' in .*: its name is not UTF-8"):
        open_dataset(str(tmp_path))


def test_a_manifest_written_on_windows_or_with_spaces_names_its_files(tmp_path: Path) -> None:
    """`images\\a.png` and ` b.png ` named no file here: every image "No such file or directory"
    (data review). Where the path as written names none, the one with `/` and without the spaces
    does; a path that leaves the root is still refused or missing, however written."""
    save(tmp_path / "images" / "a.png", solid())
    save(tmp_path / "b.png", solid())
    (tmp_path / "m.csv").write_text("path\nimages\\a.png\n b.png \n..\\outside.png\n")
    ds = open_dataset(str(tmp_path / "m.csv"))
    assert ds.records["path"].tolist() == ["images/a.png", "b.png", "..\\outside.png"]
    assert ds.load(0).size == ds.load(1).size == (12, 10)
    with pytest.raises(ImageError, match="cannot read file"):
        ds.load(2)
