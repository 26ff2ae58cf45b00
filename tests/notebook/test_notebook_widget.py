"""SearchWidget's Python side: the state contract (paint in → result out, errors in the widget) and
equality with `vfs.search_regions`, without a browser (the comm is ipywidgets' stand-in)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
import traitlets
from nbhelpers import FACE
from PIL import Image

from vfs.cache import CacheError
from vfs.data import EMBEDDED_DATASET
from vfs.jobs import BuildJob, build_cache
from vfs.masks import grid_mask
from vfs.models import extractor_from_module, load_extractor, load_model
from vfs.notebook import SearchWidget
from vfs.notebook.widget import PAINT_HINT
from vfs.search import search_regions


def paint(widget: SearchWidget, pixels: np.ndarray) -> None:
    """What the browser sends when a stroke ends: one alpha byte per pixel of the view."""
    widget._handle_custom_msg({"type": "paint"}, [memoryview(np.ascontiguousarray(pixels, dtype=np.uint8))])


def strokes(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A few random discs and boxes of paint (alpha 0 or 255), like brush and rectangle strokes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    alpha = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(4, 40)
        alpha[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
    y0, x0 = rng.integers(0, shape[0] - 20, 2)
    alpha[y0 : y0 + rng.integers(4, 60), x0 : x0 + rng.integers(4, 60)] = 255
    return alpha


def outside_image() -> Image.Image:
    """An image none of the caches holds (the astronaut is the embedded dataset's first: as an image
    query it is recognised as that image and searched as it)."""
    return Image.fromarray(np.ascontiguousarray(skimage.data.astronaut()[:, ::-1]))


def assert_same(result, expected) -> None:
    pd.testing.assert_frame_equal(result.top, expected.top)
    np.testing.assert_array_equal(result.scores, expected.scores)
    np.testing.assert_array_equal(result.placements, expected.placements)


def test_paint_in_result_out(demo_cache):
    w = SearchWidget(demo_cache, query=FACE)
    results = []
    w.observe(lambda change: results.append(change["new"]), names="result")
    assert (w.result, w.mask, w.matches, w.status, w.error) == (None, None, [], PAINT_HINT, "")
    assert w.view.startswith("data:image/jpeg;base64,") and w.view_size == list(
        demo_cache.thumb(FACE).shape[:2]
    )
    assert w.grid == list(demo_cache.spec.grid) and w.query_index == FACE

    alpha = strokes(tuple(w.view_size), seed=0)
    paint(w, alpha)
    assert w.error == "" and results == [w.result] and w.revision == 1
    np.testing.assert_array_equal(w.mask, grid_mask(alpha > 0, demo_cache.spec.grid))
    assert [m["rank"] for m in w.matches] == list(range(1, 11))
    top = w.result.top
    assert [m["index"] for m in w.matches] == top["index"].tolist()
    assert [m["score"] for m in w.matches] == top["score"].tolist()
    assert [(m["label"], m["domain"]) for m in w.matches] == list(zip(top["label"], top["domain"]))
    assert all(m["image"].startswith("data:image/jpeg;base64,") for m in w.matches)
    assert w.mask_view.startswith("data:image/jpeg") and "of 49 feature cells" in w.mask_caption
    assert w.status.startswith(f"10 results from {demo_cache.n} images")


@pytest.mark.parametrize("seed", range(4))
def test_painted_search_is_search_regions(demo_cache, seed):
    w = SearchWidget(demo_cache, query=FACE)
    alpha = strokes(tuple(w.view_size), seed)
    paint(w, alpha)
    expected = search_regions(
        demo_cache, FACE, grid_mask(alpha > 0, demo_cache.spec.grid), k=10, exclude=FACE
    )
    assert_same(w.result, expected)


@pytest.mark.parametrize("seed", range(4))
def test_search_from_python_is_search_regions(demo_cache, seed):
    rng = np.random.default_rng(seed)
    mask = (rng.random(demo_cache.spec.grid) * (rng.random(demo_cache.spec.grid) < 0.3)).astype(np.float32)
    mask[rng.integers(0, 7), rng.integers(0, 7)] = 1.0  # never empty
    w = SearchWidget(demo_cache, query=seed, k=7, exclude_query=False)
    w.shapes = [{"kind": "rect", "box": [0, 0, 9, 9]}]
    assert_same(w.search(mask), search_regions(demo_cache, seed, mask, k=7))
    assert w.shapes == [] and w.result.top["index"].iloc[0] == seed  # not excluded: the query finds itself
    np.testing.assert_array_equal(w.mask, mask)


def test_options_search_again(demo_cache):
    w = SearchWidget(demo_cache, query=FACE)
    mask = np.zeros(demo_cache.spec.grid, dtype=np.float32)
    mask[2:5, 2:5] = 1
    w.search(mask)
    w.k = 4
    assert len(w.matches) == 4
    w.per_domain = 1
    assert w.result.top["domain"].value_counts().max() == 1
    w.per_domain, w.exclude_query = None, False
    assert_same(w.result, search_regions(demo_cache, FACE, mask, k=4))


def test_another_query_searches_the_same_region(demo_cache):
    w = SearchWidget(demo_cache, query=FACE, k=5)
    assert w.set_query(3) is None and w.query_index == 3 and w.result is None
    assert w.view == SearchWidget(demo_cache, query=3).view
    mask = np.zeros(demo_cache.spec.grid, dtype=np.float32)
    mask[2:5, 1:4] = 1
    w.search(mask)
    w.shapes = [{"kind": "rect", "box": [0, 0, 9, 9]}]  # the drawing, as the browser holds it
    views = []
    w.observe(lambda change: views.append(change["new"]), names="view")
    result = w.set_query(FACE)
    assert views and w.query_index == FACE and w.result is result and w.shapes  # the drawing stays
    assert_same(result, search_regions(demo_cache, FACE, mask, k=5, exclude=FACE))
    np.testing.assert_array_equal(w.mask, mask)
    assert w.status.startswith("5 results") and w.matches[0]["index"] == result.top["index"].iloc[0]
    with pytest.raises(ValueError, match="outside 0..39"):
        w.set_query(40)
    assert (w.query_index, w.result, w.view) == (FACE, result, views[-1])  # as it was


def test_another_image_query_goes_through_the_widgets_model(demo_cache, edited_model):
    spec = demo_cache.spec
    extractor = extractor_from_module(edited_model, spec.layer, spec.preprocess, name="edited")
    w = SearchWidget(demo_cache, query=FACE, extractor=None)
    mask = np.zeros(spec.grid, dtype=np.float32)
    mask[1:4, 2:5] = 1
    w.search(mask)
    image = outside_image()
    w.set_query(image)
    assert w.query_index is None
    assert_same(
        w.result, search_regions(demo_cache, load_extractor(spec.model, spec.layer).features(image), mask)
    )
    edited = SearchWidget(demo_cache, query=image, extractor=extractor)
    edited.search(mask)
    edited.set_query(3)  # a dataset index: its stored features, whatever the widget's model
    assert_same(edited.result, search_regions(demo_cache, 3, mask, exclude=3))
    edited.set_query(image)
    assert_same(edited.result, search_regions(demo_cache, extractor.features(image), mask))


def test_all_exact_scores_every_image_as_search_regions_does(demo_cache):
    """`all_exact=True`: every image's score is the float64 one (what the Distributions page uses), and
    switching it on searches the region again."""
    mask = np.zeros(demo_cache.spec.grid, dtype=np.float32)
    mask[1:4, 2:6] = 1
    mask[4, 3] = 0.5
    w = SearchWidget(demo_cache, query=FACE)
    fast = w.search(mask)
    w.all_exact = True
    exact = search_regions(demo_cache, FACE, mask, k=10, exclude=FACE, all_exact=True)
    assert_same(w.result, exact)
    assert not np.array_equal(fast.scores, exact.scores)  # the option changes scores beyond the top-k
    assert_same(SearchWidget(demo_cache, query=FACE, all_exact=True).search(mask), exact)


def test_errors_are_shown_not_raised_from_the_browser(demo_cache):
    w = SearchWidget(demo_cache, query=FACE)
    paint(w, np.zeros(10, dtype=np.uint8))  # not the view's size
    assert "the drawing has 10 pixels" in w.error and w.result is None
    paint(w, strokes(tuple(w.view_size), seed=1))
    assert w.error == "" and w.result is not None
    w.per_domain = 1  # at most one per domain: the demo cache's two domains give two matches
    assert w.error == "" and len(w.matches) == 2


def test_a_mask_that_is_no_region_of_the_grid_raises_and_leaves_the_widget_as_it_was(demo_cache):
    """A (14, 14) mask on the 7×7 grid was kept as the widget's region: every later `set_query`
    raised its shape error, and `result` was None (API review)."""
    w = SearchWidget(demo_cache, query=FACE)
    mask = np.zeros(demo_cache.spec.grid, dtype=np.float32)
    mask[2:5, 2:5] = 1
    before = w.search(mask)
    nan = np.full(demo_cache.spec.grid, np.nan)
    for bad, says in (
        (np.ones((14, 14)), "does not match the feature grid"),
        (nan, "NaN"),
        (0 * mask, "empty"),
    ):
        with pytest.raises(ValueError, match=says):
            w.search(bad)
        assert w.result is before and np.array_equal(w.mask, mask) and w.error == ""
    assert_same(w.set_query(7), search_regions(demo_cache, 7, mask, k=10, exclude=7))


def test_options_that_cannot_search_are_refused_where_they_are_set(demo_cache):
    """k = 0 or True, per_domain = 0 were taken and failed at the next stroke (or every later call)."""
    with pytest.raises(traitlets.TraitError, match="k must be a whole number of results ≥ 1, not 0"):
        SearchWidget(demo_cache, query=FACE, k=0)
    with pytest.raises(traitlets.TraitError, match="per_domain must be a whole number ≥ 1"):
        SearchWidget(demo_cache, query=FACE, per_domain=0)
    w = SearchWidget(demo_cache, query=FACE)
    for bad in (True, 0, -3):
        with pytest.raises(traitlets.TraitError, match="k must be"):
            w.k = bad
    assert w.k == 10
    w.per_domain = None  # no limit
    assert w.search(np.ones(demo_cache.spec.grid)).top.shape[0] == 10


def test_an_observers_error_is_the_users_not_the_searchs(demo_cache, capsys):
    """An analysis observing `result` that raises: its error was shown as the search's, with no
    traceback anywhere. Now the matches are shown, the widget says whose error it is, a painted
    stroke's traceback goes to the kernel's output and a call raises it in the cell."""
    w = SearchWidget(demo_cache, query=FACE)

    def analysis(change):
        return change["new"].top["labell"]  # a typo

    w.observe(analysis, names="result")
    paint(w, strokes(tuple(w.view_size), seed=1))
    assert w.result is not None and len(w.matches) == 10
    assert w.error.startswith(
        "your observer of `result` raised KeyError: 'labell' — the search itself succeeded"
    )
    assert "Traceback" in capsys.readouterr().err and "labell" in w.error
    with pytest.raises(KeyError, match="labell"):
        w.search(np.ones(demo_cache.spec.grid))
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'top'"):
        w.clear()  # the observer gets None: said so, not "the search itself succeeded"
    assert "the result was cleared (None: nothing painted)" in w.error and w.matches == []
    w.unobserve(analysis, names="result")
    paint(w, strokes(tuple(w.view_size), seed=2))
    assert w.error == ""


def test_a_failed_search_leaves_no_result_of_an_older_drawing(demo_cache, monkeypatch):
    """A drawing whose search fails replaces the older drawing's result (none, not the older one), and
    an option change then searches the drawing on the canvas."""
    w = SearchWidget(demo_cache, query=FACE)
    first, second = strokes(tuple(w.view_size), seed=1), strokes(tuple(w.view_size), seed=3)
    paint(w, first)
    assert w.error == "" and w.result is not None

    def failing(*args, **kwargs):
        raise ValueError("the search failed")

    with monkeypatch.context() as patched:
        patched.setattr("vfs.notebook.widget.search_regions", failing)
        w.k = 9
        assert w.error == "the search failed" and w.result is not None  # the same drawing: its results stay
        paint(w, second)
        assert w.error == "the search failed" and (w.result, w.matches) == (None, [])
    w.k = 10
    mask = grid_mask(second > 0, demo_cache.spec.grid)
    assert w.error == "" and np.array_equal(w.mask, mask)
    assert_same(w.result, search_regions(demo_cache, FACE, mask, k=10, exclude=FACE))


def test_clear_and_empty_paint(demo_cache):
    w = SearchWidget(demo_cache, query=FACE)
    paint(w, strokes(tuple(w.view_size), seed=2))
    paint(w, np.zeros(w.view_size, dtype=np.uint8))  # undo of the only stroke, or Clear
    assert (w.result, w.mask, w.matches, w.mask_view, w.status) == (None, None, [], "", PAINT_HINT)
    w.shapes = [{"kind": "rect", "box": [0, 0, 9, 9]}]
    w.search(np.ones(demo_cache.spec.grid))
    w.clear()
    assert (w.result, w.shapes, w.matches) == (None, [], [])


def test_image_query_uses_the_caches_model(demo_cache):
    image = outside_image()
    mask = np.zeros(demo_cache.spec.grid, dtype=np.float32)
    mask[1:4, 2:5] = 1
    w = SearchWidget(demo_cache, query=image)
    assert w.query_index is None and w.view_size == [demo_cache.spec.input_size] * 2
    features = load_extractor(demo_cache.spec.model, demo_cache.spec.layer).features(image)
    assert_same(w.search(mask), search_regions(demo_cache, features, mask))


def test_extractor_is_checked_against_the_cache(demo_cache):
    other_layer = load_extractor(demo_cache.spec.model, "blocks.4")
    with pytest.raises(CacheError, match="layer"):
        SearchWidget(demo_cache, query=Image.fromarray(skimage.data.astronaut()), extractor=other_layer)
    with pytest.raises(ValueError, match="extractor= is for a query image"):
        SearchWidget(demo_cache, query=3, extractor=other_layer)


@pytest.mark.parametrize("index", [40, -1])
def test_a_query_index_outside_the_cache_is_refused_with_the_range(demo_cache, index):
    with pytest.raises(ValueError, match=f"query index {index} is outside 0..39"):
        SearchWidget(demo_cache, query=index)


@pytest.fixture(scope="module")
def edited_model(demo_cache):
    """The cache's model with some weights of its last stage perturbed, as a model editor would."""
    edited, _ = load_model(demo_cache.spec.model)  # embedded:efficientnet_lite0, a fresh copy
    weight = edited.blocks[5][0].conv_pw.weight
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight.add_(0.5 * weight.std() * noise)
    return edited


