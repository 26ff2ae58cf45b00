"""vfs.compare: two caches are comparable only when index i is the same image in both."""

from types import SimpleNamespace

import numpy as np
import pandas as pd

from vfs.compare import comparison_note, comparison_refusal


def cache(
    source="embedded:skimage",
    paths=("a.png", "b.png", "c.png"),
    view="224 px",
    pixels=0,
    weights=None,
    layer="x",
    model="file:edited.pt?arch=resnet50",
    probe=None,
    input_size=224,
):
    """A stand-in: `view` its preprocessing, image i's thumbnail all `pixels + 10 i`."""
    return SimpleNamespace(
        spec=SimpleNamespace(
            data=SimpleNamespace(source=source, label_col="label"),
            preprocess=view,
            model=model,
            weights=weights,
            layer=layer,
            probe=probe,
            input_size=input_size,
        ),
        n=len(paths),
        manifest=pd.DataFrame({"path": list(paths)}),
        thumbs_at=lambda idx: np.stack([np.full((8, 8, 3), pixels + 10 * i, np.uint8) for i in idx]),
    )


def test_same_images_compare():
    assert comparison_refusal(cache(), cache()) is None


def test_label_columns_do_not_matter():
    other = cache()
    other.spec.data.label_col = None
    assert comparison_refusal(cache(), other) is None


def test_a_dataset_named_differently_compares_with_a_note(tmp_path, monkeypatch):
    """The same manifest given by another relative path, or the same dataset on another machine,
    holds the same paths in the same order: compared, and the note names both sources."""
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "pacs" / "manifest.csv")
    assert comparison_refusal(cache(source="pacs/manifest.csv"), cache(source=absolute)) is None
    assert comparison_note(cache(source="pacs/manifest.csv"), cache(source=absolute)) is None
    assert comparison_note(cache(source="./pacs/manifest.csv"), cache(source="pacs/manifest.csv")) is None
    assert comparison_note(cache(), cache()) is None
    moved = comparison_note(cache(source="/home/me/pacs.csv"), cache(source="/data/pacs.csv"))
    assert "'/home/me/pacs.csv' and '/data/pacs.csv'" in moved and "3 images" in moved, moved
    assert comparison_refusal(cache(source="/home/me/pacs.csv"), cache(source="/data/pacs.csv")) is None


def test_different_sizes_are_refused():
    assert "numbers of images" in comparison_refusal(cache(), cache(paths=("a.png", "b.png")))


def test_shifted_images_are_refused_with_the_first_difference():
    reason = comparison_refusal(cache(), cache(paths=("a.png", "c.png", "d.png")))
    assert "image 1" in reason and "'b.png'" in reason


def test_different_datasets_are_refused_naming_both():
    photos = cache(source="photos/", paths=("x.png", "y.png", "z.png"))
    assert "differently named datasets ('embedded:skimage' and 'photos/')" in comparison_refusal(
        cache(), photos
    )
    assert "are they of differently named datasets" in comparison_refusal(
        cache(), cache(source="photos/", paths=("a.png",))
    )


def test_same_names_with_other_pixels_under_one_view_are_refused():
    """Two layers (or an edited checkpoint) show their images alike: thumbnails that differ under the
    same file names mean other images; under other views (two models) only the note is possible."""
    here, there = cache(source="/home/me/a.csv"), cache(source="/data/b.csv", pixels=100)
    assert "image 0 ('a.png') shows other pixels in each" in comparison_refusal(here, there)
    assert comparison_refusal(here, cache(source="/data/b.csv", pixels=2)) is None  # a resizer's rounding
    assert comparison_refusal(here, cache(source="/data/b.csv", pixels=100, view="384 px")) is None
    assert (
        comparison_refusal(here, cache(source="/home/me/a.csv", pixels=100)) is None
    )  # one source: not looked at


def test_the_same_images_in_another_order_are_refused_saying_so():
    """A trial's shuffled manifest of the same 500 paths was refused as "differently named datasets"."""
    reason = comparison_refusal(cache(), cache(source="shuffled.csv", paths=("c.png", "a.png", "b.png")))
    assert "image 0 differs ('a.png' and 'c.png')" in reason and "the same paths in another order" in reason


def test_one_checkpoint_rewritten_between_two_builds_is_said():
    """Two caches of `file:edited.pt` looked identical everywhere while the file had changed between the
    builds (a trial); the same weights, layer and view are said to hold the same features."""
    v1, v2 = "sha256:fc0f9447" + "0" * 24, "sha256:c987afac" + "0" * 24
    assert "other weights (fc0f9447 and c987afac)" in comparison_note(cache(weights=v1), cache(weights=v2))
    assert "both hold the same features" in comparison_note(cache(weights=v1), cache(weights=v1))
    assert comparison_note(cache(weights=v1), cache(weights=v1, layer="y")) is None
    assert comparison_note(cache(weights=v1), cache()) is None  # a cache built before digests were kept


def test_the_same_weights_in_a_near_relative_of_their_architecture_are_said():
    """A trial loaded the embedded Lite0's weights with ?arch=efficientnet_lite0 (not tf_…): same digest,
    other features; a Compare against the original would blame the edit for the architecture."""
    w = "sha256:" + "1" * 32
    tf = cache(weights=w, model="embedded:efficientnet_lite0", probe=(1.0, 2.0, 3.0))
    near = cache(weights=w, model="file:noop.pt?arch=efficientnet_lite0", probe=(1.0, 2.5, 3.0))
    assert "the same weights compute other features at x" in comparison_note(tf, near)
    same = cache(weights=w, model="file:noop.pt?arch=tf_efficientnet_lite0", probe=(1.0, 2.0, 3.0))
    assert comparison_note(tf, same) is None
    larger = cache(weights=w, model="embedded:efficientnet_lite0", probe=(1.0, 2.5, 3.0), input_size=256)
    assert comparison_note(tf, larger) is None  # the probe image is made at each input size (a review)
    newer = cache(weights=w, model="embedded:efficientnet_lite0", probe=(1.0, 2.5, 3.0))  # another timm?
    assert "the same features" not in comparison_note(tf, newer)
