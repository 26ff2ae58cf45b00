"""Search results in their stable exchange forms: the JSON that `python -m vfs search --json` prints
and the app offers for download (documented in docs/cli.md), kept below both so they agree, and the
tables the app's pages offer as CSV (`spreadsheet_csv`)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .cache import FeatureCache
from .search import SearchResult
from .stats import is_missing

JSON_SCHEMA_VERSION = 1


def search_json(
    cache: FeatureCache,
    result: SearchResult,
    query_desc: dict[str, Any],
    labels: Sequence[str] = (),
    exclude_same: str | None = None,
) -> dict[str, Any]:
    """The stable JSON form of a search; `query_desc` says what the query was (index or image),
    `labels` the label filter the candidates came from (the CLI's --label, the Search page's),
    `exclude_same` the column whose value, shared with the query, left images out (--exclude-same)."""
    rows = []
    for r in result.top.to_dict("records"):
        rows.append(
            {
                "rank": int(r["rank"]),
                "index": int(r["index"]),
                "path": r.get("path"),
                "score": round(float(r["score"]), 6),
                "grid_box": list(r["grid_box"]),
                "pixel_box": list(r["pixel_box"]) if r.get("pixel_box") is not None else None,
                "label": _json_value(r.get("label")),
                "domain": _json_value(r.get("domain")),
            }
        )
    return {
        "schema": JSON_SCHEMA_VERSION,
        "cache": cache.location,
        "model": cache.spec.model,
        "weights": cache.spec.weights,
        "layer": cache.spec.layer,
        "grid": list(result.grid),
        "query": query_desc,
        "excluded": result.excluded.tolist(),
        # what else chose the results: with the mask, the search again (--k, --per-domain, --label,
        # --exclude-same)
        "options": {
            "k": result.asked,
            "per_domain": result.per_domain,
            "labels": list(labels) or None,
            "exclude_same": exclude_same,
        },
        "mask": {
            "box": list(result.query.mask.query_box()),
            "cells": int((result.query.mask.weights > 0).sum()),
            "weights": result.grid_mask().tolist(),  # repeats the search: np.save, then --mask
        },
        "method": result.method,
        "device": result.device,
        "elapsed_ms": round(result.elapsed_ms, 3),
        "results": rows,
    }


def _with_columns(manifest: pd.DataFrame, added: dict[str, Any]) -> pd.DataFrame:
    """`manifest` with VFS's `added` columns, which keep their names in every export; a manifest
    column of the same name gets `manifest_` before it (as often as it takes to name no other)."""
    taken = set(map(str, manifest.columns)) | set(added)

    def renamed(column: Any) -> Any:
        if column not in added:
            return column
        name = f"manifest_{column}"
        while name in taken:
            name = f"manifest_{name}"
        taken.add(name)
        return name

    return manifest.rename(columns=renamed).assign(**added)


def image_scores(cache: FeatureCache, result: SearchResult, keep: np.ndarray | None = None) -> pd.DataFrame:
    """Each kept image's manifest row (indexed by image) with its best `score` and that window's
    `grid_box`: the per-image export, the rows a Distributions table is computed from."""
    table = _with_columns(cache.manifest, {"score": result.scores, "grid_box": result.grid_boxes()})
    table = table.rename_axis("index")
    return table if keep is None else table[np.asarray(keep, dtype=bool)]


def ranked_rows(cache: FeatureCache, result: SearchResult, columns: list[str]) -> pd.DataFrame:
    """The ranked table's `columns` with the rest of each ranked image's manifest row (a patient id,
    a study, a site): the Search page's CSV, in which a leave-out can be checked (it held the table
    alone)."""
    table = result.top[columns].reset_index(drop=True)
    rows = cache.manifest.iloc[result.top_indices].reset_index(drop=True)
    shown = {"path", cache.label_col, cache.domain_col}  # already in the table, as path, label and domain
    more = rows[[c for c in rows.columns if c not in shown]]
    joined = _with_columns(more, dict(table.items()))  # the table's columns last, as `assign` puts them
    return joined[[*table.columns, *joined.columns[: -len(table.columns)]]]


def compared_scores(
    cache: FeatureCache, left: SearchResult, right: SearchResult, keep: np.ndarray | None = None
) -> pd.DataFrame:
    """Two searches of caches of the same images side by side: each kept image's manifest row
    (`cache`'s) with each side's best score, its rank among the kept images (1: the best; ties share
    the best rank) and its window — the Compare page's export, the rows its agreement figures are
    computed from. A manifest column named as one of these gets `manifest_` before it."""
    kept = np.ones(len(left.scores), bool) if keep is None else np.asarray(keep, dtype=bool)
    added: dict[str, Any] = {}
    for side, result in (("left", left), ("right", right)):
        added[f"{side}_score"] = result.scores
        ranks = pd.Series(np.where(kept, result.scores, np.nan)).rank(
            ascending=False, method="min", na_option="bottom"
        )
        added[f"{side}_rank"] = ranks.to_numpy(dtype=np.int64)
        added[f"{side}_grid_box"] = result.grid_boxes()
    return _with_columns(cache.manifest, added).rename_axis("index")[kept]


def comparison_json(
    left: tuple[FeatureCache, SearchResult],
    right: tuple[FeatureCache, SearchResult],
    query_desc: dict[str, Any],
    agreement: dict[str, float],
    k: int,
    compared: int,
) -> dict[str, Any]:
    """The Compare page's JSON: each side's search as `search_json` writes it (cache, model, weights,
    layer, mask, results) and their agreement over the `compared` images."""
    return {
        "schema": JSON_SCHEMA_VERSION,
        "query": query_desc,
        "left": search_json(*left, query_desc),
        "right": search_json(*right, query_desc),
        "agreement": {"k": k, "compared_images": compared}
        | {key: round(v, 6) if math.isfinite(v) else None for key, v in agreement.items()},  # NaN: none
    }


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_csv(table: pd.DataFrame, index: bool = True) -> str:
    """`table` as CSV that a spreadsheet opens as values: a text cell, column or index name that
    begins as a formula does (=, +, -, @, a tab or a carriage return) gets a leading apostrophe, and
    every text is quoted (a spreadsheet that splits on `;` would find a formula after one), OWASP's
    remedies for CSV injection — a dataset's label such as `=HYPERLINK("http://…?"&A1, "…")` would
    otherwise send the sheet's cells away from whoever opens a hosted app's download. Numbers stay
    numbers, unquoted."""

    def value(cell: Any) -> Any:
        return "'" + cell if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS) else cell

    def text(kind: Any) -> bool:  # object, string or categorical: where text may be
        return not (pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_datetime64_any_dtype(kind))

    safe = table.rename(columns=value).rename_axis(index=[value(n) for n in table.index.names])
    if text(safe.index.dtype):
        safe.index = safe.index.map(value)
    for at, kind in enumerate(safe.dtypes):
        if text(kind):
            safe.isetitem(at, safe.iloc[:, at].map(value))
    return safe.to_csv(index=index, quoting=csv.QUOTE_NONNUMERIC)


def _json_value(value: Any) -> Any:
    """A manifest value as JSON has it: a missing one (NaN, NA, None) or an infinite one is null,
    since `json.dumps` would write NaN / Infinity, which strict parsers refuse."""
    if is_missing(value):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value