def test_an_edited_model_queries_the_cache(demo_cache, edited_model):
    image = Image.fromarray(skimage.data.astronaut())
    spec = demo_cache.spec
    extractor = extractor_from_module(edited_model, spec.layer, spec.preprocess, name="edited")
    w = SearchWidget(demo_cache, query=image, extractor=extractor)
    features = extractor.features(image)
    original = load_extractor(spec.model, spec.layer, spec.input_size).features(image)
    assert features.shape == original.shape and not np.allclose(features, original, atol=1e-2)
    mask = np.zeros(spec.grid, dtype=np.float32)
    mask[1:4, 2:5] = 1
    assert_same(w.search(mask), search_regions(demo_cache, features, mask))


def test_an_edited_model_is_refused_at_another_layer_size_or_preprocessing(demo_cache, edited_model):
    image = Image.fromarray(skimage.data.astronaut())
    spec = demo_cache.spec
    for layer, preprocess, message in [
        ("blocks.4", spec.preprocess, "built with layer 'blocks.5', not 'blocks.4'.*cache.spec.layer"),
        (
            spec.layer,
            spec.preprocess.with_input_size(2 * spec.input_size),
            f"built with input_size {spec.input_size}, not {2 * spec.input_size}",
        ),
        (
            spec.layer,
            replace(spec.preprocess, interpolation="nearest"),
            "built with preprocess interpolation 'bicubic', not 'nearest'.*cache.spec.preprocess",
        ),
    ]:
        extractor = extractor_from_module(edited_model, layer, preprocess, name="edited")
        with pytest.raises(CacheError, match=message):
            SearchWidget(demo_cache, query=image, extractor=extractor)


