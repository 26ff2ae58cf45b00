"""vfs.compare: two caches are comparable only when index i is the same image in both."""

from types import SimpleNamespace

import pandas as pd

from vfs.compare import comparison_refusal


def cache(source="embedded:skimage", paths=("a.png", "b.png", "c.png")):
    return SimpleNamespace(
        spec=SimpleNamespace(data=SimpleNamespace(source=source, label_col="label")),
        n=len(paths),
        manifest=pd.DataFrame({"path": list(paths)}),
    )


def test_same_images_compare():
    assert comparison_refusal(cache(), cache()) is None


def test_label_columns_do_not_matter():
    other = cache()
    other.spec.data.label_col = None
    assert comparison_refusal(cache(), other) is None


def test_different_datasets_are_refused():
    assert "different datasets" in comparison_refusal(cache(), cache(source="photos/"))


def test_different_sizes_are_refused():
    assert "numbers of images" in comparison_refusal(cache(), cache(paths=("a.png", "b.png")))


def test_shifted_images_are_refused_with_the_first_difference():
    reason = comparison_refusal(cache(), cache(paths=("a.png", "c.png", "d.png")))
    assert "image 1" in reason and "'b.png'" in reason
