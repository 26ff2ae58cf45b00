"""Distributions: every image's best score for the query region, grouped by a label (the paper's X-ray
study)."""

import streamlit as st

from ui.base import as_written, loading

EVERY = "(every finding)"

st.title("Score distributions")
with loading():  # the title is on screen while a fresh server loads PyTorch
    from ui.announce import announce
    from ui.core import bind, group_columns, groups, rerun_if_rebuilt, sharing_columns, warm_up
    from ui.query import (
        NO_COLUMN,
        Query,
        canvas_row,
        draw_region,
        leave_out_query,
        leave_out_sharing,
        pick_cache,
        pick_query,
        query_view,
        require_region,
        run_search,
    )
    from vfs.cache import FeatureCache, cache_name
    from vfs.export import image_scores, spreadsheet_csv
    from vfs.render import distribution_figure
    from vfs.stats import (
        MISSING,
        MOST_GROUPS,
        findings,
        group_table,
        is_multilabel,
        long_scores,
        score_groups,
        tested_groups,
    )

cache = pick_cache("dist.cache")
warm_up(cache)  # the cache's features load while the user picks a query and draws
query = pick_query(cache, "dist")


@st.fragment
def region_and_distributions(cache: FeatureCache, query: Query) -> None:
    """The canvas, the grouping options, the plot and the table: a stroke or an option reruns only this."""
    rerun_if_rebuilt(cache)
    query_column, option_column = canvas_row()
    with query_column:
        region = draw_region(cache, query_view(cache, query), query, "dist")
        said = st.empty()  # for a screen reader (ui.announce)
    region = require_region(region, said)
    result = run_search(cache, query, region, all_exact=True)  # statistics alike on every machine
    columns = group_columns(cache)
    if not columns:
        st.info(
            f"The cache's manifest has no column with 2 to {MOST_GROUPS} groups (labels, domains, findings) "
            "to group by."
        )
        return

    with option_column:
        column = st.selectbox(
            "Group by",
            columns,
            key=bind(
                "dist.column", cache.label_col if cache.label_col in columns else columns[0], options=columns
            ),
        )
        table, title = groups(cache, column), column
        if column in cache.manifest.columns and is_multilabel(cache.manifest, column):  # not quartiles
            choices = [EVERY, *findings(cache.manifest, column)]
            finding = st.selectbox(
                "Finding",
                choices,
                key=bind(f"dist.finding.{column}", EVERY, options=choices),
                help="A '|'-joined column: split the images into those with and without one finding.",
            )
            if finding != EVERY:
                table, title = score_groups(cache.manifest, column, finding)
        kind = st.radio("Plot", ["box", "violin", "strip"], horizontal=True, key=bind("dist.kind", "box"))
        leave_query = leave_out_query("Leave out the query image", "dist.leave_out", query)
        left_out = [*leave_out_sharing(cache, query, "dist.sharing").images]
        if leave_query and query.index is not None:  # an upload is none of the cache's images
            left_out.append(query.index)
        one_per = None
        if repeating := sharing_columns(cache):
            options = [NO_COLUMN, *repeating]
            chosen = st.selectbox(
                "Count one image per",
                options,
                key=bind(f"dist.one_per.{cache.location}", NO_COLUMN, options=options),
                help="One image of each value (of those not left out), e.g. one X-ray a patient: the "
                "statistics take the images as independent, and a patient's X-rays are not. The one kept "
                "is picked by a hash of its path: as if at random, the same every time, and whatever "
                "order the manifest lists the images in.",
            )
            one_per = None if chosen == NO_COLUMN else chosen
    keep = cache.counted(left_out, one_per)
    scores, table = result.scores[keep], table[keep]
    grouped = keep.copy()  # the table's images: kept, and in a group (not those without a value)
    grouped[keep] = table.to_numpy(dtype=bool).any(axis=1)
    unknown = int(keep.sum() - grouped.sum())
    st.plotly_chart(
        distribution_figure(long_scores(scores, table), kind, by=title),
        key="dist.plot",
    )

    with said:
        groups_said = f"{len(table.columns)} groups, plot and table below"
        announce(f"Scores of {int(grouped.sum())} images by {title}: {groups_said}")
    st.header(f"Groups by {as_written(title)}")
    tested = tested_groups(table)
    empty = [str(group) for group in tested.columns if not tested[group].any()]  # all left out, say
    st.caption(
        "Each group against the other images: AUROC of the score as a detector of the group, with "
        "its 95% DeLong interval (logit scale; none for fewer than 10 images a side, or an AUROC of 0 "
        "or 1); the two-sided Mann–Whitney U p-value, and the Benjamini–Hochberg q-value over the "
        "table's groups. Highest AUROC first."
        + (
            f" {unknown} images without a value in {as_written(repr(column))} are in neither group."
            if unknown
            else ""
        )
        + (
            f" The images without a value, {MISSING}, are described, not tested: in no other group's "
            "rest, and their row has no AUROC, p or q."
            if MISSING in table.columns
            else ""
        )
        + (
            f" No image counted here is in {as_written(', '.join(empty))} (those left out and those "
            "not counted, one per value, are not): nothing to test."
            if empty
            else ""
        )
        + (
            " Two groups that split the images are one test, read from either side: one's AUROC is 1 − "
            "the other's, and their p-value is the same."
            if len(tested.columns) == 2 and not tested.all(axis=1).any() and not empty
            else ""
        )
    )
    st.dataframe(
        group_table(scores, table),
        hide_index=True,
        height="content",  # every group: the default showed ten rows of 15 findings
        key="dist.table",
        column_config={
            c: st.column_config.NumberColumn(c, format="%.3f")
            for c in ("median", "mean", "std", "auroc", "auroc_low", "auroc_high")
        }
        | {c: st.column_config.NumberColumn(c, format="%.2e") for c in ("p_value", "q_value")},
    )
    st.download_button(
        "Download per-image scores (CSV)",
        lambda: spreadsheet_csv(image_scores(cache, result, grouped)),  # the table's images; made on click
        f"vfs-{cache_name(cache.location)}-{query.key}-scores.csv",
        "text/csv",
        key="dist.csv",
        on_click="ignore",
    )


region_and_distributions(cache, query)
