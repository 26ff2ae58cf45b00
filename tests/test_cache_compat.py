"""A cache written by an earlier VFS (commit e65f13a, before the cache module was split) opens,
describes itself and searches exactly as it did then (results recorded by that code)."""

import json
from pathlib import Path

import numpy as np
import pytest

from vfs.cache import open_cache
from vfs.search import search_regions

FIXTURE = Path(__file__).parent / "fixtures" / "cache_v1_e65f13a"
EXPECTED = json.loads(FIXTURE.with_name(FIXTURE.name + ".expected.json").read_text())


def test_an_older_cache_describes_itself_as_before():
    info = open_cache(FIXTURE).info()  # keys added since (e.g. "columns") may come too
    expected = {k: v for k, v in EXPECTED["info"].items() if k != "location"}
    assert {k: info[k] for k in expected} == expected
    assert (
        "feature_scale" not in open_cache(FIXTURE).attrs and info["feature_scale"] == 1.0
    )  # stored unscaled


def test_an_older_cache_checks_whole_and_says_what_it_cannot_verify():
    """Its compressed chunks carry no zstd checksum (written before VFS stored one): `vfs check`
    finds no damage and names the arrays a garbled chunk of which would decode unnoticed."""
    found = open_cache(FIXTURE).check()
    assert found.ok and found.images == EXPECTED["info"]["stored"]
    assert {"thumbs", "source_index"} <= set(found.unverified)
    assert any(name.startswith("manifest/") for name in found.unverified)


@pytest.mark.parametrize("kernel", ["off", "auto"])
@pytest.mark.parametrize("case", sorted(EXPECTED["results"]))
def test_an_older_cache_searches_as_before(case, kernel, monkeypatch):
    """The same exact top-k, its scores and windows. With the forms of then (oneDNN's cells and
    band, `VFS_KERNEL=off`) every image's score as then, to 1e-6: bit-equal on the machines of 26–29
    Nov, one image of 20 a bit off (1.1e-7 relative) on an Intel Xeon of 30 Nov, whose sums run in
    another order. A region spanning the grid is now one product (one gemv, or the pairs kernel: fp32
    sums of exact fp16 features), whose other images' fast scores differ within the old fast bound."""
    monkeypatch.setenv("VFS_KERNEL", kernel)
    want = EXPECTED["results"][case]
    budget = None if case.endswith("None") else int(case.rsplit("-", 1)[1])
    got = search_regions(
        open_cache(FIXTURE),
        3,
        np.array(want["mask"], np.float32),
        k=5,
        exclude=3,
        device="cpu",
        memory_budget=budget,
    )
    assert got.top["index"].tolist() == want["index"]
    scores = np.array(want["score"], np.float32)
    if got.method in ("cells", "band"):
        np.testing.assert_allclose(got.scores, scores, rtol=1e-6)  # the order of sums aside
        np.testing.assert_array_equal(got.placements, want["placements"])
    else:
        assert got.method in ("pairs", "whole") and (kernel == "auto" or case.startswith("soft"))
        np.testing.assert_allclose(got.scores, scores, atol=2e-3)
        top = got.top["index"].to_numpy()
        np.testing.assert_array_equal(got.placements[top], np.array(want["placements"])[top])
    assert got.top.drop(columns=["grid_box", "pixel_box"]).to_dict("list") == want["top"]


def test_a_table_stores_a_missing_value_as_the_empty_string_and_reads_nul_as_missing(tmp_path):
    """docs/cache-format.md: missing values are stored as "" (numpy's strings drop NUL, so no cache
    ever held the "\\0" the page once named); both read back as missing, and so does an empty value."""
    import pandas as pd
    import zarr

    from vfs.cache.format import read_table, write_table

    group = zarr.open_group(tmp_path / "t.zarr", mode="w", zarr_format=3)
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "label": ["cat", None, "", "dog"]})
    write_table(group, "manifest", table)
    assert group["manifest"]["label"][:].tolist() == ["cat", "", "", "dog"]
    group["manifest"]["label"][3] = "\x00"  # as another writer following the old page might
    assert read_table(group, "manifest")["label"].tolist() == ["cat", None, None, None]


def test_a_tables_nullable_and_time_gaps_are_stored_and_read_as_missing(tmp_path):
    """A parquet manifest's nullable Int64 / Float64 / boolean columns and its times hold pd.NA and
    NaT for a gap: stored as "" like None and NaN, and read back as missing — and so are the
    "<NA>" / "NaT" that caches written before stored for them (that cache's manifest could not be
    read: to_numeric refused "<NA>")."""
    import pandas as pd
    import zarr

    from vfs.cache.format import CacheError, read_table, write_table

    group = zarr.open_group(tmp_path / "t.zarr", mode="w", zarr_format=3)
    table = pd.DataFrame(
        {
            "age": pd.array([1, None, 3], dtype="Int64"),
            "dose": pd.array([1.5, None, 2.0], dtype="Float64"),
            "flag": pd.array([True, None, False], dtype="boolean"),
            "when": pd.to_datetime(["2020-01-01", None, "2020-01-03"]),
            "label": ["<NA>", "NaT", None],  # text: kept as written
        }
    )
    write_table(group, "manifest", table)
    assert [group["manifest"][c][1] for c in ("age", "dose", "flag", "when")] == ["", "", "", ""]
    back = read_table(group, "manifest")
    assert back["age"].tolist()[::2] == [1, 3] and pd.isna(back["age"][1])
    assert back["dose"].tolist()[::2] == [1.5, 2.0] and pd.isna(back["dose"][1])
    assert back["flag"].tolist()[::2] == [True, False] and pd.isna(back["flag"][1])
    assert pd.isna(back["when"][1]) and back["when"][0] == "2020-01-01 00:00:00"
    assert back["label"].tolist() == ["<NA>", "NaT", None]

    for column, old in (("age", "<NA>"), ("dose", "<NA>"), ("flag", "<NA>"), ("when", "NaT")):
        group["manifest"][column][1] = old  # as written before
    old_back = read_table(group, "manifest")
    assert all(pd.isna(old_back[c][1]) for c in ("age", "dose", "flag", "when"))
    assert old_back["age"].tolist()[::2] == [1, 3]

    group["manifest"]["age"][0] = "one"  # damage: a clear refusal, not pandas' ValueError
    with pytest.raises(CacheError, match="'age' is not numbers"):
        read_table(group, "manifest")
