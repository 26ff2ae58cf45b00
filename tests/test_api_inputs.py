"""The Python API takes what a notebook user hands it, or refuses it in one line that says what to do.

From an API trial (a helper acting as a researcher in a notebook): a boolean `exclude` left out
images 0 and 1; an image given as the query was taken for features ("another layer?"); a heat map
read an array written since its search; a "2GB" budget, a float drawing in grey levels, a
channels-first array, a flipped view, a mask tensor that requires grad and a 0-d index tensor each
met a raw numpy / torch error or a misleading one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vfs
from vfs.cache import open_cache
from vfs.jobs import BuildJob, build_cache
from vfs.kernel import library
from vfs.masks import grid_mask
from vfs.render import ranked_matches, results_figure
from vfs.search import search_regions
from vfs.sources import ArrayFeatures

SIZE = 64  # Lite0 blocks.5 at 64 px: a 2×2 grid


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A real build of eight generated images, two domains, with the embedded model."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        pixels = (rng.random((40 + 4 * i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
        rows.append(f"im{i}.png,{'a' if i % 2 else 'b'}")
    (folder / "manifest.csv").write_text("path,domain\n" + "\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("caches") / "small.zarr"
    job = BuildJob(layer="blocks.5", data=folder / "manifest.csv", out=out, image_size=SIZE, device="cpu")
    return build_cache(job), folder


def arrays(seed=0, n=40, grid=(5, 6), c=8, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, *grid, c)).astype(dtype)


MASK = np.zeros((5, 6))
MASK[1:4, 2:4] = [[0.5, 1], [1, 1], [0.2, 0.7]]


# --------------------------------------------------------------------------- which images


def test_a_boolean_exclude_leaves_out_the_images_it_marks():
    feats = arrays()
    marked = np.arange(40) % 3 == 0
    result = search_regions(feats, 1, MASK, k=40, exclude=marked)
    assert np.array_equal(result.excluded, np.flatnonzero(marked))
    assert set(result.top["index"]) == set(np.flatnonzero(~marked))
    as_tensor = search_regions(feats, 1, MASK, k=40, exclude=torch.from_numpy(marked))
    assert np.array_equal(as_tensor.excluded, result.excluded)


@pytest.mark.parametrize(
    "exclude,error,message",
    [
        (np.ones(39, bool), ValueError, r"one entry per image \(40\), not shape \(39,\)"),
        ([1.5], TypeError, "by index \\(whole numbers\\), not float64"),
        (True, ValueError, r"one entry per image \(40\), not shape \(\)"),
        (
            20.0,
            TypeError,
            "by index \\(whole numbers\\), not float64",
        ),  # was "'float' object is not iterable"
        (object(), TypeError, "by index \\(whole numbers\\) or a boolean mask, not <object"),
        # 0/1 integers, one per image: a mask (it left out images 0 and 1 alone)
        (
            np.r_[np.ones(20, int), np.zeros(20, int)],
            ValueError,
            r"40 zeros and ones, one per image: a mask\?",
        ),
    ],
)
def test_an_exclude_that_names_no_images_is_refused(exclude, error, message):
    with pytest.raises(error, match=message):
        search_regions(arrays(), 1, MASK, exclude=exclude)


def test_candidates_are_a_boolean_mask_and_indices_are_refused_with_the_way_to_make_one():
    """`exclude` takes indices, `candidates` a mask: indices passed as candidates were read as a
    mask of their truth (every nonzero index True)."""
    feats = arrays()
    with pytest.raises(TypeError, match=r"np.isin\(np.arange\(40\), indices\)"):
        search_regions(feats, 1, MASK, candidates=np.arange(40))
    some = np.zeros(40, bool)
    some[[3, 5, 8]] = True
    assert set(search_regions(feats, 1, MASK, candidates=some).top_indices) == {3, 5, 8}
    as_tensor = search_regions(feats, 1, MASK, candidates=torch.from_numpy(some))
    assert set(as_tensor.top_indices) == {3, 5, 8}


def test_an_index_to_exclude_may_come_from_argmax():
    feats = arrays()
    for exclude in (np.array(3), torch.tensor(3), {3, 5}, range(3, 4)):
        assert 3 in search_regions(feats, 1, MASK, exclude=exclude).excluded


def test_domains_given_to_an_array_limit_results_per_domain():
    feats = arrays()
    domains = np.where(np.arange(40) < 30, "photo", "sketch")
    result = search_regions(ArrayFeatures(feats, domains=domains), 0, MASK, k=6, per_domain=2)
    assert sorted(result.top["domain"]) == ["photo", "photo", "sketch", "sketch"]
    with pytest.raises(ValueError, match="one entry per image \\(40\\)"):
        ArrayFeatures(feats, domains=domains[:5])


def test_the_ranked_table_is_built_when_read_and_describes_the_ranked_images(small_cache):
    cache, _ = small_cache
    result = search_regions(cache, 0, np.ones((2, 2)), k=3, exclude=0)
    assert "top" not in vars(result)  # a caller of scores alone pays no pandas
    assert "top 3 of 8 images" in result.summary() and "top" not in vars(result)
    top = result.top
    order = np.argsort(-result.scores, kind="stable")
    assert top["index"].tolist() == result.top_indices.tolist() == order[order != 0][:3].tolist()
    assert top["rank"].tolist() == [1, 2, 3] and result.top is top  # built once
    assert top["score"].tolist() == result.scores[result.top_indices].astype(float).tolist()
    assert {"path", "domain", "pixel_box"} <= set(top.columns)
    assert top["grid_box"].tolist() == [result.grid_box(i) for i in result.top_indices]
    boxes = result.grid_boxes()  # every image's, in one pass (the exports' column)
    assert boxes == [result.grid_box(i) for i in range(len(result.scores))]
    assert all(type(v) is int for box in boxes for v in box)  # plain ints: JSON and CSV as before


# --------------------------------------------------------------------------- the query


def test_an_image_query_on_a_cache_is_made_by_its_model(small_cache):
    cache, folder = small_cache
    path = folder / "im3.png"
    expected = search_regions(cache, cache.extractor().features(path), np.ones((2, 2)), k=8)
    image = Image.open(path)
    for query in (str(path), path, image, np.asarray(image)):
        result = search_regions(cache, query, np.ones((2, 2)), k=8)
        assert result.top["index"].tolist() == expected.top["index"].tolist()
        np.testing.assert_allclose(result.top["score"], expected.top["score"], rtol=1e-6)
    assert result.top["index"].iloc[0] == 3  # the image itself, stored as the build stored it
    assert cache.extractor() is cache.extractor()  # loaded once per cache


def test_an_image_query_on_plain_features_says_what_to_pass():
    with pytest.raises(TypeError, match="an image query needs a feature cache"):
        search_regions(arrays(), "photo.jpg", MASK)
    with pytest.raises(TypeError, match="an image query needs a feature cache"):
        search_regions(arrays(), np.zeros((30, 30, 3), np.uint8), MASK)


def test_an_index_from_argmax_is_an_index_and_a_float_is_refused():
    feats = arrays()
    expected = search_regions(feats, 3, MASK).top
    for index in (np.int64(3), np.array(3), torch.tensor(3)):
        assert search_regions(feats, index, MASK).top.equals(expected)
    for index in (3.0, torch.tensor(3.0), np.float32(3)):
        with pytest.raises(TypeError, match="an image index is a whole number"):
            search_regions(feats, index, MASK)
    for index in (True, np.array(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="not a bool"):
            search_regions(feats, index, MASK)


def test_uint8_features_on_the_grid_are_features_not_an_image():
    """Only 8-bit pixels off the grid are an image: a uint8 feature map searched as one was refused."""
    feats = (arrays() * 40 + 128).clip(0, 255).astype(np.uint8)
    result = search_regions(feats, feats[3], MASK)
    assert result.top["index"].iloc[0] == 3
    with pytest.raises(TypeError, match="an image query needs a feature cache"):
        search_regions(feats, feats[3, :, :, :3].repeat(2, axis=0), MASK)  # 10×6×3: pixels


def test_an_image_query_never_runs_a_model_that_is_code(small_cache, monkeypatch):
    cache, folder = small_cache
    monkeypatch.setattr(cache, "spec", replace(cache.spec, model="python:evil.models:make"))
    with pytest.raises(ValueError, match="is code that would run here.*cache.extractor"):
        search_regions(cache, folder / "im1.png", np.ones((2, 2)))


# --------------------------------------------------------------------------- the features


def test_a_channels_first_array_is_named_as_such():
    feats = torch.from_numpy(arrays(grid=(7, 7), c=16))
    with pytest.raises(ValueError, match=r"look channels-first.*permute\(0, 2, 3, 1\)"):
        search_regions(feats.permute(0, 3, 1, 2), 0, np.ones((7, 7)))


def test_a_flipped_view_is_searched_as_its_copy():
    feats = arrays()
    flipped = feats[::-1, :, ::-1]
    result = search_regions(flipped, 2, MASK)
    copied = search_regions(flipped.copy(), 2, MASK)
    assert result.top.equals(copied.top)


@pytest.mark.parametrize("kernel", ["auto", "off"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_heat_map_never_disagrees_with_its_search(dtype, kernel, monkeypatch):
    """Read as it is (the kernel's path; an fp16 array's prepared source views it too), an array
    written since is refused; prepared as a copy, the heat map is of the copy the search read."""
    monkeypatch.setenv("VFS_KERNEL", kernel)
    feats = arrays(dtype=dtype)
    result = search_regions(feats, 0, MASK, k=5)
    first = int(result.top["index"].iloc[1])
    assert result.placement_scores(first).max() == pytest.approx(result.scores[first], abs=1e-6)
    feats[first] = arrays(seed=9, n=1, dtype=dtype)[0]
    try:
        heat = result.placement_scores(first)
    except ValueError as error:
        assert f"image {first}'s features changed since this search" in str(error)
    else:  # a copy the search prepared: its heat map is of that copy
        assert heat.max() == pytest.approx(result.scores[first], abs=1e-6)
        assert not (kernel == "auto" and library() is not None)  # the kernel reads the array itself
    with pytest.raises(ValueError, match="image 40 is outside 0..39"):
        result.grid_box(40)


# --------------------------------------------------------------------------- masks and budgets


def test_a_mask_tensor_that_requires_grad_or_a_list_is_a_mask():
    feats = arrays()
    expected = search_regions(feats, 0, MASK).top
    weights = torch.tensor(MASK, requires_grad=True)
    assert search_regions(feats, 0, weights).top.equals(expected)
    assert search_regions(feats, 0, MASK.tolist()).top.equals(expected)


@pytest.mark.parametrize(
    "mask,error,message",
    [
        ("mask.png", TypeError, "not a str: read a mask file with vfs.load_mask"),
        ((1, 2, 3, 4), ValueError, r"got shape \(4,\) \(a box\?"),
        (np.full((5, 6), None), TypeError, "real numbers, not object"),
        (np.ones((5, 6)) * 1j, TypeError, "real numbers, not complex128"),
        ([[1, 2], [3]], ValueError, "a 2-D array of numbers"),
        (np.ones((5, 6, 1)), ValueError, "a mask must be 2-D"),
        (np.ones((50, 60)), ValueError, r"vfs.grid_mask\(drawing, \(5, 6\)\) averages a drawing onto it"),
    ],
)
def test_what_is_no_mask_of_the_grid_says_so(mask, error, message):
    with pytest.raises(error, match=message):
        search_regions(arrays(), 0, mask)


def test_a_float_drawing_in_grey_levels_is_refused_not_clipped():
    ramp = np.tile(np.linspace(0, 255, 70), (70, 1))
    with pytest.raises(ValueError, match="reaches 255: grey levels"):
        grid_mask(ramp, (7, 7))
    soft = grid_mask(ramp / 255, 7)  # an int: a square grid
    np.testing.assert_allclose(soft, grid_mask(ramp.astype(np.uint8), (7, 7)), atol=0.01)
    assert 0.05 < soft.min() < 0.1 and 0.9 < soft.max() < 0.95
    assert np.array_equal(grid_mask(torch.from_numpy(ramp / 255), (7, 7)), soft)
    with pytest.raises(ValueError, match="at least one cell each way"):
        grid_mask(ramp, (0, 7))
    with pytest.raises(ValueError, match="goes down to -1: a signed map"):  # was clipped to 0, unsaid
        grid_mask(ramp / 127.5 - 1, 7)
    with pytest.raises(ValueError, match="goes down to -5: a signed map"):  # int8 was averaged in
        grid_mask(np.array([[-5, 100]], np.int8), 1)
    ringing = np.zeros((70, 70))
    ringing[20:50, 20:50] = 1
    ringing[19, 20:50], ringing[50, 20:50] = -0.12, 1.15  # a bicubic resampling's under- and overshoot
    np.testing.assert_array_equal(grid_mask(ringing, 7), grid_mask(np.clip(ringing, 0, 1), 7))
    assert grid_mask(np.zeros((2, 2)), 1) == 0  # nothing painted: no error here (the search says so)


def test_pixels_as_an_array_give_the_mask_their_image_gives():
    """`np.asarray(Image.open(canvas))` of an opaque RGBA canvas gave every cell (its alpha, opaque
    everywhere, taken as paint) where the image gave the painted one (API review)."""
    canvas = np.zeros((64, 64, 4), np.uint8)
    canvas[..., 3] = 255
    canvas[:32, :32, :3] = 255  # white paint in the top-left quarter
    corner = np.zeros((2, 2), np.float32)
    corner[0, 0] = 1
    for pixels in (canvas, canvas[..., :3], canvas[..., [0, 3]], canvas.astype(np.int64)):  # RGBA, RGB, LA
        np.testing.assert_array_equal(grid_mask(pixels, 2), corner)
        np.testing.assert_array_equal(grid_mask(pixels, 2), grid_mask(Image.fromarray(canvas), 2))
    see_through = canvas.copy()
    see_through[..., 3] = 0
    see_through[32:, 32:, 3] = 255  # alpha where the paint is: the alpha tells
    np.testing.assert_array_equal(grid_mask(see_through, 2), corner[::-1, ::-1])
    with pytest.raises(ValueError, match="alpha is opaque everywhere"):
        grid_mask(canvas.astype(np.float32) / 255, 2)
    with pytest.raises(ValueError, match="float32 pixels needs an alpha channel"):
        grid_mask(canvas[..., :3].astype(np.float32) / 255, 2)


def test_a_memory_budget_may_be_written_as_the_cli_writes_it(small_cache):
    cache, _ = small_cache
    expected = search_regions(cache, 0, np.ones((2, 2)), k=8).top
    assert search_regions(cache, 0, np.ones((2, 2)), k=8, memory_budget="2GB").top.equals(expected)
    for budget in (np.int64(2_000_000_000), 2e9):
        assert search_regions(cache, 0, np.ones((2, 2)), k=8, memory_budget=budget).top.equals(expected)
    for budget in (0, -1, "lots", "2iB", float("nan"), True):
        with pytest.raises(ValueError, match="a memory budget is a positive number|not a size"):
            search_regions(cache, 0, np.ones((2, 2)), memory_budget=budget)


# --------------------------------------------------------------------------- what comes back


def test_a_cache_gives_back_its_images_and_says_what_it_is(small_cache):
    cache, folder = small_cache
    assert len(cache) == cache.n == cache.shape[0] == 8  # len() raised TypeError
    assert np.array_equal(np.asarray(cache.image(5)), np.asarray(Image.open(folder / "im5.png")))
    with pytest.raises(IndexError, match="outside 0..7"):
        cache.image(8)
    partial = open_cache(cache.location)
    partial.n = 0  # as an unfinished build's cache opened without allow_partial
    with pytest.raises(IndexError, match="holds no images yet"):
        partial.image(0)
    assert repr(cache) == (
        f"FeatureCache({cache.location!r}: 8 images, embedded:efficientnet_lite0 · blocks.5 · "
        f"grid 2×2 × {cache.spec.channels} channels)"
    )
    assert repr(ArrayFeatures(arrays(), domains=["a", "b"] * 20)) == (
        "ArrayFeatures(40 images × 5×6×8, held in fp16, 2 domains)"
    )
    query = search_regions(arrays(), 0, MASK).query
    assert repr(query) == "RegionQuery(3×2 cells at (1, 2) of an 5×6×8 feature map)"


def test_a_cache_search_draws_the_papers_figure(small_cache):
    """A notebook's figure in one call (the app's "Download figure"): the query by its index, the
    region as searched (peak 1), the matches' thumbnails with their windows."""
    cache, _ = small_cache
    result = search_regions(cache, 2, np.array([[0.25, 0.5], [0.0, 0.0]]), k=4)
    np.testing.assert_array_equal(result.grid_mask(), [[0.5, 1.0], [0.0, 0.0]])
    figure = result.figure(2, columns=2, title="two of four")
    matches = ranked_matches(result.top, cache.thumbs_at(result.top["index"]))
    expected = results_figure(
        cache.thumb(2), result.grid_mask(), matches, (2, 2), 2, "two of four", "query #2"
    )
    assert figure.size == expected.size and np.array_equal(np.asarray(figure), np.asarray(expected))
    unnamed = results_figure(cache.thumb(2), result.grid_mask(), matches, (2, 2), 2, "two of four")
    assert not np.array_equal(np.asarray(figure), np.asarray(unnamed))  # the query tile names its image
    assert [m["caption"] for m in matches] == result.top["domain"].tolist()  # no labels: the domains
    with pytest.raises(TypeError, match="a figure needs the images"):
        search_regions(arrays(), 0, MASK).figure(0)
    as_image = result.figure(Image.fromarray(cache.thumb(2)), columns=2, title="two of four")
    assert np.array_equal(np.asarray(as_image), np.asarray(unnamed))  # a view: no index to name
    # what is no view is said so (a path, None: "not enough values to unpack"; a photo: drawn out of place)
    for bad, error, says in (
        ("query.jpg", TypeError, "query_view is the query's index .* not 'query.jpg'"),
        (None, TypeError, "not None"),
        (2.0, TypeError, "not 2.0"),
        (
            np.zeros((30, 40, 3), np.uint8),
            ValueError,
            r"the square view .* not \(30, 40, 3\) uint8 — the photo",
        ),
        (  # a square photo (PACS's 227 px) is no view either: its region was drawn out of place (review)
            np.zeros((227, 227, 3), np.uint8),
            ValueError,
            r"query_view is 227 px square, where the model's view is 64 px .* the photo itself\?",
        ),
    ):
        with pytest.raises(error, match=says):
            result.figure(bad)
    for columns in (0, -1, 2.5):
        with pytest.raises(ValueError, match="columns is a whole number ≥ 1"):
            result.figure(2, columns=columns)


def test_a_build_job_takes_paths(small_cache):
    job = BuildJob(layer="blocks.5", data=Path("data"), out=Path("out.zarr"))
    assert (job.data, job.out) == ("data", "out.zarr")


def test_the_package_says_it_is_typed():
    assert (Path(vfs.__file__).parent / "py.typed").is_file()