def test_a_cache_built_from_a_module_records_it(demo_cache, edited_model, tmp_path):
    spec = demo_cache.spec
    extractor = extractor_from_module(edited_model, spec.layer, spec.preprocess, name="edited")
    job = BuildJob(layer=spec.layer, data=EMBEDDED_DATASET, out=str(tmp_path / "edited.zarr"), limit=6)
    cache = build_cache(job, extractor=extractor)
    assert cache is not None and cache.spec.model == "module:edited"
    image = Image.fromarray(skimage.data.astronaut())
    SearchWidget(cache, query=image, extractor=extractor)
    original = load_extractor(spec.model, spec.layer, spec.input_size)
    with pytest.raises(CacheError, match="built with spec 'module:edited'.*extractor_from_module"):
        SearchWidget(cache, query=image, extractor=original)
    with pytest.raises(ValueError, match="'module:edited' names a model that was a Python object"):
        SearchWidget(cache, query=image)  # the cache's own model: only its user holds it


def test_engine_imports_without_the_notebook_stack():
    notebook_stack = ("anywidget", "ipywidgets", "vfs.notebook")
    code = f"import sys, vfs, vfs.cli; sys.exit(any(m in sys.modules for m in {notebook_stack}))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def large_input_cache(tmp_path_factory):
    """Lite0 at a 448 px input (a 14×14 grid, thumbnails of 224 px), no domain column."""
    out = tmp_path_factory.mktemp("large") / "large.zarr"
    build_cache(
        BuildJob(
            layer="blocks.5", data=EMBEDDED_DATASET, out=str(out), image_size=448, limit=8, domain_col=""
        )
    )
    from vfs.cache import open_cache

    return open_cache(out)


