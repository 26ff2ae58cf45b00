"""Search: paint a region on a query image and see where the dataset holds the most similar regions."""

import numpy as np
import streamlit as st

from ui.base import in_label, loading

st.title("Search")
with loading():  # the title is on screen while a fresh server loads PyTorch
    from ui.announce import announce
    from ui.core import bind, groups, rerun_if_rebuilt, warm_up
    from ui.query import (
        CANVAS_PX,
        Query,
        canvas_row,
        draw_region,
        follow_link,
        leave_out_query,
        leave_out_sharing,
        pick_cache,
        pick_query,
        query_view,
        require_region,
        run_search,
        show_in_link,
    )
    from ui.views import downloads, result_table, result_tiles
    from vfs.cache import FeatureCache
    from vfs.render import jpeg_data_url, mask_overlay, mask_summary

follow_link()  # a reload or a copied link opens on the cache and query it names
cache = pick_cache("search.cache")
warm_up(cache)  # the cache's features load while the user picks a query and draws
query = pick_query(cache, "search")
show_in_link(cache, query)
view = query_view(cache, query)


@st.fragment
def region_and_results(cache: FeatureCache, query: Query, view: np.ndarray) -> None:
    """The canvas, the search options and the results: a stroke or an option reruns only this."""
    rerun_if_rebuilt(cache)
    drawing, side = canvas_row()
    with drawing:
        region = draw_region(cache, view, query, "search")
    with side:
        k = st.slider("Results (k)", 1, 50, key=bind("search.k", 10))
        exclude = leave_out_query("Leave out the query image", "search.exclude", query)
        sharing = leave_out_sharing(cache, query, "search.sharing")
        per_domain = st.number_input(
            f"At most n per domain ({in_label(cache.domain_col or 'no domain column')})",
            1,
            None,
            value=None,  # cleared, it is None again (its default), not the minimum
            key=bind("search.per_domain", None),
            placeholder="no limit",
            disabled=cache.domain_col is None,
            help="The paper's “unique domains” row: at most this many matches from any one domain.",
        )
        label_options = list(groups(cache, cache.label_col).columns) if cache.label_col else []
        labels = st.multiselect(
            f"Only these labels ({in_label(cache.label_col or 'no label column')})",
            label_options,
            key=bind(f"search.labels.{cache.location}", []),
            disabled=not label_options,
            placeholder="every label",
        )
        heat = st.toggle(
            "Show heat maps",
            key=bind("search.heat", False),
            help="Colour each match by the region's score at every placement in it: each cell the best "
            "placement covering it (Viridis, scaled per image: dark purple its lowest, yellow its best — "
            "the outlined window).",
        )
        said = st.empty()  # for a screen reader: one element, kept whether a region is drawn or not
    region = require_region(region, said)
    domains = per_domain if cache.domain_col else None
    result = run_search(cache, query, region, k, exclude, domains, tuple(labels), leave_out=sharing.images)
    mask = region.mask(cache)
    with side.container(width=CANVAS_PX):  # the canvas's size, or the column's on a narrow screen
        st.image(
            jpeg_data_url(mask_overlay(view, mask)),
            width="stretch",
            caption=f"{mask_summary(mask)} (the share of each cell painted, the fullest counting 1; "
            "stronger blue = more weight)",
            alt=f"The region searched, on the grid over the query: {mask_summary(mask)}",
        )
    summary = result.caption()
    with said:
        announce(f"Search done: {summary}")

    st.header("Results")
    st.caption(summary)
    result_tiles(cache, result, heat=heat)
    result_table(cache, result, key="search.table")
    downloads(cache, result, query, view, region.drawing.paint, "search", tuple(labels), sharing.column)


region_and_results(cache, query, view)
