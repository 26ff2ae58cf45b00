import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vfs import render


def cell_centres(grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (row, col) of each grid cell's centre, as an (h, w) index pair."""
    rows = ((np.arange(grid[0]) + 0.5) * size[0] / grid[0]).astype(int)
    cols = ((np.arange(grid[1]) + 0.5) * size[1] / grid[1]).astype(int)
    return np.ix_(rows, cols)


def test_grid_box_to_pixels_non_square_grid():
    assert render.grid_box_to_pixels((1, 2, 3, 5), (7, 14), (224, 224)) == (32, 32, 96, 80)
    assert render.grid_box_to_pixels((0, 0, 1, 1), (4, 8), (64, 128)) == (0, 0, 16, 16)
    assert render.grid_box_to_pixels((0, 0, 3, 5), (3, 5), (100, 100)) == (0, 0, 100, 100)
    assert render.grid_box_to_pixels((1, 1, 2, 2), (3, 5), (100, 100)) == (33, 20, 67, 40)


def test_outline_draws_border_only():
    thumb = np.full((224, 224, 3), 100, dtype=np.uint8)
    color = (255, 64, 0)
    image = np.asarray(render.outline(thumb, (32, 32, 96, 80), color=color, width=2))
    assert image.shape == thumb.shape
    for y, x in [(32, 50), (33, 50), (95, 50), (60, 32), (60, 79)]:
        assert tuple(image[y, x]) == color
    assert (image[34, 34:78] == 0).all() and (image[34:94, 77] == 0).all()  # a black line inside the colour
    interior = image[35:93, 35:77]
    assert (interior == 100).all()
    assert (image[:31] == 100).all() and (image[97:] == 100).all()


def test_mask_overlay_changes_only_masked_cells():
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    mask = np.zeros((4, 6))
    mask[1, 2] = 1.0
    mask[3, 5] = 0.5
    image = np.asarray(render.mask_overlay(thumb, mask, color=(0, 160, 255), alpha=0.5)).astype(int)
    centres = cell_centres(mask.shape, thumb.shape[:2])
    change = np.abs(image[centres] - thumb[centres].astype(int)).sum(axis=-1)
    assert (change[mask == 0] == 0).all()
    assert (change[mask > 0] > 0).all()
    expected = np.rint(0.5 * thumb[centres][1, 2] + 0.5 * np.array([0, 160, 255]))
    assert np.abs(image[centres][1, 2] - expected).max() <= 1


def test_heatmap_overlay_brightest_cells_are_argmax_placement():
    grid, mask_shape = (6, 8), (2, 3)
    rng = np.random.default_rng(3)
    placements = rng.random((grid[0] - mask_shape[0] + 1, grid[1] - mask_shape[1] + 1))
    placements[0, 0] = np.nan
    thumb = np.zeros((96, 128, 3), dtype=np.uint8)
    image = np.asarray(render.heatmap_overlay(thumb, placements, mask_shape, grid)).astype(int)
    assert image.shape == thumb.shape
    brightness = image[cell_centres(grid, thumb.shape[:2])].sum(axis=-1)
    i, j = np.unravel_index(np.nanargmax(placements), placements.shape)
    expected = np.zeros(grid, dtype=bool)
    expected[i : i + mask_shape[0], j : j + mask_shape[1]] = True
    assert ((brightness == brightness.max()) == expected).all()


def test_heatmap_overlay_leaves_uncovered_cells_and_checks_shape():
    thumb = np.full((40, 40, 3), 7, dtype=np.uint8)
    placements = np.array([[0.5, np.nan], [np.nan, np.nan]])
    image = np.asarray(render.heatmap_overlay(thumb, placements, (1, 1), (2, 2)))
    assert (image[30, 30] == 7).all()
    assert (image[10, 10] != 7).any()
    with pytest.raises(ValueError):
        render.heatmap_overlay(thumb, placements, (2, 2), (2, 2))


def test_the_heat_legend_states_the_range_the_colours_span():
    grid, mask_shape = (4, 5), (2, 2)
    placements = np.arange(12, dtype=float).reshape(3, 4) / 20 - 0.1  # −0.10 … 0.45
    placements[0, 0] = np.nan
    low, high = render.placement_heat_range(placements, mask_shape)
    assert (low, high) == pytest.approx((-0.05, 0.45))  # cell (0, 0): only the NaN covers it, uncoloured
    thumb = np.zeros((80, 100, 3), dtype=np.uint8)
    image = np.asarray(render.heatmap_overlay(thumb, placements, mask_shape, grid, alpha=1.0)).astype(int)
    bar = np.asarray(render.colour_bar(64, 5)).astype(int)
    assert bar.shape == (5, 64, 3) and (bar[0] == bar[-1]).all()
    centres = image[cell_centres(grid, thumb.shape[:2])]
    assert np.abs(centres[-1, -1] - bar[0, -1]).max() <= 1  # the best cell: the bar's right end
    assert np.abs(centres[0, 1] - bar[0, 0]).max() <= 1  # the lowest cell: its left end
    assert render.placement_heat_range(np.full((3, 4), np.nan), mask_shape) == (0.0, 0.0)


def test_results_figure_and_png_bytes():
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    mask = np.zeros((4, 4))
    mask[1:3, 1:3] = 1
    matches = [
        {
            "thumb": thumb,
            "box": (0, 0, 2, 2),
            "score": 0.8734,
            "caption": "Cardiomegaly|Effusion, a long label",
        },
        {"thumb": thumb, "box": (1, 1, 3, 4), "score": 0.5},
        {"thumb": thumb, "box": (2, 2, 4, 4), "score": 0.25, "caption": "No Finding"},
    ]
    figure = render.results_figure(thumb, mask, matches, (4, 4), columns=2, title="Cardiomegaly query")
    assert figure.width > 3 * 64 and figure.height > 2 * 64
    # the query's region outlined as the matches' windows are (a blue tint alone faded on blue
    # images): its tile, at (pad, title + pad) = (4, 18 + 4), is the overlay with the box (1, 1)–(3, 3)
    expected = render.outline(np.asarray(render.mask_overlay(thumb, mask)), (16, 16, 48, 48))
    np.testing.assert_array_equal(np.asarray(figure)[22 : 22 + 64, 4 : 4 + 64], np.asarray(expected))
    assert (np.asarray(expected)[16, 16:48] == (255, 64, 0)).all()
    decoded = Image.open(io.BytesIO(render.png_bytes(figure)))
    assert decoded.format == "PNG" and decoded.size == figure.size
    assert render.match_caption(1, 0.8734, ["face", "lfw"]) == "1. score 0.87 · face · lfw"
    assert (
        render.mask_summary(mask)
        == f"{int((mask > 0).sum())} of 16 feature cells selected (4×4), each weighed alike"
    )


def test_the_region_shows_and_says_the_weights_as_searched():
    """A thin stroke paints a tenth of each cell it crosses: the overlay blended that tenth (a change of
    4/255, invisible) and the caption said "weight up to 0.11", where the search weighs those cells
    fully (crop_mask scales to a peak of 1; search review)."""
    thumb = np.full((70, 70, 3), 128, dtype=np.uint8)
    thin = np.zeros((7, 7))
    thin[1:6, 3] = [0.07, 0.11, 0.11, 0.11, 0.07]
    assert render.mask_summary(thin) == "5 of 49 feature cells selected (7×7), weights 0.64 to 1 as searched"
    np.testing.assert_array_equal(render.mask_overlay(thumb, thin), render.mask_overlay(thumb, thin / 0.11))
    centre = np.asarray(render.mask_overlay(thumb, thin)).astype(int)[35, 35]
    assert np.abs(centre - 128).max() > 60  # half the blue: plain to see
    assert render.mask_summary(np.zeros((7, 7))) == "0 of 49 feature cells selected (7×7)"


@pytest.mark.parametrize("kind", ["box", "violin", "strip"])
def test_distribution_figure_one_trace_per_group(kind):
    long = pd.DataFrame(
        {
            "index": [0, 1, 2, 0, 3],
            "group": ["True", "True", "False", "Effusion", "False"],
            "score": [0.9, 0.7, 0.2, 0.9, 0.1],
        }
    )
    figure = render.distribution_figure(long, kind=kind, by="finding")
    assert sorted(trace.name for trace in figure.data) == ["Effusion", "False", "True"]
    assert [trace.marker.color for trace in figure.data] == list(render.GROUP_COLOURS[:3])  # distinct hues
    assert figure.layout.title.text == "Best-region score by finding"


def test_a_plots_labels_and_names_are_text_not_html():
    """plotly takes `<a href>`, `<b>` in its labels, titles and legends: a manifest label's link was
    a live link in the Distributions plot (checked in Chromium: none once escaped, the text as
    written). Each is given as HTML text."""
    label = "<a href='https://evil.example'>x</a> & <b>y</b>"
    long = pd.DataFrame({"index": [0, 1], "group": [label, "n"], "score": [0.5, 0.4]})
    figure = render.distribution_figure(long, by="<i>col</i>")
    shown = "&lt;a href='https://evil.example'&gt;x&lt;/a&gt; &amp; &lt;b&gt;y&lt;/b&gt;"
    assert {t.name for t in figure.data} == {shown, "n"} and "<" not in figure.layout.title.text
    compared = render.comparison_figure(np.ones(3), np.ones(3), ("<b>a</b>", "b"))
    assert [t.name for t in compared.data] == ["&lt;b&gt;a&lt;/b&gt;", "b"]


def test_distribution_figure_rejects_unknown_kind():
    with pytest.raises(ValueError):
        render.distribution_figure(pd.DataFrame({"index": [], "group": [], "score": []}), kind="pie")


def test_comparison_figure_has_both_models():
    rng = np.random.default_rng(0)
    figure = render.comparison_figure(rng.random(30), rng.random(30) / 4, ("dino", "clip"))
    assert [trace.name for trace in figure.data] == ["dino", "clip"]
    # the same bins (plotly's own per trace were 2.5× apart), in two hues, not two shades of one
    assert figure.data[0].xbins == figure.data[1].xbins and figure.data[0].xbins.size > 0
    assert figure.data[0].marker.color != figure.data[1].marker.color
