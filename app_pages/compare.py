"""Compare: one query on two caches of the same dataset (two models, two layers, or two checkpoints)."""

import json
from functools import partial

import numpy as np
import streamlit as st

from ui.base import as_written, loading, user_errors

st.title("Compare two caches")
with loading():  # the title is on screen while a fresh server loads PyTorch
    from ui.announce import announce
    from ui.core import bind, rerun_if_rebuilt, warm_up
    from ui.query import (
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
    from ui.views import TILE_PX, result_table, result_tiles
    from vfs.cache import FeatureCache, cache_name
    from vfs.compare import comparison_note, comparison_refusal, short_weights
    from vfs.export import compared_scores, comparison_json, spreadsheet_csv
    from vfs.render import comparison_figure, jpeg_data_url, mask_overlay, mask_summary, region_mask_png
    from vfs.stats import rank_agreement

pick_left, pick_right = st.columns(2)
with pick_left:
    left = pick_cache("compare.left", "Left cache", paired=True, spelled_out=True)
with pick_right:
    right = pick_cache("compare.right", "Right cache", shared=None, partner=left, spelled_out=True)
with user_errors():  # a damaged cache, said in words
    reason = comparison_refusal(left, right)
if reason is not None:
    st.error(f"These caches cannot be compared: {as_written(reason)}" + ("" if reason.endswith("?") else "."))
    st.stop()
if left.location == right.location:
    st.warning("Both sides are the same cache: pick another one on the right.")
elif (note := comparison_note(left, right)) is not None:
    st.info(f"Compared: {as_written(note)}.")
for cache in (left, right):
    warm_up(cache)  # the caches' features load while the user picks a query and draws

query = pick_query(left, "compare")


@st.fragment
def region_and_comparison(left: FeatureCache, right: FeatureCache, query: Query) -> None:
    """The canvas, both result lists and their agreement: a stroke or an option reruns only this."""
    rerun_if_rebuilt(left, right)
    query_column, option_column = canvas_row()
    with query_column:
        region = draw_region(left, query_view(left, query), query, "compare")
    with option_column:
        st.caption(
            "The region is drawn once, on the left cache's view; each side searches its own features "
            "for the same part of the image, as its own model crops it (an uploaded image goes through "
            "each side's own model)."
        )
        k = st.slider("Results per side (k)", 1, 30, key=bind("compare.k", 10))
        exclude = leave_out_query("Leave out the query image", "compare.exclude", query)
        sharing = leave_out_sharing(left, query, "compare.sharing").images  # the same images on both sides
        said = st.empty()  # for a screen reader (ui.announce)
    region = require_region(region, said)
    # every image's score exact, as on Distributions: the correlations below read alike on every machine
    sides = [
        (
            cache,
            run_search(cache, query, region, k, exclude, all_exact=True, leave_out=sharing, drawn_on=left),
        )
        for cache in (left, right)
    ]

    for column, side, (cache, result) in zip(st.columns(2, gap="large"), ("left", "right"), sides):
        with column:
            # a header under the page's title: no heading level skipped
            st.header(as_written(cache_name(cache.location)))
            st.caption(
                f"{as_written(cache.spec.model)} (weights {as_written(short_weights(cache.spec))}) · "
                f"{as_written(cache.spec.layer)} · "
                f"grid {cache.spec.grid[0]}×{cache.spec.grid[1]} — "
                f"{result.caption()}"
            )
            with st.expander("The region on this side's cells"):  # placed through the image on the right
                mask = region.mask(cache, drawn_on=left)
                st.image(
                    jpeg_data_url(mask_overlay(query_view(cache, query), mask)),
                    width=TILE_PX,
                    caption=f"{mask_summary(mask)} (stronger blue = more weight)",
                    alt=f"The region searched on this side, over its query: {mask_summary(mask)}",
                )
            result_tiles(cache, result, width=TILE_PX * 3 // 4, key=f"tiles.{side}")  # three a row
            result_table(cache, result, key=f"compare.table.{side}")

    st.header("Agreement")
    (_, a), (_, b) = sides
    compared = np.ones(left.n, dtype=bool)  # the images the lists rank: the query left out where it is
    if exclude:
        compared[query.index] = False
    compared[list(sharing)] = False
    agreement = rank_agreement(a.scores[compared], b.scores[compared], k)
    metrics = st.columns(3)
    metrics[0].metric(f"Top-{k} overlap", f"{agreement['topk_overlap']:.0%}")
    ranked = f"{int(compared.sum()):,} images"  # every compared one: the query and its sharers left out
    metrics[1].metric(f"Spearman ρ ({ranked})", f"{agreement['spearman']:.2f}")
    metrics[2].metric(f"Kendall τ ({ranked})", f"{agreement['kendall']:.2f}")
    with said:
        announce(
            f"Compared: top-{k} overlap {agreement['topk_overlap']:.0%}, "
            f"Spearman {agreement['spearman']:.2f}, Kendall {agreement['kendall']:.2f}"
        )
    st.plotly_chart(
        comparison_figure(
            a.scores[compared], b.scores[compared], (cache_name(left.location), cache_name(right.location))
        ),
        key="compare.plot",
    )
    stem = f"vfs-{cache_name(left.location)}-vs-{cache_name(right.location)}-{query.key}"
    downloads = st.container(horizontal=True)
    downloads.download_button(
        "Download both sides' scores (CSV)",
        lambda: spreadsheet_csv(compared_scores(left, a, b, compared)),  # the compared images; made on click
        f"{stem}-scores.csv",
        "text/csv",
        key="compare.csv",
        on_click="ignore",
        help="Each compared image's manifest row with both sides' best scores, ranks and windows: what "
        "the overlap and correlations above are computed from.",
    )
    downloads.download_button(
        "Download the comparison (JSON)",
        lambda: json.dumps(
            comparison_json((left, a), (right, b), query.describe(), agreement, k, int(compared.sum())),
            indent=1,
            default=str,
        ),
        f"{stem}.json",
        "application/json",
        key="compare.json",
        on_click="ignore",
        help="Both sides' searches as the CLI writes them (cache, model, weights, layer, mask, top "
        "results) and their agreement.",
    )
    left_paint, right_paint = (region.view_paint(cache, drawn_on=left) for cache in (left, right))
    if np.array_equal(left_paint, right_paint):  # one view: one file gives both sides' searches
        downloads.download_button(
            "Download region (PNG mask)",
            lambda: region_mask_png(left_paint),
            f"{stem}-region.png",
            "image/png",
            key="compare.region",
            on_click="ignore",
            help="The painted region on the view both models share: `python -m vfs search CACHE "
            "--mask` reads it and gives either side's results above.",
        )
        return
    for side, cache, paint in (("left", left, left_paint), ("right", right, right_paint)):
        downloads.download_button(
            f"Download the {side} side's region (PNG mask)",
            partial(region_mask_png, paint),
            f"{stem}-region-{side}.png",
            "image/png",
            key=f"compare.region.{side}",
            on_click="ignore",
            help=f"The region as placed on {cache_name(cache.location)}'s view (its model crops the "
            f"image otherwise than the other's): `python -m vfs search {cache_name(cache.location)} "
            "--mask` reads it and gives this side's results above.",
        )


region_and_comparison(left, right, query)
