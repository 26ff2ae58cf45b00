"""`vfs.notebook.distribution_figure` / `distribution_table`: the Distributions page's plot and
table for a result, grouped by a label, a true/false finding column or one '|'-joined finding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cachehelpers import write_findings

from vfs.cache import open_cache
from vfs.jobs import BuildJob, build_cache
from vfs.notebook import SearchWidget, distribution_figure, distribution_table
from vfs.render import distribution_figure as page_figure
from vfs.stats import group_table, long_scores, presence_groups


@pytest.fixture(scope="module")
def result(xray_cache):
    mask = np.zeros(xray_cache.spec.grid, dtype=np.float32)
    mask[2:5, 2:5] = 1  # "the heart"
    return SearchWidget(xray_cache, query=0).search(mask)


def groups_in(figure) -> dict[str, int]:
    return {trace.name: len(trace.y) for trace in figure.data}


def test_a_finding_column(xray_cache, result):
    """By default the images the search excluded (the widget's query, image 0, a cardiomegaly one)
    are left out, as on the page; `leave_out=()` keeps every image."""
    assert result.excluded.tolist() == [0] and xray_cache.manifest["cardiomegaly"].iloc[0]
    figure = distribution_figure(xray_cache, result, by="cardiomegaly")
    assert groups_in(figure) == {"True": 5, "False": 6}
    assert figure.layout.title.text == "Best-region score by cardiomegaly"
    table = distribution_table(xray_cache, result, by="cardiomegaly")
    assert table.set_index("group")["n"].to_dict() == {"True": 5, "False": 6}
    every = distribution_table(xray_cache, result, by="cardiomegaly", leave_out=())
    assert every.set_index("group")["n"].to_dict() == {"True": 6, "False": 6}


def test_one_finding_of_a_joined_column_is_the_pages_figure(xray_cache, result):
    figure = distribution_figure(
        xray_cache, result, by="label", kind="violin", finding="Cardiomegaly", leave_out=0
    )
    groups = presence_groups(xray_cache.manifest, "label", "Cardiomegaly").iloc[1:]
    scores = result.scores[1:]
    expected = page_figure(long_scores(scores, groups), "violin", by="Cardiomegaly present")
    assert figure.to_json() == expected.to_json()
    pd.testing.assert_frame_equal(
        distribution_table(xray_cache, result, by="label", finding="Cardiomegaly", leave_out=[0]),
        group_table(scores, groups),
    )


def test_every_finding_of_a_joined_column(xray_cache, result):
    assert groups_in(distribution_figure(xray_cache, result, by="label", leave_out=())) == {
        "Cardiomegaly": 6,
        "Edema": 2,
        "Effusion": 4,
        "No Finding": 4,
    }


def test_wrong_column_finding_or_cache(xray_cache, demo_cache, result):
    with pytest.raises(ValueError, match="no column 'Cardiomegaly'.*label, view, cardiomegaly"):
        distribution_figure(xray_cache, result, by="Cardiomegaly")
    with pytest.raises(ValueError, match="no image has 'cardiomegaly' in column 'label'"):
        distribution_figure(xray_cache, result, by="label", finding="cardiomegaly")
    with pytest.raises(ValueError, match="another cache"):
        distribution_table(demo_cache, result, by="label")
    with pytest.raises(ValueError, match="no search result: paint a region"):
        distribution_figure(xray_cache, None, by="label")  # a widget's result before any stroke


def test_a_column_of_ids_or_of_one_value_is_refused_as_the_page_offers_none(xray_cache, result, monkeypatch):
    """The page offers columns of 2 to 50 groups; the notebook grouped by anything — a column of ids
    made one group an image (a table of 10,000 rows at 10,000 images), one of one value a table of NaN."""
    manifest = xray_cache.manifest.assign(
        study=[f"s{i}" for i in range(12)], site="A", size=np.arange(12.0), dose=[1.0, 2.0] * 6
    )
    monkeypatch.setattr(xray_cache, "_manifest", manifest)
    monkeypatch.setattr("vfs.notebook.distributions.MOST_GROUPS", 10)  # 12 images: ids make 12 groups
    with pytest.raises(ValueError, match=r"'site' makes 1 group of a value where grouping needs 2 to 10"):
        distribution_table(xray_cache, result, by="site")
    with pytest.raises(
        ValueError, match=r"'size' makes 12 groups.*or by its quartiles: 'size \(quartiles\)'"
    ):
        distribution_figure(xray_cache, result, by="size")
    assert len(distribution_table(xray_cache, result, by="size (quartiles)", leave_out=())) == 4
    assert len(distribution_table(xray_cache, result, by="dose")) == 2
    with pytest.raises(
        ValueError, match=r"'study' makes 12 groups.*label, view, cardiomegaly, dose, size \("
    ):
        distribution_table(xray_cache, result, by="study")  # not numeric: no quartiles to offer
    with pytest.raises(ValueError, match=r"no column 'path'; the columns to group by: label, view"):
        distribution_table(xray_cache, result, by="path")


def test_a_result_of_as_many_other_images_is_refused(xray_cache, result, tmp_path):
    """Only the numbers of images were compared: another cache's result of as many images paired
    one cache's scores with the other's labels, a full table of wrong statistics (new-user review)."""
    write_findings(tmp_path, copies=2, seed=1, finding_column=True)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    manifest.iloc[::-1].to_csv(tmp_path / "manifest.csv", index=False)  # the same images, reversed
    build_cache(BuildJob(layer="blocks.5", data=str(tmp_path / "manifest.csv"), out=str(tmp_path / "r.zarr")))
    reversed_cache = open_cache(tmp_path / "r.zarr")
    assert reversed_cache.n == xray_cache.n
    with pytest.raises(
        ValueError, match=r"ranks the images of .*xrays.zarr, not those of .*r.zarr .*another cache\?"
    ):
        distribution_table(reversed_cache, result, by="label")
    again = open_cache(xray_cache.location)  # the same cache opened anew: its own result
    assert len(distribution_table(again, result, by="label")) == 4