def test_a_drawing_keeps_its_place_from_an_index_query_to_an_image_query(large_input_cache):
    """An image query's view was the model's input (448 px), a dataset image's its thumbnail (224):
    `set_query` between them kept the strokes at their pixels — the drawing shown a quarter of the
    image away from the mask searched, and the next stroke searched the moved drawing (notebook
    review). Every query's view is now a thumbnail as the cache's images' are."""
    from vfs.jobs import view_thumbnail

    cache = large_input_cache
    image = outside_image()
    w = SearchWidget(cache, query=0)
    assert w.view_size == [224, 224] and w.grid == [14, 14]
    w.set_query(image)
    assert w.view_size == [224, 224] and w.query_index is None
    expected = view_thumbnail(cache.spec.preprocess.view(image), 224)
    assert np.array_equal(w._query.view, expected)
    alpha = np.zeros((224, 224), dtype=np.uint8)
    alpha[128:192, 128:192] = 255  # cells 8..11 of 14, both ways
    paint(w, alpha)
    assert np.array_equal(np.flatnonzero(w.mask.any(1)), np.arange(8, 12))


def test_an_image_query_that_is_a_dataset_image_is_searched_as_it(demo_cache):
    """Given as an image (a file of the dataset), it ranked first among the others with a score of 1
    and `distribution_table` counted it — `exclude_query` did not apply (notebook review). The CLI
    and the app recognise it (`image_searched`): so does the widget, and says so."""
    mask = np.zeros(demo_cache.spec.grid, dtype=np.float32)
    mask[2:5, 1:4] = 1
    w = SearchWidget(demo_cache, query=demo_cache.image(FACE), k=5)
    assert w.query_index == FACE and w.view == SearchWidget(demo_cache, query=FACE).view
    result = w.search(mask)
    assert_same(result, search_regions(demo_cache, FACE, mask, k=5, exclude=FACE))
    assert f"the query image is image {FACE} of the cache, searched as it (left out)" in w.status
    w.set_query(outside_image())
    assert w.query_index is None and "the query image is" not in w.status


