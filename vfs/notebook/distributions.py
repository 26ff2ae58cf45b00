"""The Distributions page for a notebook: every image's best score for a region, grouped by a column.

Same groups, plot and statistics as the dashboard's page (vfs.stats, vfs.render), from a
`SearchResult` (e.g. `SearchWidget.result`) instead of the page's widgets. The page scores every
image exactly (`search_regions(..., all_exact=True)`), so its statistics read alike on every
machine; so does a `SearchWidget(..., all_exact=True)`'s result (by default a widget keeps the fast
scores beyond its top-k: their third decimal may differ between machines).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..cache import FeatureCache
from ..render import distribution_figure as _figure
from ..search import Exclude, SearchResult, excluded_images
from ..stats import (
    MOST_GROUPS,
    QUARTILES,
    group_count,
    group_table,
    grouping_columns,
    long_scores,
    score_groups,
)


def _grouped(
    cache: FeatureCache,
    result: SearchResult | None,
    by: str,
    finding: str | None,
    leave_out: Exclude,
    one_per: str | None,
) -> tuple[np.ndarray, pd.DataFrame, str]:
    """The kept images' scores, their group membership and the plot's name for the grouping."""
    if result is None:
        raise ValueError(
            "no search result: paint a region in the widget first (its result is None: nothing painted "
            "yet, or the last search failed — the widget shows why)"
        )
    manifest = cache.manifest
    choices = grouping_columns(manifest, MOST_GROUPS)
    offered = ", ".join(choices) or "none"
    splittable = finding is not None and by in manifest.columns and by != "path"  # one finding: two groups
    if by not in choices and not splittable:
        if by not in manifest.columns or by == "path":
            raise ValueError(f"the cache's manifest has no column {by!r}; the columns to group by: {offered}")
        count = group_count(manifest, by)
        quartiles = f", or by its quartiles: {by + QUARTILES!r}" if by + QUARTILES in choices else ""
        raise ValueError(
            f"column {by!r} makes {count} group{'s' * (count != 1)} of a value where grouping needs 2 to "
            f"{MOST_GROUPS} (one compares nothing; ids make one image a group){quartiles}; the columns to "
            f"group by: {offered}"
        )
    if len(result.scores) != len(manifest):
        raise ValueError(
            f"the result scores {len(result.scores)} images, the cache holds {len(manifest)}: "
            "a result of another cache?"
        )
    searched = getattr(result.source, "manifest", None)  # a cache's result: its images, in their order
    if searched is not None and not np.array_equal(searched["path"].to_numpy(), manifest["path"].to_numpy()):
        raise ValueError(
            f"the result ranks the images of {getattr(result.source, 'location', 'another cache')}, not "
            f"those of {cache.location} (as many, others or in another order): a result of another cache?"
        )
    groups, title = score_groups(manifest, by, finding)
    left_out = result.excluded if leave_out is None else excluded_images(len(manifest), leave_out)
    keep = cache.counted(left_out, one_per)
    return result.scores[keep], groups[keep], title


def distribution_figure(
    cache: FeatureCache,
    result: SearchResult | None,
    by: str = "label",
    kind: str = "box",
    finding: str | None = None,
    leave_out: Exclude = None,
    one_per: str | None = None,
) -> go.Figure:
    """Box (violin, strip) plot of every image's best-region score per group of column `by`.

    A '|'-joined column gives one group per value found in it; `finding="Cardiomegaly"` splits the
    images into those with and without that value instead (an image without a value is in neither).
    `leave_out` drops images; by default those the search excluded (a `SearchWidget` excludes its
    query image, as the page's "Leave out the query image" does); `leave_out=()` keeps them all.
    `one_per="patient_id"` keeps only the first image of each value of that column among those not
    left out (the page's "Count one image per"): the statistics take the images as independent.
    """
    scores, groups, title = _grouped(cache, result, by, finding, leave_out, one_per)
    return _figure(long_scores(scores, groups), kind, by=title)


def distribution_table(
    cache: FeatureCache,
    result: SearchResult | None,
    by: str = "label",
    finding: str | None = None,
    leave_out: Exclude = None,
    one_per: str | None = None,
) -> pd.DataFrame:
    """The page's table for the same grouping (`vfs.stats.group_table`): per group n, median, mean,
    std, AUROC with its 95% DeLong interval, Mann–Whitney p and Benjamini–Hochberg q; `leave_out`
    and `one_per` as `distribution_figure`'s."""
    scores, groups, _ = _grouped(cache, result, by, finding, leave_out, one_per)
    return group_table(scores, groups)