def test_a_cache_rebuilt_since_the_widget_opened_it_is_refused_in_words(demo_cache, tmp_path):
    """Rebuilt while the kernel ran, its old rows in memory were shown with the new cache's
    thumbnails and labels without a word, or its thumbnails said to be 'missing … damaged' (notebook
    review). The widget asks the cache before each search, as the app does."""
    import shutil

    import zarr

    from vfs.cache import open_cache

    copy = tmp_path / "c.zarr"
    shutil.copytree(demo_cache.location, copy)
    w = SearchWidget(open_cache(copy), query=FACE)
    mask = np.ones(demo_cache.spec.grid, dtype=np.float32)
    w.search(mask)
    zarr.open_group(copy, mode="r+").attrs["created"] = "2026-12-01T00:00:00+0000"  # another build
    with pytest.raises(CacheError, match="was rebuilt, or its build finished, since it was opened"):
        w.search(mask)
    assert "since it was opened: open it again" in w.error and (w.result, w.matches) == (None, [])


def test_a_failed_query_change_leaves_no_result_of_the_old_query(demo_cache, monkeypatch):
    """`set_query` whose search failed kept the old query's matches and `result` under the new
    query's image, and `distribution_table` then analysed the old query (notebook review)."""
    w = SearchWidget(demo_cache, query=FACE)
    w.search(np.ones(demo_cache.spec.grid))

    def failing(*args, **kwargs):
        raise ValueError("the search failed")

    monkeypatch.setattr("vfs.notebook.widget.search_regions", failing)
    with pytest.raises(ValueError, match="the search failed"):
        w.set_query(3)
    assert w.query_index == 3 and (w.result, w.matches) == (None, []) and w.error == "the search failed"
    monkeypatch.undo()
    w.k = 9  # an option change searches the same region from the new query
    assert_same(w.result, search_regions(demo_cache, 3, np.ones(demo_cache.spec.grid), k=9, exclude=3))


def test_a_brush_of_no_size_and_per_domain_without_domains_are_refused_where_set(large_input_cache):
    """`brush = 0` painted nothing, strokes searched anyway; `per_domain` on a cache without domains
    failed only at the next search (notebook review)."""
    w = SearchWidget(large_input_cache, query=0)
    for bad in (0, -2, True):
        with pytest.raises(traitlets.TraitError, match="brush is a diameter of at least 1 pixel"):
            w.brush = bad
    with pytest.raises(traitlets.TraitError, match="per_domain needs a dataset with a domain column"):
        w.per_domain = 2
    with pytest.raises(traitlets.TraitError, match="per_domain needs a dataset with a domain column"):
        SearchWidget(large_input_cache, query=0, per_domain=1)


def test_a_remote_caches_rebuild_is_asked_in_the_background(demo_cache, tmp_path, monkeypatch):
    """Asked before every search, a URL's server that hung held each stroke for its timeout, though
    the search needs no network (diff review): a URL's cache is asked in the background, and the
    answer refuses the next search."""
    import shutil
    import threading
    import time

    from cachehelpers import served

    from vfs.cache import FeatureCache, open_cache

    shutil.copytree(demo_cache.location, tmp_path / "c.zarr")
    answer = threading.Event()

    def slow(self):
        answer.wait(30)
        return True  # rebuilt, the server says — late

    with served(tmp_path) as url:
        w = SearchWidget(open_cache(f"{url}/c.zarr"), query=FACE)
        monkeypatch.setattr(FeatureCache, "replaced_on_disk", slow)
        started = time.monotonic()
        w.search(np.ones(demo_cache.spec.grid))
        assert time.monotonic() - started < 10 and w.error == ""
        answer.set()
        w._watch._asking.join(10)
        with pytest.raises(CacheError, match="was rebuilt, or its build finished, since it was opened"):
            w.search(np.ones(demo_cache.spec.grid))


def test_an_image_query_on_a_cache_of_no_images_is_no_error(demo_cache, tmp_path):
    """Every image skipped: the recognition search of an image query raised 'image_searched takes a
    search whose region is the whole grid' (diff review)."""
    from vfs.cache import CacheWriter, open_cache

    images = pd.DataFrame({"path": ["gone.png"], "label": ["face"], "source": ["lfw"]})
    writer = CacheWriter.open(tmp_path / "e.zarr", demo_cache.spec, images, 224)
    writer.skip(0, "cannot read file")
    writer.finish(images)
    w = SearchWidget(open_cache(tmp_path / "e.zarr"), query=outside_image())
    assert w.query_index is None and w.search(np.ones((7, 7))).top.empty


def test_a_tiles_blank_label_is_none_however_its_column_holds_it():
    """pandas' NA (a whole-number column with gaps, `Int64`) read "<NA>" on a tile (app review)."""
    from vfs.notebook.widget import _text

    assert [_text(v) for v in (None, np.nan, pd.NA, 3, "a")] == [None, None, None, "3", "a"]
