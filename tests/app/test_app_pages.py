"""The dashboard's pages through streamlit.testing (AppTest), on small real caches.

Drawings are injected through the canvas's session state, as the component would send them.
"""

import json
import os
import re
import shutil
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import zarr
from apphelpers import (
    BOX_SHAPE,
    SMALL,
    box_paint,
    draw,
    no_exceptions,
    png_url,
    send_drawing,
    start_app,
    texts,
    wait_until,
)
from PIL import Image

from vfs.cache import open_cache
from vfs.data import EMBEDDED_DATASET
from vfs.jobs import BuildJob, build_cache
from vfs.stats import GROUP_TABLE_COLUMNS


def page(at, name):
    return no_exceptions(at.switch_page(f"app_pages/{name}.py").run())


def use_cache(at, key, caches, name):
    return no_exceptions(at.selectbox(key=key).set_value(str(caches / f"{name}.zarr")).run())


def searched(app, caches, **paint):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    return no_exceptions(draw(at, box_paint(**paint) if paint else None))


def png(seed=1):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


# --- Home -----------------------------------------------------------------------------------------
def test_home_lists_caches_and_offers_the_demo(app):
    no_exceptions(app)
    table = app.dataframe[0].value
    assert list(table["cache"]) == ["findings", "small", "small_b4"]
    assert set(table["status"]) == {"complete"} and list(table["images"]) == [6, SMALL, SMALL]
    assert list(table["grid"]) == ["7×7×192", "7×7×192", "14×14×112"]
    assert app.button(key="home.demo").label == "Build the demo cache"
    assert "1. **Build** a feature cache" in app.markdown[1].value and app.header[0].value == "Caches"
    assert app.text_input(key="home.location").label == "Open a cache by path or URL"


def test_demo_build_runs_in_the_background_and_can_be_cancelled(tmp_path, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = start_app()
    assert any("No caches yet" in t for t in texts(at.info))
    at.button(key="home.demo").click().run()
    out = str(tmp_path / "demo.zarr")
    cancel = at.button(key=f"build.cancel.{out}")
    assert at.get("progress") and "demo" in at.get("progress")[0].proto.text
    cancel.click().run()
    if progress := at.get("progress"):  # still stopping (the model loads for seconds): said at once
        assert "cancelling" in progress[0].proto.text and at.button(key=f"build.cancel.{out}").disabled
    wait_until(lambda: any("cancelled" in t for t in texts(at.run().warning)))
    stored = open_cache(out).stored  # what the cancelled build left: every image it computed
    assert any(f"{stored} images are stored" in t and "a resume goes on" in t for t in texts(at.warning))
    assert at.button(key="home.demo").label == "Resume building the demo cache"
    assert at.button(key=f"build.resume.{out}").label == "Resume build"
    assert at.dataframe[0].value["status"][0].startswith("partial: ") and not open_cache(out).complete


def test_a_stopped_build_whose_cache_another_process_finished_offers_no_resume(tmp_path, monkeypatch):
    """The page's build failed on the lock of a CLI build of the same cache; after that one completed
    it, the panel still said "a resume goes on from there" with a Resume button (Build review)."""
    from ui.core import DEMO_JOB
    from vfs.cache import BuildLock
    from vfs.jobs import BuildJob, build_cache

    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    out = str(tmp_path / "demo.zarr")
    job = replace(BuildJob.from_toml(DEMO_JOB, out=out), limit=8)
    at = start_app()
    with BuildLock(out):  # the CLI's build holds it
        at.button(key="home.demo").click().run()
        said = "demo: this server's build failed; another build is writing"
        wait_until(lambda: any(t.startswith(said) for t in texts(at.run().info)))
        assert f"build.resume.{out}" not in {b.key for b in at.button}  # held: no resume offered
    assert build_cache(job) is not None  # the other process's build completes it
    at.run()
    assert any(
        "this server's build failed; the cache is complete now, with 8 images" in t for t in texts(at.info)
    )
    assert f"build.resume.{out}" not in {b.key for b in at.button}


def test_a_cache_whose_every_image_was_skipped_is_not_offered_for_search(caches, tmp_path, monkeypatch):
    """A complete cache of no image (builds before 2026-11-29 made one of only unreadable files; they
    now fail instead): the search pages skip it (picking it crashed the index input, whose range
    0..n-1 was empty) and the Build page still lists it."""
    import pandas as pd

    from vfs.cache import CacheWriter, open_cache

    shutil.copytree(caches / "small.zarr", tmp_path / "caches" / "small.zarr")
    small = open_cache(caches / "small.zarr")
    records = pd.DataFrame({"path": ["broken.jpg"]})
    writer = CacheWriter.open(tmp_path / "caches" / "a.zarr", small.spec, records, small.thumbs.shape[1])
    writer.skip(0, "not an image (cannot identify format)")
    writer.finish(records)
    empty = open_cache(tmp_path / "caches" / "a.zarr")
    assert empty.complete and empty.n == 0
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "caches"))
    for name, key in (
        ("search", "search.cache"),
        ("distributions", "dist.cache"),
        ("compare", "compare.left"),
    ):
        at = page(start_app(), name)
        assert len(at.selectbox(key=key).options) == 1, name
        assert at.selectbox(key=key).value == str(tmp_path / "caches" / "small.zarr"), name
    assert list(page(start_app(), "build").dataframe[0].value["images"]) == [0, SMALL]


def test_opening_a_cache_by_path(caches, tmp_path, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = start_app()
    at.text_input(key="home.location").set_value(str(caches / "small.zarr"))
    no_exceptions(at.get("form_submit_button")[0].click().run())
    assert list(at.dataframe[0].value["cache"]) == ["small"]
    at.text_input(key="home.location").set_value((caches / "small.zarr").as_uri())  # a URL fsspec opens
    no_exceptions(at.get("form_submit_button")[0].click().run())
    assert not at.error and at.session_state["vfs.cache"] == (caches / "small.zarr").as_uri()
    at.text_input(key="home.location").set_value(str(tmp_path / "nothing.zarr"))
    at.get("form_submit_button")[0].click().run()
    (error,) = texts(at.error)
    assert "no cache at" in error and "no such folder" in error and "deleted or moved" not in error  # a typo
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))  # a cache the folder lists already: one row
    at = start_app()
    at.text_input(key="home.location").set_value(str(caches / "." / "small.zarr"))
    no_exceptions(at.get("form_submit_button")[0].click().run())
    assert list(at.dataframe[0].value["cache"]).count("small") == 1


# --- Search ---------------------------------------------------------------------------------------
def test_search_waits_for_a_stroke_then_ranks_scored_outlined_matches(app, caches):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    assert any("Draw on the query image" in t for t in texts(at.info))
    no_exceptions(draw(at))
    assert any(t.startswith(f"10 results from {SMALL} images in") for t in texts(at.caption))
    top = at.dataframe[0].value
    assert list(top["rank"]) == list(range(1, 11)) and top["score"].is_monotonic_decreasing
    assert 0 not in set(top["index"]) and set(top["label"]) <= {"photo", "face"}
    tiles = [c for image in at.image for c in image.captions if ". score " in c]
    assert (
        len(tiles) == 10
        and tiles[0] == f"1. score {top['score'][0]:.2f} · {top['label'][0]} · {top['domain'][0]}"
    )
    assert any("feature cells selected" in c for image in at.image for c in image.captions)
    assert [d.label for d in at.get("download_button")] == [
        "Download results (CSV)",
        "Download results (JSON)",
        "Download figure (PNG)",
        "Download region (PNG mask)",
    ]


def test_results_leave_out_the_label_or_domain_column_a_cache_has_none_of():
    """The table and the CSV: a cache without a domain column shows no column of "None"s."""
    from types import SimpleNamespace

    import pandas as pd

    from ui.views import result_columns

    result = SimpleNamespace(top=pd.DataFrame(columns=["rank", "index", "score", "path", "label", "domain"]))
    columns = partial(result_columns, result=result)
    assert columns(SimpleNamespace(label_col="finding", domain_col=None)) == [
        "rank",
        "index",
        "score",
        "path",
        "label",
    ]
    assert columns(SimpleNamespace(label_col=None, domain_col="site"))[-1] == "domain"
    assert "label" not in columns(SimpleNamespace(label_col=None, domain_col="site"))


def canvas_data(at) -> dict:
    """What the page sends the canvas (ui/canvas.py's `data`)."""
    return json.loads(at.get("bidi_component")[0].proto.json)


def test_the_canvas_takes_the_tool_and_brush_and_its_drawing_follows_to_another_page(app, caches):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    data = canvas_data(at)
    assert (data["tool"], data["brush"], data["size"], data["shapes"]) == ("brush", 32, 320, None)
    assert data["background"].startswith("data:image/jpeg;base64,")
    at.slider(key="search.brush").set_value(50).run()
    assert canvas_data(at)["brush"] == 50
    at.radio(key="search.tool").set_value("Rectangle").run()
    assert canvas_data(at)["tool"] == "rectangle" and at.slider(key="search.brush").disabled
    at = page(draw(at), "distributions")
    assert canvas_data(at)["shapes"] == [BOX_SHAPE]  # draw()'s
    data = canvas_data(at)  # and the tool and brush chosen (a page of its own had its own)
    assert (data["tool"], data["brush"], at.radio(key="dist.tool").value) == ("rectangle", 50, "Rectangle")


def link(at) -> dict[str, str]:
    """The page's address's parameters (AppTest keeps a value as a string or a list of one)."""
    return {k: v if isinstance(v, str) else v[-1] for k, v in at.query_params.items()}


def test_the_search_pages_address_names_its_cache_and_query_and_a_reload_opens_on_them(app, caches, tmp_path):
    """A reload (a new session) of the Search page came back on the first cache and image #0: nothing
    of the choice was in its address (search review). It now holds ?cache=NAME&query=I."""
    at = use_cache(page(app, "search"), "search.cache", caches, "small_b4")
    at = no_exceptions(at.number_input(key="search.index").set_value(7).run())
    assert link(at) == {"cache": "small_b4", "query": "7"}
    reloaded = start_app()
    reloaded.query_params.update(cache="small_b4", query="7")
    reloaded = page(reloaded, "search")
    assert reloaded.selectbox(key="search.cache").value == str(caches / "small_b4.zarr")
    assert reloaded.number_input(key="search.index").value == 7
    assert link(no_exceptions(reloaded.number_input(key="search.index").set_value(3).run()))["query"] == "3"
    # a cache of the same name elsewhere (opened by path, or a remote one) is linked by its location:
    # the name alone opened the caches folder's "small" on another dataset's image (diff review)
    elsewhere = tmp_path / "other" / "small.zarr"
    shutil.copytree(caches / "small_b4.zarr", elsewhere)
    opened = start_app()
    opened.session_state["vfs.opened"] = [str(elsewhere)]
    opened = use_cache(page(opened, "search"), "search.cache", tmp_path / "other", "small")
    assert link(opened)["cache"] == str(elsewhere)
    fresh = start_app()
    fresh.query_params.update(cache="small", query="7")
    assert page(fresh, "search").selectbox(key="search.cache").value == str(caches / "small.zarr")
    for cache, query in (("gone", "7"), ("small", "4000"), ("small", "-1")):  # a stale link: the defaults
        stale = start_app()
        stale.query_params.update(cache=cache, query=query)
        stale = page(stale, "search")
        assert stale.number_input(key="search.index").value == 0


def test_each_querys_drawing_comes_back_when_it_is_picked_again(app, caches):
    """One drawing a session: painting on another cache's image, then switching back, left the first
    cache's query with a blank canvas (search review)."""
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    at = no_exceptions(draw(at))
    other = {"kind": "rect", "box": [10, 10, 60, 60]}
    at = use_cache(at, "search.cache", caches, "findings")
    assert canvas_data(at)["shapes"] is None  # its own query: blank
    at = no_exceptions(
        send_drawing(at, {"shapes": [other], "paint": png_url(box_paint(0.03, 0.03, 0.19, 0.19))})
    )
    at = use_cache(at, "search.cache", caches, "small")
    assert canvas_data(at)["shapes"] == [BOX_SHAPE]
    assert any(t.startswith("10 results from") for t in texts(at.caption))  # searched again at once
    assert canvas_data(use_cache(at, "search.cache", caches, "findings"))["shapes"] == [other]


@pytest.mark.parametrize(
    "drawing, says",
    [
        ("a string", "holds no list of shapes"),
        ({"shapes": [BOX_SHAPE], "paint": "data:image/jpeg;base64,AAAA"}, "not a PNG data URL"),
        ({"shapes": [BOX_SHAPE], "paint": "data:image/png;base64,not base64!"}, "not a readable PNG"),
        ({"shapes": [BOX_SHAPE], "paint": png_url(np.ones((2000, 2000), bool))}, "2000×2000 px, not 320×320"),
        # decoded lazily: a truncated file failed outside the check, a traceback (hosted review)
        ({"shapes": [BOX_SHAPE], "paint": png_url(np.ones((320, 320), bool))[:200]}, "not a readable PNG"),
    ],
)
def test_a_drawing_the_canvas_does_not_send_is_an_error_message(app, caches, drawing, says):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    at = send_drawing(at, drawing)
    assert not at.exception, [e.value for e in at.exception]
    assert any("The drawing could not be read" in t and says in t for t in texts(at.error)), texts(at.error)
    assert len(at.get("bidi_component")) == 1  # the canvas stays, to clear it


def test_a_cleared_canvas_asks_for_a_region_again(app, caches):
    at = no_exceptions(send_drawing(searched(app, caches), {"shapes": [], "paint": None}))  # Clear
    assert any("Draw on the query image" in t for t in texts(at.info))
    assert not any(t.startswith("10 results from") for t in texts(at.caption))


def test_search_options_k_exclude_per_domain_labels_and_heat_maps(app, caches):
    at = searched(app, caches)
    at.slider(key="search.k").set_value(3).run()
    assert len(at.dataframe[0].value) == 3
    at.checkbox(key="search.exclude").uncheck().run()
    top = at.dataframe[0].value
    assert top["index"][0] == 0 and top["score"][0] == pytest.approx(1.0, abs=1e-3)
    at.slider(key="search.k").set_value(10).run()
    labels = at.multiselect(key=f"search.labels.{caches / 'small.zarr'}")
    labels.select("face").run()
    assert len(at.dataframe[0].value) == 10 and set(at.dataframe[0].value["label"]) == {"face"}
    faces = int((open_cache(caches / "small.zarr").manifest["label"] == "face").sum())
    assert faces < SMALL and any(
        t.startswith(f"10 results from {faces} of {SMALL} images in") for t in texts(at.caption)
    )
    no_exceptions(at.toggle(key="search.heat").set_value(True).run())
    captions = [c for image in at.image for c in image.captions if ". score " in c]
    assert len(captions) == 10
    for caption in captions:  # each tile's own scale, its best at least its score (a cell's best placement)
        m = re.search(r"score (-?[\d.]+).* · heat (-?[\d.]+) to (-?[\d.]+)$", caption)
        assert m and float(m[2]) <= float(m[3]) and float(m[1]) == pytest.approx(float(m[3]), abs=0.011), (
            caption
        )
    assert any("lowest cell → yellow its best" in c for image in at.image for c in image.captions)
    at.number_input(key="search.per_domain").set_value(1).run()
    assert list(at.dataframe[0].value["domain"]) == ["lfw"]
    at.multiselect(key=f"search.labels.{caches / 'small.zarr'}").unselect("face").run()
    assert sorted(at.dataframe[0].value["domain"]) == ["lfw", "samples"]
    # fewer than asked, and why: 2 of 10 read as a search that lost eight
    assert any(t.endswith(" — 2 of the 10 asked: at most 1 per domain") for t in texts(at.caption))


def test_a_heat_map_of_one_colour_says_so(app, caches):
    """A region as large as the grid has one placement: its tiles' captions read "heat 0.45 to 0.45"
    (search review)."""
    at = searched(app, caches, y0=0, x0=0, y1=1, x1=1)
    no_exceptions(at.toggle(key="search.heat").set_value(True).run())
    captions = [c for image in at.image for c in image.captions if ". score " in c]
    assert len(captions) == 10 and all(re.search(r" · heat -?[\d.]+ throughout$", c) for c in captions), (
        captions
    )


def test_fewer_results_than_asked_say_why(app, caches):
    """The per-domain cap is named only where it held images back (it was blamed for a dataset that
    had no more images: a review)."""
    at = use_cache(page(app, "search"), "search.cache", caches, "findings")  # 6 images, 3 PA and 3 AP
    at = no_exceptions(draw(at))
    at.number_input(key="search.per_domain").set_value(3).run()  # the 5 others: 2 PA, 3 AP, none held back
    assert any(t.endswith(" — 5 of the 10 asked: no more images to rank") for t in texts(at.caption))
    at.number_input(key="search.per_domain").set_value(1).run()
    assert any(t.endswith(" — 2 of the 10 asked: at most 1 per domain") for t in texts(at.caption))


def test_an_empty_region_is_an_error_message_not_a_traceback(app, caches):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    no_exceptions(draw(at, np.zeros((320, 320), bool)))
    assert any("the region is empty" in t for t in texts(at.error))


def test_a_manifests_text_is_shown_as_written_not_as_markdown(tmp_path, monkeypatch, findings_manifest):
    """Labels, domains and column names are their author's text: a `[link](…)`, `**` or `$…$` in
    one rendered as such in a caption, a result tile's caption or a header (a link and a remote
    image on a hosted server's pages: hosted review). Each shows escaped: inert, and as written."""
    import pandas as pd

    shutil.copytree(findings_manifest.parent, tmp_path / "data")
    dataset = tmp_path / "data" / "manifest.csv"
    label, domain = "x [log in](https://evil.example) ![t](https://evil.example/t.png)", "**PA** $y$ :red[z]"
    view = "view_[v](https://evil.example)"
    table = pd.read_csv(dataset).rename(columns={"view": view})
    table["label"], table[view] = label, [domain, "AP"] * 3
    table.to_csv(dataset, index=False)
    build_cache(
        BuildJob(layer="blocks.5", data=str(dataset), out=str(tmp_path / "c" / "f.zarr"), domain_col=view)
    )
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "c"))
    at = no_exceptions(draw(page(start_app(), "search")))
    shown = [c.value for c in at.caption] + [c for image in at.image for c in image.captions]  # as sent
    said = [t for t in shown if "evil" in t or "PA" in t]  # the query's caption, the tiles' captions
    assert len(said) > 3, shown
    for text in (label, domain):
        assert any(text in re.sub(r"\\(.)", r"\1", t) for t in said), said  # as written, once unescaped
    for t in said:  # and inert: no markdown character of theirs left unescaped
        assert not re.search(r"(?<!\\)[\[\]()*$:]", t), t
    # a widget's label is its accessible name too: only what reads as markdown inline is escaped
    named = at.number_input(key="search.per_domain").label
    assert named == r"At most n per domain (view\_\[v\](https\://evil.example))", named
    at = no_exceptions(page(at, "distributions"))
    at.selectbox(key="dist.column").set_value(view).run()
    header = next(h.value for h in at.header if h.value.startswith("Groups by"))
    assert re.sub(r"\\(.)", r"\1", header) == f"Groups by {view}" and "\\[v\\]\\(" in header


def test_a_widget_labels_column_name_is_escaped_only_where_markdown_reads_it():
    """A widget's label is also its accessible name, as given: "Only these labels (finding\\/label)"
    was read out with its backslash, and found by no label (app review)."""
    from ui.base import in_label

    assert in_label("finding/label") == "finding/label" and in_label("zarr.json (v2)") == "zarr.json (v2)"
    assert in_label("a_b *x* [l](u) $y$ :red[z] <b>&amp; `c`") == (
        r"a\_b \*x\* \[l\](u) \$y\$ \:red\[z\] \<b\>\&amp; \`c\`"
    )


def test_an_errors_quoted_text_is_shown_as_written(caches, tmp_path, monkeypatch):
    """An error quotes paths, labels and a cache's attributes — anyone's text: a crafted column key
    rendered its remote image in the page's error (review). Errors are shown as written."""
    shutil.copytree(caches / "small.zarr", tmp_path / "c" / "small.zarr")
    group = zarr.open_group(tmp_path / "c" / "small.zarr", mode="r+")
    spec = dict(group.attrs["spec"])
    spec["data"] = dict(spec["data"]) | {"label_col": "![t](https://evil.example/t.png)"}  # no such column
    group.attrs["spec"] = spec
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "c"))
    at = page(start_app(), "search")
    raw = [e.value for e in at.error]
    assert any("evil.example" in t for t in texts(at.error)), raw  # said, as written once unescaped
    assert not any(re.search(r"(?<!\\)[\[\]()!]", t) for t in raw), raw  # and inert


def test_a_damaged_manifest_is_a_message_at_the_query_picker(tmp_path, monkeypatch):
    """The query's caption reads the manifest: a cache that lost it showed a traceback there (a
    review of the caption's commit), where the search said it in words."""
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "caches" / "plain.zarr"
    build_cache(BuildJob(layer="blocks.5", data=str(tmp_path / "images"), out=str(out), image_size=64))
    shutil.rmtree(out / "manifest")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "caches"))
    at = page(start_app(), "search")
    assert any("its manifest is missing" in t for t in texts(at.error)), texts(at.error)


def test_query_by_index_thumbnails_random_and_label(app, caches):
    at = searched(app, caches)
    at.number_input(key="search.index").set_value(5).run()
    assert any("Draw on the query image" in t for t in texts(at.info))  # a new image, a new drawing
    at.toggle(key="search.browse").set_value(True).run()
    uses = [int(b.key.rsplit(".", 1)[1]) for b in at.button if b.key and b.key.startswith("search.use.")]
    assert len(uses) > 6 and uses == sorted(uses), uses  # in reading order: the keyboard's (app review)
    at.button(key="search.use.7").click().run()
    assert at.number_input(key="search.index").value == 7
    assert any(t.startswith("#7 · ") for t in texts(at.caption))  # the query's label, domain and file
    at.selectbox(key="search.label").set_value("face").run()
    first_face = at.number_input(key="search.index").value  # #7 is no face: the first face is the query
    assert first_face >= 13 and any(t.startswith(f"#{first_face} · face") for t in texts(at.caption))
    at.button(key="search.random").click().run()
    assert at.number_input(key="search.index").value >= 13  # the first 13 images are photos
    assert all(
        c.startswith("#") and int(c[1:]) >= 13
        for image in at.image
        for c in image.captions
        if c.startswith("#")
    )


def test_the_region_can_be_kept_for_other_images_and_downloaded_as_a_mask(app, caches, tmp_path):
    """A researcher applies one region (the heart) to X-ray after X-ray: a new query image dropped
    the drawing (helper trial). Kept, it searches the next image at once, the same cells; and the
    region's PNG is a mask the CLI reads to the same grid mask."""
    from vfs.masks import load_mask

    at = searched(app, caches)
    first = at.dataframe[0].value
    at.checkbox(key="region.keep").check().run()
    at.number_input(key="search.index").set_value(5).run()
    assert not any("Draw on the query image" in t for t in texts(at.info))
    kept = at.dataframe[0].value
    assert 5 not in set(kept["index"]) and list(kept["index"]) != list(first["index"])
    region = at.session_state["vfs.region"]
    assert region.query.index == 5
    assert "Download region (PNG mask)" in [b.label for b in at.get("download_button")]
    from vfs.render import region_mask_png

    (tmp_path / "region.png").write_bytes(region_mask_png(region.drawing.paint))
    cache = open_cache(caches / "small.zarr")
    np.testing.assert_array_equal(load_mask(tmp_path / "region.png", cache.spec.grid), region.mask(cache))
    at.checkbox(key="region.keep").uncheck().run()
    at.number_input(key="search.index").set_value(6).run()
    assert any("Draw on the query image" in t for t in texts(at.info))  # off: a new image, a new drawing
    at.number_input(key="search.index").set_value(5).run()  # … and the drawn one comes back with its image
    assert not any("Draw on the query image" in t for t in texts(at.info))
    assert at.dataframe[0].value.equals(kept)


def test_a_region_loads_from_a_mask_file(app, caches, tmp_path):
    """A region saved with "Download region" comes back pixel for pixel, on the canvas and in the
    search; a mask painted on the query photo lands where the CLI's --mask puts it; a file that
    cannot be used is said, and the drawing stays (a trial asked to upload the region it had saved)."""
    from ui.canvas import mask_shape
    from vfs.masks import load_mask
    from vfs.render import region_mask_png

    at = searched(app, caches, y0=0.2, x0=0.45, y1=0.5, x1=0.7)
    saved, first = at.session_state["vfs.region"].drawing.paint, at.dataframe[0].value
    draw(at, box_paint(0.6, 0.1, 0.9, 0.3))
    assert not at.dataframe[0].value.equals(first)

    at.file_uploader(key="search.mask_file.0").set_value(("r.png", region_mask_png(saved), "image/png"))
    no_exceptions(at.run())
    region = at.session_state["vfs.region"]
    np.testing.assert_array_equal(region.drawing.paint, saved)
    assert region.drawing.shapes == [mask_shape(saved)]  # what the new canvas draws when it mounts
    assert at.dataframe[0].value.equals(first)
    assert at.get("bidi_component")[0].proto.id.endswith(f"search.canvas.{region.query.key}.1")
    assert at.file_uploader(key="search.mask_file.1").value is None  # emptied for the next file

    cache = open_cache(caches / "small.zarr")
    index = region.query.index
    height, width = cache.image_size(index)
    photo = np.zeros((height, width), np.uint8)
    photo[height // 3 : height // 2, width // 4 : width // 2] = 255
    Image.fromarray(photo).save(tmp_path / "on_photo.png")
    at.file_uploader(key="search.mask_file.1").set_value(
        ("on_photo.png", (tmp_path / "on_photo.png").read_bytes(), "image/png")
    )
    no_exceptions(at.run())
    grid = cache.spec.grid
    cli = load_mask(
        tmp_path / "on_photo.png", grid, cache.spec.preprocess.painted_on(lambda: (height, width))
    )
    loaded = at.session_state["vfs.region"].mask(cache)
    np.testing.assert_array_equal(loaded > 0.05, cli > 0.05)
    np.testing.assert_allclose(loaded, cli, atol=0.06)  # the canvas's paint: a pixel touched is painted

    kept = at.session_state["vfs.region"]
    for loads, (name, data, said) in enumerate(
        [
            ("blank.png", region_mask_png(np.zeros((320, 320), bool)), "paints nothing"),
            ("bad.png", b"not a png", "cannot read the mask image"),
            ("strip.png", _png(np.full((10, 300), 255, np.uint8)), "square view"),  # no shape of the photo
        ],
        start=2,
    ):
        at.file_uploader(key=f"search.mask_file.{loads}").set_value((name, data, "image/png"))
        no_exceptions(at.run())
        assert any(name in t and said in t for t in texts(at.error)), (name, texts(at.error))
        assert at.session_state["vfs.region"] is kept and len(at.dataframe) == 1

    grey = np.full((320, 320), 2, np.uint8)  # a background of 2/255: paint, and most of it faint
    grey[100:200, 100:200] = 255
    at.file_uploader(key="search.mask_file.5").set_value(("grey.png", _png(grey), "image/png"))
    no_exceptions(at.run())
    assert any("grey.png: 90% of the pixels it paints are faint" in t for t in texts(at.warning))
    assert at.session_state["vfs.region"].drawing.paint.all()  # as the canvas takes it, said


def _png(grey: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_loaded_mask_is_a_few_kilobytes_of_json_whatever_its_pixels():
    """A dithered mask (a thresholded saliency map) became ≈ 1 MB of boxes, resent on every rerun; its
    bits come back exactly, rows padded to whole bytes (the painter reads them so: tests/e2e)."""
    import base64

    from ui.canvas import mask_shape

    paint = np.random.default_rng(0).random((203, 301)) < 0.5  # odd sizes: rows end mid-byte
    shape = mask_shape(paint)
    assert shape["kind"] == "mask" and shape["size"] == [301, 203]
    rows = np.frombuffer(base64.b64decode(shape["bits"]), np.uint8).reshape(203, -1)
    np.testing.assert_array_equal(np.unpackbits(rows, axis=1)[:, :301].astype(bool), paint)
    assert len(json.dumps(shape)) < 203 * 38 * 4 / 3 + 100  # 38 bytes a row


def test_uploaded_query_uses_the_caches_own_model(app, caches):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    at.radio(key="search.from").set_value("Upload").run()
    assert any("Upload an image" in t for t in texts(at.info))
    at.file_uploader(key="search.upload").set_value(("noise.png", png(), "image/png")).run()
    assert "Query: noise.png, uploaded" in texts(at.caption)  # its name whole (the chip shortens it)
    no_exceptions(draw(at))
    top = at.dataframe[0].value
    assert len(top) == 10 and top["score"].is_monotonic_decreasing
    exclude = at.checkbox(key="search.exclude.upload")  # an upload is none of the cache's images
    assert exclude.disabled and not exclude.value


def test_an_upload_of_a_cache_image_is_searched_as_that_image(app, caches, findings_manifest):
    """An upload of one of the dataset's files was ranked among the others (its copy first, score
    ≈ 1) and counted in the statistics the pages said they left the query out of, its patient's
    other images too (researcher review)."""
    at = use_cache(page(app, "search"), "search.cache", caches, "findings")
    at.radio(key="search.from").set_value("Upload").run()
    data = (findings_manifest.parent / "images" / "2.png").read_bytes()
    at.file_uploader(key="search.upload").set_value(("2.png", data, "image/png")).run()
    assert any(t.startswith("2.png is image #2 · Cardiomegaly · PA of this cache") for t in texts(at.info))
    top = no_exceptions(draw(at)).dataframe[0].value
    assert len(top) == 5 and 2 not in set(top["index"])  # left out, as the dataset image is
    assert at.selectbox(
        key="search.sharing." + str(caches / "findings.zarr")
    ).options  # its view's others too


def test_an_upload_recognised_in_a_cache_rebuilt_since_is_found_anew(
    tmp_path, monkeypatch, findings_manifest
):
    """The image an upload was recognised as was remembered per cache spec: rebuilt over the same
    files in another order, the cache's row of that number was another image (diff review)."""
    import pandas as pd

    shutil.copytree(findings_manifest.parent, tmp_path / "data")
    dataset = tmp_path / "data" / "manifest.csv"
    out = str(tmp_path / "caches" / "f.zarr")
    build_cache(BuildJob(layer="blocks.5", data=str(dataset), out=out, domain_col="view"))
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "caches"))
    at = page(start_app(), "search")
    at.radio(key="search.from").set_value("Upload").run()
    data = (dataset.parent / "images" / "2.png").read_bytes()
    at.file_uploader(key="search.upload").set_value(("2.png", data, "image/png")).run()
    assert any(t.startswith("2.png is image #2 ") for t in texts(at.info))
    pd.read_csv(dataset).iloc[::-1].to_csv(dataset, index=False)  # the same files, in another order
    shutil.rmtree(out)
    build_cache(BuildJob(layer="blocks.5", data=str(dataset), out=out, domain_col="view"))
    at = no_exceptions(at.run())
    assert any(t.startswith("2.png is image #3 ") for t in texts(at.info)), texts(at.info)


def own_findings(tmp_path: Path, findings_manifest: Path) -> Path:
    """A copy of the findings dataset, its manifest's rows kept beside it (all.csv) for `rebuilt`."""
    shutil.copytree(findings_manifest.parent, tmp_path / "data")
    dataset = tmp_path / "data" / "manifest.csv"
    shutil.copy(dataset, dataset.with_name("all.csv"))
    return dataset


def rebuilt(dataset: Path, out: str, rows=None) -> None:
    """The cache at `out` built anew from `dataset` (its manifest's `rows` only, where given) — the
    same spec, its manifest's path unchanged."""
    import pandas as pd

    if rows is not None:
        pd.read_csv(dataset.with_name("all.csv")).iloc[rows].to_csv(dataset, index=False)
    shutil.rmtree(out, ignore_errors=True)
    build_cache(BuildJob(layer="blocks.5", data=str(dataset), out=out, domain_col="view"))


def test_a_local_cache_rebuilt_at_its_place_is_searched_anew(tmp_path, monkeypatch, findings_manifest):
    """A search was remembered per cache spec: rebuilt at its place from other images under the
    same manifest path, the session's page showed the old cache's results (soak review)."""
    dataset = own_findings(tmp_path, findings_manifest)
    out = str(tmp_path / "caches" / "f.zarr")
    rebuilt(dataset, out)
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "caches"))
    at = no_exceptions(draw(page(start_app(), "search")))
    before = at.dataframe[0].value
    rebuilt(dataset, out, rows=slice(None, None, -1))  # the same files in another order: image 0 another
    at = no_exceptions(at.run())
    fresh = no_exceptions(draw(page(start_app(), "search"))).dataframe[0].value
    assert not at.dataframe[0].value.equals(before) and at.dataframe[0].value.equals(fresh)


def test_the_server_lets_a_rebuilt_local_cache_go(tmp_path, findings_manifest):
    """Each rebuild of a local cache kept the old one open, its features in memory (+200 MB a
    rebuild of a 10,000-image cache), for good (soak review): once the server opens the new one,
    it holds the old one no more."""
    import gc
    import weakref

    import ui.core

    dataset = own_findings(tmp_path, findings_manifest)
    out = str(tmp_path / "f.zarr")
    rebuilt(dataset, out)
    cache = ui.core.get_cache(out)
    ui.core.warm_up(cache)
    ui.core.outlined_tiles(cache, [(0, (0, 0, 2, 2))])
    ui.core.groups(cache, "label")
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("vfs-warm-up")], 60)
    old = weakref.ref(cache)
    del cache
    rebuilt(dataset, out, rows=slice(None, None, -1))
    assert ui.core.get_cache(out).n == 6
    gc.collect()
    assert old() is None
    # replaced by a copy made earlier (cp -a, rsync -a, tar x keep its older time): let go too
    older = weakref.ref(ui.core.get_cache(out))
    shutil.copytree(out, tmp_path / "copy.zarr")
    rebuilt(dataset, str(tmp_path / "copy.zarr"))  # another build, its files an hour old
    stamp = (tmp_path / "copy.zarr" / "zarr.json").stat().st_mtime - 3600
    os.utime(tmp_path / "copy.zarr" / "zarr.json", (stamp, stamp))
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "copy.zarr", out)
    os.utime(Path(out) / "zarr.json", (stamp, stamp))
    ui.core.get_cache(out)
    gc.collect()
    assert older() is None


def test_distributions_of_a_cache_rebuilt_with_more_images_is_no_crash(
    tmp_path, monkeypatch, findings_manifest
):
    """Rebuilt from 4 images to 6 at its place, the page paired the remembered search's 4 scores with
    the new cache's 6 labels: IndexError (soak review)."""
    dataset = own_findings(tmp_path, findings_manifest)
    out = str(tmp_path / "caches" / "f.zarr")
    rebuilt(dataset, out, rows=slice(0, 5))
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path / "caches"))
    at = no_exceptions(draw(page(start_app(), "distributions")))
    before = at.dataframe[0].value
    rebuilt(dataset, out, rows=slice(None))
    at = no_exceptions(at.run())
    fresh = no_exceptions(draw(page(start_app(), "distributions"))).dataframe[0].value
    assert at.dataframe[0].value.equals(fresh) and not fresh.equals(before)


def test_a_sessions_old_cache_stores_no_tiles_for_the_rebuilt_one(tmp_path, findings_manifest):
    """Result tiles were kept per location under the disk's current stamp, but encoded from the
    cache the session held: a session still on the old cache stored its thumbnails for every
    session of the rebuilt one — a dog painting captioned 'guitar' (soak review)."""
    import ui.core
    from vfs.render import jpeg_data_url, outlined_match

    dataset = own_findings(tmp_path, findings_manifest)
    out = str(tmp_path / "c.zarr")
    rebuilt(dataset, out)
    old = ui.core.get_cache(out)
    matches = [(0, (0, 0, 2, 2)), (1, (1, 1, 3, 3))]
    ui.core.outlined_tiles(old, matches)
    rebuilt(dataset, out, rows=slice(None, None, -1))
    ui.core.outlined_tiles(old, matches)  # the stale session, after the rebuild
    new = ui.core.get_cache(out)
    expected = [jpeg_data_url(outlined_match(new.thumb(i), box, new.spec.grid)) for i, box in matches]
    assert ui.core.outlined_tiles(new, matches) == expected != ui.core.outlined_tiles(old, matches)


def test_an_unreadable_upload_is_an_error_message(app, caches):
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    at.radio(key="search.from").set_value("Upload").run()
    no_exceptions(
        at.file_uploader(key="search.upload").set_value(("bad.png", b"not an image", "image/png")).run()
    )
    assert any("not an image" in t for t in texts(at.error))


def test_an_upload_over_the_servers_limit_is_refused_by_the_server(caches, monkeypatch):
    """The uploader's max_upload_size is the browser's to keep: a crafted client sent more than
    VFS_MAX_UPLOAD_MB and the server took it (hosted review)."""
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    monkeypatch.setenv("VFS_MAX_UPLOAD_MB", "1")
    at = use_cache(page(start_app(), "search"), "search.cache", caches, "small")
    at.radio(key="search.from").set_value("Upload").run()
    big = png() + bytes(3 << 19)  # a PNG and 1.5 MB more
    at = no_exceptions(at.file_uploader(key="search.upload").set_value(("big.png", big, "image/png")).run())
    assert any("this server takes images of at most 1 MB" in t for t in texts(at.error))


def test_a_published_caches_recorded_text_renders_no_markdown(caches, tmp_path, monkeypatch):
    """A backtick in a cache's recorded dataset source ended its code span on the hosted Home page,
    the rest rendered as a live link and a remote image for every visitor (hosted review)."""
    from ui.views import cache_provenance

    shutil.copytree(caches / "small.zarr", tmp_path / "c.zarr")
    group = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    spec = dict(group.attrs["spec"])
    spec["data"] = dict(spec["data"]) | {
        "source": "x` [Log in again](https://evil.example) ![t](https://evil.example/t.png) `"
    }
    group.attrs["spec"] = spec
    said = cache_provenance(open_cache(tmp_path / "c.zarr"))
    spans = said.split("`")
    assert len(spans) % 2 == 1  # every code span closed
    assert all("](" not in text for text in spans[::2]), said  # no link or image outside one


@pytest.mark.parametrize(
    "attribute, value", [("created", 20260101), ("versions", ["vfs", "torch"]), ("versions", "vfs torch")]
)
def test_a_published_cache_with_records_of_another_type_is_said_damaged(
    caches, tmp_path, monkeypatch, attribute, value
):
    """Such a cache crashed the hosted Home page for every visitor ('int' object is not
    subscriptable), and uploads searched on it (hosted review): refused where it is opened."""
    from vfs.cache import CacheError

    shutil.copytree(caches / "small.zarr", tmp_path / "c.zarr")
    zarr.open_group(tmp_path / "c.zarr", mode="r+").attrs[attribute] = value
    with pytest.raises(CacheError, match=f"its attributes are damaged .*{attribute}"):
        open_cache(tmp_path / "c.zarr")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VFS_HOSTED", "1")
    no_exceptions(start_app())


# --- Distributions --------------------------------------------------------------------------------
def test_distributions_use_the_query_drawn_on_search(app, caches):
    at = page(searched(app, caches), "distributions")
    assert at.selectbox(key="dist.cache").value == str(caches / "small.zarr")
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    assert set(table["group"]) == {"face", "photo"} and table["auroc"].is_monotonic_decreasing
    assert list(table.columns) == list(GROUP_TABLE_COLUMNS)
    assert table["n"].sum() == SMALL - 1  # the query image is left out
    at.checkbox(key="dist.leave_out").uncheck().run()
    assert at.dataframe[0].value["n"].sum() == SMALL
    for kind in ("violin", "strip"):
        no_exceptions(at.radio(key="dist.kind").set_value(kind).run())
    assert at.get("download_button")[0].label == "Download per-image scores (CSV)"


def test_distributions_score_every_image_exactly(app, caches, monkeypatch):
    """The page's statistics use every image's score: it asks for float64 ones (`all_exact`), alike
    on every machine, where the Search page keeps the fast ones beyond its top-k."""
    import ui.query

    asked, search = [], ui.query.search_regions
    monkeypatch.setattr(
        ui.query, "search_regions", lambda *a, **kw: asked.append(kw["all_exact"]) or search(*a, **kw)
    )
    no_exceptions(page(searched(app, caches), "distributions"))
    assert asked == [False, True]


def test_distributions_split_a_multi_label_column_into_present_and_absent(app, caches):
    at = use_cache(page(app, "distributions"), "dist.cache", caches, "findings")
    no_exceptions(draw(at))
    assert at.selectbox(key="dist.column").options == ["label", "view"]
    groups = set(at.dataframe[0].value["group"])
    assert groups == {"Cardiomegaly", "Effusion", "Edema", "No Finding"}
    one_test = "Two groups that split the images are one test"
    assert not any(one_test in t for t in texts(at.caption))  # findings overlap: four tests
    at.selectbox(key="dist.finding.label").set_value("Cardiomegaly").run()
    table = at.dataframe[0].value.set_index("group")
    assert dict(table["n"]) == {"True": 2, "False": 3}  # image 0 (Cardiomegaly|Effusion) is the query
    assert any(one_test in t for t in texts(at.caption))  # True's AUROC is 1 − False's, one p-value
    assert any("Groups by Cardiomegaly present" in h for h in texts(at.header))


def test_distributions_and_search_leave_out_the_images_sharing_the_querys_value(app, caches):
    """A patient's other X-rays are alike beyond any finding (the helper's study: 9 of the top 10
    were the query's patient): the pages leave out the images sharing a chosen column's value."""
    at = use_cache(page(app, "distributions"), "dist.cache", caches, "findings")
    no_exceptions(draw(at))
    key = f"dist.sharing.{caches / 'findings.zarr'}"
    assert at.selectbox(key=key).options == ["(none)", "label", "view"]  # "No Finding" repeats
    at.selectbox(key="dist.column").set_value("view").run()
    assert dict(at.dataframe[0].value.set_index("group")["n"]) == {"AP": 3, "PA": 2}  # less the query
    at.selectbox(key=key).set_value("view").run()
    assert dict(at.dataframe[0].value.set_index("group")["n"]) == {"AP": 3, "PA": 0}  # 0, 2, 4 are PA
    at = use_cache(page(at, "search"), "search.cache", caches, "findings")
    no_exceptions(draw(at))
    # the choice follows to the other page (the Distributions page counted the patient's other
    # X-rays after the Search page had left them out: a review), and back
    assert at.selectbox(key=f"search.sharing.{caches / 'findings.zarr'}").value == "view"
    assert sorted(at.dataframe[0].value["index"]) == [1, 3, 5]
    assert any("; 3 images left out" in t for t in texts(at.caption))  # the query and its fellow PAs
    at.selectbox(key=f"search.sharing.{caches / 'findings.zarr'}").set_value("(none)").run()
    at.checkbox(key="search.exclude").uncheck().run()
    at = page(at, "distributions")
    assert at.selectbox(key=key).value == "(none)" and not at.checkbox(key="dist.leave_out").value


def test_distributions_count_one_image_per_value_of_a_column(app, caches):
    """Statistics take the images as independent: "Count one image per" keeps one image of each value
    (one X-ray a patient), whatever query is drawn on (the stats review)."""
    at = use_cache(page(app, "distributions"), "dist.cache", caches, "findings")
    no_exceptions(draw(at))
    at.checkbox(key="dist.leave_out").uncheck().run()
    at.selectbox(key="dist.column").set_value("view").run()
    every = dict(at.dataframe[0].value.set_index("group")["n"])
    key = f"dist.one_per.{caches / 'findings.zarr'}"
    assert at.selectbox(key=key).options == ["(none)", "label", "view"]
    at.selectbox(key=key).set_value("view").run()
    assert dict(at.dataframe[0].value.set_index("group")["n"]) == {"AP": 1, "PA": 1} != every
    assert at.dataframe[0].value[["auroc", "p_value"]].notna().all().all()  # two images: still a test


def test_distributions_group_a_numeric_column_by_its_quartiles(app, caches, tmp_path):
    """An age (53 values in the helper's X-rays) was offered as one group per value or not at all."""
    import zarr

    from vfs.cache.format import read_table, write_table

    shutil.copytree(caches / "small.zarr", tmp_path / "aged.zarr")
    group = zarr.open_group(tmp_path / "aged.zarr", mode="r+")
    manifest = read_table(group, "manifest")
    write_table(group, "manifest", manifest.assign(age=np.arange(len(manifest)) * 2 + 20))
    at = page(app, "distributions")
    at.session_state["vfs.opened"] = [str(tmp_path / "aged.zarr")]
    at = no_exceptions(draw(use_cache(at.run(), "dist.cache", tmp_path, "aged")))
    assert "age (quartiles)" in at.selectbox(key="dist.column").options
    at = no_exceptions(at.selectbox(key="dist.column").set_value("age (quartiles)").run())
    table = at.dataframe[0].value.set_index("group")
    assert sorted(table.index) == ["20–38", "40–58", "60–78", "80–98"]  # least and most in each
    assert table["n"].sum() == SMALL - 1 and table["n"].between(9, 10).all()  # the query left out


def test_distributions_test_only_the_groups_of_a_value(app, caches, tmp_path):
    """The images without a value are described, not tested: a column of one value and blanks is no
    grouping (its table was all NaN), and two groups of a value beside "(missing)" are one test —
    the caption said so of "A" and "(missing)" instead (review)."""
    import zarr

    from vfs.cache.format import read_table, write_table

    shutil.copytree(caches / "small.zarr", tmp_path / "sexed.zarr")
    group = zarr.open_group(tmp_path / "sexed.zarr", mode="r+")
    manifest = read_table(group, "manifest")
    n = len(manifest)
    sex = [None if i % 5 == 0 else "MF"[i % 2] for i in range(n)]
    write_table(group, "manifest", manifest.assign(sex=sex, site=["A" if i % 2 else None for i in range(n)]))
    at = page(app, "distributions")
    at.session_state["vfs.opened"] = [str(tmp_path / "sexed.zarr")]
    at = no_exceptions(draw(use_cache(at.run(), "dist.cache", tmp_path, "sexed")))
    options = at.selectbox(key="dist.column").options
    assert "sex" in options and "site" not in options
    at = no_exceptions(at.selectbox(key="dist.column").set_value("sex").run())
    table = at.dataframe[0].value.set_index("group")
    assert table.loc[["F", "M"], "p_value"].notna().all() and np.isnan(table.loc["(missing)", "p_value"])
    caption = next(t for t in texts(at.caption) if t.startswith("Each group against"))
    assert "Two groups that split the images are one test" in caption and "described, not tested" in caption


def test_a_group_with_no_image_counted_says_so(app, caches, tmp_path):
    """A group whose images were all left out showed "n 0" and blanks under a caption that called
    the two groups "one test" (Compare review): it now says nothing was tested."""
    import zarr

    from vfs.cache.format import read_table, write_table

    at = no_exceptions(draw(use_cache(page(app, "distributions"), "dist.cache", caches, "small")))
    query = at.number_input(key="dist.index").value  # the page's, kept for the next cache
    shutil.copytree(caches / "small.zarr", tmp_path / "rare.zarr")
    group = zarr.open_group(tmp_path / "rare.zarr", mode="r+")
    manifest = read_table(group, "manifest")
    rare = ["yes" if i == query else "no" for i in range(len(manifest))]  # only the query, left out
    write_table(group, "manifest", manifest.assign(rare=rare))
    at.session_state["vfs.opened"] = [str(tmp_path / "rare.zarr")]
    at = no_exceptions(draw(use_cache(at.run(), "dist.cache", tmp_path, "rare")))
    assert at.number_input(key="dist.index").value == query
    at = no_exceptions(at.selectbox(key="dist.column").set_value("rare").run())
    table = at.dataframe[0].value.set_index("group")
    assert table.loc["yes", "n"] == 0
    caption = next(t for t in texts(at.caption) if t.startswith("Each group against"))
    assert "No image counted here is in yes" in caption and "nothing to test" in caption
    assert "Two groups that split the images are one test" not in caption


def test_a_cache_deleted_while_its_page_is_open_is_a_message(app, caches, tmp_path):
    """Another session's Build page (or the disk) removed the cache: the next rerun of the page's
    fragment says so, not a traceback."""
    shutil.copytree(caches / "findings.zarr", tmp_path / "doomed.zarr")
    at = page(app, "distributions")
    at.session_state["vfs.opened"] = [str(tmp_path / "doomed.zarr")]  # as the Home page opens one
    at = no_exceptions(draw(use_cache(at.run(), "dist.cache", tmp_path, "doomed")))
    shutil.rmtree(tmp_path / "doomed.zarr")
    at.radio(key="dist.kind").set_value("violin").run()
    assert not at.exception and any("(deleted or moved?): pick another one" in t for t in texts(at.error))


def test_a_page_that_opens_on_another_cache_than_the_one_chosen_before_says_why(app, caches):
    """The chosen cache was deleted from the caches' folder: the next page opened on another one
    without a word, and computed its statistics there (a review)."""
    at = page(app, "search")
    gone = str(caches / "deleted_since.zarr")
    at.session_state["vfs.cache"] = gone  # as the pages share the chosen cache
    at = page(at, "distributions")
    assert any(
        f"The cache chosen before, {gone}, is gone (deleted or moved?)" in t for t in texts(at.warning)
    )
    assert not any("is gone" in t for t in texts(page(at, "search").warning))  # said once


# --- Compare --------------------------------------------------------------------------------------
def test_compare_two_layers_of_the_same_images(app, caches):
    at = use_cache(page(app, "compare"), "compare.left", caches, "small")
    at = no_exceptions(draw(use_cache(at, "compare.right", caches, "small_b4")))
    left, right = at.dataframe[0].value, at.dataframe[1].value
    assert len(left) == len(right) == 10
    # the overlap is the shown lists' (the query, excluded from them, is not counted as shared)
    query = at.number_input(key="compare.index").value
    assert query not in set(left["index"]) | set(right["index"])
    assert at.metric[0].value == f"{len(set(left['index']) & set(right['index'])) / 10:.0%}"
    assert [m.label for m in at.metric] == [
        "Top-10 overlap",
        f"Spearman ρ ({open_cache(caches / 'small.zarr').n - 1:,} images)",  # the compared: the query out
        f"Kendall τ ({open_cache(caches / 'small.zarr').n - 1:,} images)",
    ]
    assert at.metric[0].value.endswith("%") and len(at.get("plotly_chart")) == 1
    assert texts(at.header)[:2] == ["small", "small_b4"]  # h2 under the title: no level skipped
    assert {  # one view (one model's two layers): one region file serves both sides
        "Download both sides' scores (CSV)",
        "Download the comparison (JSON)",
        "Download region (PNG mask)",
    } <= {b.label for b in at.get("download_button")}
    digest = open_cache(caches / "small.zarr").spec.weights.removeprefix("sha256:")[:8]
    assert sum(f"(weights {digest})" in c for c in texts(at.caption)) == 2  # which weights each side holds
    # each picker's choice in full under it: a half-width box cut the model and layer of a long name
    for key, name in (("compare.left", "small"), ("compare.right", "small_b4")):
        spec = open_cache(caches / f"{name}.zarr").spec
        full = at.selectbox(key=key).format_func(at.selectbox(key=key).value)
        assert full.startswith(f"{name} — {spec.model} · {spec.layer} · ") and full in texts(at.caption)
    # the window before the path, which a half-width table cuts
    assert list(left.columns)[-2:] == ["window", "path"] and list(right.columns)[-2:] == ["window", "path"]


def test_compare_searches_the_same_part_of_the_image_where_the_right_model_crops_it_otherwise(
    app, caches, tmp_path
):
    """The right side searched the left view's paint as it was: with Lite0 (256 → 224) on the left and a
    timm ResNet (235 → 224) on the right, another part of the image (a trial of an edited-model study)."""
    from vfs.masks import grid_mask
    from vfs.search import search_regions

    out = tmp_path / "r18.zarr"
    build_cache(
        BuildJob(
            model="timm:resnet18?pretrained=false",
            layer="layer4",
            data=EMBEDDED_DATASET,
            out=str(out),
            limit=SMALL,
        )
    )
    at = page(app, "compare")
    at.session_state["vfs.opened"] = [str(out)]  # as the Home page opens one
    at = use_cache(at.run(), "compare.left", caches, "small")
    at = no_exceptions(draw(use_cache(at, "compare.right", tmp_path, "r18")))
    left, right = open_cache(caches / "small.zarr"), open_cache(out)
    assert (left.spec.preprocess.resize_size, right.spec.preprocess.resize_size) == (256, 235)
    index = at.number_input(key="compare.index").value
    paint = box_paint()

    def scores(cache, drawn):
        mask = grid_mask(drawn, cache.spec.grid)
        return search_regions(cache, index, mask, exclude=index, all_exact=True).top["score"].to_numpy()

    placed = left.spec.preprocess.reframe(paint, right.spec.preprocess, left.image_size(index))
    np.testing.assert_allclose(at.dataframe[0].value["score"], scores(left, paint), rtol=0, atol=1e-6)
    np.testing.assert_allclose(at.dataframe[1].value["score"], scores(right, placed), rtol=0, atol=1e-6)
    assert not np.allclose(at.dataframe[1].value["score"], scores(right, paint), rtol=0, atol=1e-6)
    # each side's region file, as on its view: the CLI's --mask gives that side's search exactly (the
    # one file painted on the image, at the image's 64 px, moved edge weights by 0.03 and swapped ranks)
    from vfs.masks import load_mask
    from vfs.render import region_mask_png

    labels = [b.label for b in at.get("download_button")]
    assert {
        "Download the left side's region (PNG mask)",
        "Download the right side's region (PNG mask)",
    } <= set(labels) and "Download region (PNG mask)" not in labels
    for cache, drawn, shown in ((left, paint, at.dataframe[0]), (right, placed, at.dataframe[1])):
        (tmp_path / "region.png").write_bytes(region_mask_png(drawn))  # what the side's button gives
        cli = load_mask(
            tmp_path / "region.png", cache.spec.grid, cache.spec.preprocess.painted_on(lambda: None)
        )
        np.testing.assert_array_equal(cli, grid_mask(drawn, cache.spec.grid))
        again = search_regions(cache, index, cli, exclude=index, all_exact=True).top
        assert list(again["index"]) == list(shown.value["index"])
        np.testing.assert_array_equal(again["score"].to_numpy(), shown.value["score"].to_numpy())
    shown = [e.label for e in at.expander]  # where the region lies on each side's cells, to look at
    assert shown.count("The region on this side's cells") == 2
    from vfs.render import mask_summary

    captions = [c for image in at.image for c in image.captions]
    for mask in (grid_mask(paint, left.spec.grid), grid_mask(placed, right.spec.grid)):
        assert any(c.startswith(mask_summary(mask)) for c in captions), (mask_summary(mask), captions)


def test_compare_opens_with_a_cache_of_the_same_images_on_the_right(app, caches):
    """The Search page's cache on the left; on the right not the first other cache listed (findings,
    other images: refused) but one of the same images (helper review)."""
    at = use_cache(page(app, "search"), "search.cache", caches, "small")
    at = page(at, "compare")
    assert at.selectbox(key="compare.left").value == str(caches / "small.zarr")
    assert at.selectbox(key="compare.right").value == str(caches / "small_b4.zarr")
    assert not any("cannot be compared" in t for t in texts(at.error))


def test_compare_pairs_its_caches_when_opened_and_when_the_left_changes(app, caches):
    """Opened first, Compare showed the first listed cache (findings, paired with none) and an
    error; choosing another left cache kept the right one, refused or the same (helper trial)."""
    at = page(app, "compare")
    assert at.selectbox(key="compare.left").value == str(caches / "small.zarr")
    assert at.selectbox(key="compare.right").value == str(caches / "small_b4.zarr")
    assert not texts(at.error) and not texts(at.warning)
    at = use_cache(at, "compare.left", caches, "small_b4")
    assert at.selectbox(key="compare.right").value == str(caches / "small.zarr")
    assert not texts(at.error) and not texts(at.warning)
    at = use_cache(at, "compare.right", caches, "findings")  # the user's own choice stays…
    assert at.selectbox(key="compare.right").value == str(caches / "findings.zarr")
    at = use_cache(at, "compare.left", caches, "small")  # …until the left changes
    assert at.selectbox(key="compare.right").value == str(caches / "small_b4.zarr")


def test_a_damaged_cache_among_the_listed_ones_leaves_compare_usable(caches, tmp_path, monkeypatch):
    """Pairing the caches read each one's manifest outside the guard: one cache that lost a manifest
    column crashed the whole Compare page, healthy caches too (new-user review)."""
    for name in ("small", "small_b4"):
        shutil.copytree(caches / f"{name}.zarr", tmp_path / f"{name}.zarr")
    shutil.copytree(caches / "small.zarr", tmp_path / "a_damaged.zarr")  # listed first
    shutil.rmtree(tmp_path / "a_damaged.zarr" / "manifest" / "label")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "compare")
    no_exceptions(at)
    assert at.selectbox(key="compare.left").value == str(tmp_path / "small.zarr")
    assert at.selectbox(key="compare.right").value == str(tmp_path / "small_b4.zarr")
    at = use_cache(at, "compare.left", tmp_path, "a_damaged")  # picked, it says why
    no_exceptions(at)
    assert any("damaged" in t and "'label'" in t for t in texts(at.error)), texts(at.error)


def test_compare_refuses_caches_of_different_datasets(app, caches):
    at = use_cache(page(app, "compare"), "compare.left", caches, "small")
    at = use_cache(at, "compare.right", caches, "findings")
    assert any("cannot be compared:" in t and "differently named datasets" in t for t in texts(at.error))


# --- Build ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,key", [("build", "build.limit"), ("build", "build.size"), ("search", "search.per_domain")]
)
def test_an_optional_number_cleared_means_none_again(app, caches, name, key):
    """Cleared in the browser, a field falls back to its default: that must be None ('all images',
    'the model's own', 'no limit'), not the minimum (1 image; 32 px) it fell back to."""
    at = use_cache(page(app, name), "search.cache", caches, "small") if name == "search" else page(app, name)
    at.number_input(key=key).set_value(64).run()
    field = at.number_input(key=key)
    assert field.value == 64 and not field.proto.HasField("default"), field.proto.default
    field.set_value(None).run()
    assert no_exceptions(at).number_input(key=key).value is None


def test_build_page_lists_the_models_real_layers(app):
    at = page(app, "build")
    layers = at.selectbox(key="build.layer")
    assert layers.value == "blocks.5" and "blocks.5 — 7×7 grid, 192 channels (= blocks.5.3)" in layers.options
    assert "conv_head — 7×7 grid, 1280 channels" in layers.options
    at.number_input(key="build.size").set_value(448).run()
    assert "blocks.5 — 14×14 grid, 192 channels (= blocks.5.3)" in at.selectbox(key="build.layer").options
    assert (
        at.selectbox(key="build.label").value == "label"
        and at.selectbox(key="build.domain").value == "source"
    )


def test_build_page_detects_the_columns_of_each_dataset_anew(app, findings_manifest):
    """A column picked for one dataset is kept while it is shown (other pages visited), but another
    dataset gets its own detected columns: the domain column of the demo set came back "(none)"
    after a dataset without one, and the cache was built without domains."""
    at = page(app, "build")
    at.selectbox(key="build.domain").set_value("(none)").run()
    assert at.selectbox(key="build.domain").value == "(none)"  # the user's choice, kept on reruns
    at.radio(key="build.source").set_value("Image folder").run()
    at.text_input(key="build.folder").set_value(str(findings_manifest.parent / "images")).run()
    assert at.selectbox(key="build.domain").value == "(none)"
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    at.text_input(key="build.manifest").set_value(str(findings_manifest)).run()
    assert (at.selectbox(key="build.label").value, at.selectbox(key="build.domain").value) == (
        "label",
        "(none)",
    )
    at.selectbox(key="build.label").set_value("view").run()
    at.radio(key="build.source").set_value("Embedded demo (scikit-image)").run()
    assert (at.selectbox(key="build.label").value, at.selectbox(key="build.domain").value) == (
        "label",
        "source",
    )
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    assert at.selectbox(key="build.label").value == "label"  # detected again, not the earlier pick


def test_build_page_says_a_model_made_for_non_square_input_runs_square(app):
    at = page(app, "build")
    at.selectbox(key="build.model").set_value("Another model (type its spec)").run()
    at.text_input(key="build.spec").set_value("timm:resnet18?pretrained=false").run()
    at.number_input(key="build.size").set_value(32).run()  # (a 768-px listing of a ViT-B takes seconds)
    at.text_input(key="build.spec").set_value("timm:vit_base_patch16_sapiens2.fb?pretrained=false").run()
    assert any("made for 1024×768 px input" in t for t in texts(at.info)), texts(at.info)
    at.text_input(key="build.spec").set_value("timm:resnet18?pretrained=false").run()
    assert not any("made for" in t for t in texts(at.info))


def test_build_page_refuses_names_that_leave_the_caches_folder(app):
    at = page(app, "build")
    at.text_input(key="build.name").set_value("../elsewhere").run()
    assert any("no folder separators" in t for t in texts(at.error))


def test_build_page_builds_a_manifest_dataset_in_the_background(findings_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    at.text_input(key="build.manifest").set_value(str(findings_manifest)).run()
    assert at.selectbox(key="build.label").options == ["(none)", "label", "view"]
    at.selectbox(key="build.domain").set_value("view")
    at.text_input(key="build.name").set_value("ui_built").run()
    no_exceptions(at.button(key="build.start").click().run())
    wait_until(
        lambda: (tmp_path / "ui_built.zarr").exists() and open_cache(tmp_path / "ui_built.zarr").complete
    )
    at.run()
    assert any("A complete cache called ui_built exists" in t for t in texts(at.warning))
    assert any("ui_built: complete with 6 images (this run took" in t for t in texts(at.success))
    cache = open_cache(tmp_path / "ui_built.zarr")
    assert cache.domain_col == "view" and cache.label_col == "label"
    at.selectbox(key="build.label").set_value("(none)")
    at.selectbox(key="build.domain").set_value("(none)")
    at.text_input(key="build.name").set_value("ui_unlabelled").run()
    no_exceptions(at.button(key="build.start").click().run())
    done = tmp_path / "ui_unlabelled.zarr"
    wait_until(lambda: done.exists() and open_cache(done).complete)
    assert (open_cache(done).label_col, open_cache(done).domain_col) == (None, None)  # as the page showed


def test_build_page_runs_the_device_batch_size_and_workers_chosen(findings_manifest, tmp_path, monkeypatch):
    """The Build page ran every build with 32 images a batch, decoding in the build's own thread and on
    the device `auto` found: a GPU box's user could not give decoding more processes (what limits a
    GPU build) from the page, as `--workers` does (review of the left-undone list)."""
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    assert at.selectbox(key="build.device").options[:2] == ["auto", "cpu"]
    batch_size, workers = at.number_input(key="build.batch_size"), at.number_input(key="build.workers")
    assert (batch_size.value, workers.value) == (32, 0)
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    at.text_input(key="build.manifest").set_value(str(findings_manifest)).run()
    at.selectbox(key="build.device").set_value("cpu")
    at.number_input(key="build.batch_size").set_value(4)
    at.number_input(key="build.workers").set_value(1)
    at.text_input(key="build.name").set_value("tuned").run()
    no_exceptions(at.button(key="build.start").click().run())
    done = tmp_path / "tuned.zarr"
    wait_until(lambda: done.exists() and open_cache(done, allow_partial=True).complete)
    job = open_cache(done).attrs["job"]
    assert (job["device"], job["batch_size"], job["workers"]) == ("cpu", 4, 1)
    assert open_cache(done).n == 6


def test_a_refused_build_stays_said_until_the_next_start(findings_manifest, tmp_path, monkeypatch):
    """A second user's Build click on an output another's build was writing was refused in words
    that the build panel's next second took away, leaving the other build's progress shown as if
    it were theirs (soak review)."""
    import ui.core

    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    at.text_input(key="build.manifest").set_value(str(findings_manifest)).run()
    at.text_input(key="build.name").set_value("dup").run()
    other = BuildJob(layer="blocks.5", data=EMBEDDED_DATASET, out=str(tmp_path / "dup.zarr"), batch_size=1)
    running = ui.core.build_registry().start(other)  # another user's, started meanwhile
    try:
        at = no_exceptions(at.button(key="build.start").click().run())
        assert any("already being built" in t for t in texts(at.error))
        for _ in range(2):  # the panel's reruns
            assert any("already being built" in t for t in texts(no_exceptions(at.run()).error))
    finally:
        running.cancel()
        running.wait(60)
    assert not any("already being built" in t for t in texts(no_exceptions(at.run()).error))  # it ended


def test_the_build_page_names_the_images_it_skipped_and_why(findings_manifest, tmp_path, monkeypatch):
    """As the CLI prints them: after the build, and for the cache picked under Manage a cache."""
    import pandas as pd

    table = pd.read_csv(findings_manifest)
    table.loc[len(table)] = {**table.iloc[0].to_dict(), "path": "no_such_image.png"}
    manifest = findings_manifest.with_name("with_a_missing_file.csv")
    table.to_csv(manifest, index=False)
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    at.text_input(key="build.manifest").set_value(str(manifest)).run()
    at.text_input(key="build.name").set_value("gappy").run()
    no_exceptions(at.button(key="build.start").click().run())
    wait_until(lambda: (tmp_path / "gappy.zarr").exists() and open_cache(tmp_path / "gappy.zarr").complete)
    at.run()
    assert any("complete with 6 images, 1 unreadable images skipped" in t for t in texts(at.success))
    listed = [d.value for d in at.dataframe if "reason" in d.value.columns]  # (AppTest shows no keys)
    assert len(listed) == 2  # after the build, and under Manage a cache
    for table in listed:
        assert table["path"].tolist() == ["no_such_image.png"]
        assert "cannot read file" in table["reason"].iloc[0]
    assert [e.label for e in at.expander].count("The 1 skipped image and why") == 2


def test_a_partial_cache_resumes_as_it_was_started_whatever_the_page_shows(tmp_path, monkeypatch):
    """Resume build ran the page's settings, which the cache refused — and its button under the error
    ran them again (helper review). It now continues the cache as recorded, and says where the page's
    settings differ."""
    stop = threading.Event()
    started = BuildJob(
        layer="blocks.4", data=EMBEDDED_DATASET, out=str(tmp_path / "halfway.zarr"), limit=12, batch_size=4
    )
    assert build_cache(replace(started, chunk_images=4), progress=lambda p: stop.set(), cancel=stop) is None
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.text_input(key="build.name").set_value("halfway").run()
    assert at.selectbox(key="build.layer").value == "blocks.5"
    (note,) = [t for t in texts(at.info) if "A partial cache called halfway exists" in t]
    assert "layer blocks.4, not blocks.5" in note and "limit 12, not all images" in note  # as the form says
    assert "choose another name" in note
    no_exceptions(at.button(key="build.start").click().run())
    wait_until(lambda: open_cache(tmp_path / "halfway.zarr", allow_partial=True).complete)
    done = open_cache(tmp_path / "halfway.zarr")
    assert done.spec.layer == "blocks.4" and done.n == 12


def test_a_partial_cache_started_on_a_gpu_resumes_here_on_the_device_chosen(tmp_path, monkeypatch):
    """A cache started on a GPU box records device cuda: Resume build failed here ("device 'cuda' is
    not available"), and the note told the user to choose another name (diff review)."""
    import zarr

    stop = threading.Event()
    started = BuildJob(
        layer="blocks.5", data=EMBEDDED_DATASET, out=str(tmp_path / "gpu.zarr"), limit=12, batch_size=4
    )
    assert build_cache(replace(started, chunk_images=4), progress=lambda p: stop.set(), cancel=stop) is None
    group = zarr.open_group(tmp_path / "gpu.zarr", mode="r+")
    group.attrs["job"] = dict(group.attrs["job"]) | {"device": "cuda", "workers": 8}
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.number_input(key="build.limit").set_value(12)
    at.number_input(key="build.batch_size").set_value(4)
    at.text_input(key="build.name").set_value("gpu").run()
    (note,) = [t for t in texts(at.info) if "A partial cache called gpu exists" in t]
    assert (
        "choose another name" not in note
        and "Device and workers are the ones chosen under Performance" in note
    )
    no_exceptions(at.button(key="build.start").click().run())
    wait_until(lambda: open_cache(tmp_path / "gpu.zarr", allow_partial=True).complete)
    assert open_cache(tmp_path / "gpu.zarr").n == 12


def test_a_partial_cache_another_process_is_building_offers_no_resume(tmp_path, monkeypatch):
    """A CLI build writing the cache: the page offered Resume build (twice), which failed on the lock
    and then kept saying "a resume goes on from there" with a Resume button after the CLI's build had
    completed the cache (Build review)."""
    from vfs.cache import BuildLock

    stop = threading.Event()
    job = BuildJob(
        layer="blocks.5", data=EMBEDDED_DATASET, out=str(tmp_path / "busy.zarr"), limit=8, batch_size=4
    )
    assert build_cache(replace(job, chunk_images=4), progress=lambda p: stop.set(), cancel=stop) is None
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    with BuildLock(job.out):  # as `python -m vfs build` holds it while it writes
        at = page(start_app(), "build")
        at.text_input(key="build.name").set_value("busy").run()
        (note,) = [t for t in texts(at.info) if "A partial cache called busy" in t]
        assert "is being built by another process" in note and "another build is writing" in note
        assert "build.start" not in {b.key for b in at.button}
        at.selectbox(key="build.manage").set_value("busy").run()
        assert "build.resume" not in {b.key for b in at.button}
        assert at.button(key="build.delete").disabled
    assert build_cache(job) is not None  # the other process finishes it
    at.run()
    assert not any("A partial cache called busy" in t for t in texts(at.info))
    assert any("A complete cache called busy exists" in t for t in texts(at.warning))


def test_a_partial_cache_of_a_moved_dataset_resumes_from_where_the_page_points(
    findings_manifest, tmp_path, monkeypatch
):
    """The recorded dataset is gone (moved): the resume reads it where the page's manifest is."""
    shutil.copytree(findings_manifest.parent, tmp_path / "before")
    manifest = tmp_path / "before" / findings_manifest.name
    stop = threading.Event()
    started = BuildJob(layer="blocks.5", data=str(manifest), out=str(tmp_path / "moved.zarr"), batch_size=2)
    assert build_cache(replace(started, chunk_images=2), progress=lambda p: stop.set(), cancel=stop) is None
    (tmp_path / "before").rename(tmp_path / "after")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.radio(key="build.source").set_value("Manifest (CSV / Parquet)").run()
    at.text_input(key="build.manifest").set_value(str(tmp_path / "after" / manifest.name)).run()
    at.text_input(key="build.name").set_value("moved").run()
    assert not any("dataset" in t for t in texts(at.info))  # the page's is the one it will read
    no_exceptions(at.button(key="build.start").click().run())
    wait_until(lambda: open_cache(tmp_path / "moved.zarr", allow_partial=True).complete)
    assert open_cache(tmp_path / "moved.zarr").n == 6


def test_delete_asks_first(caches, tmp_path, monkeypatch):
    shutil.copytree(caches / "findings.zarr", tmp_path / "doomed.zarr")
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    at = page(start_app(), "build")
    at.button(key="build.delete").click().run()
    assert any("Delete the cache doomed" in t for t in texts(at.warning))
    at.button(key="build.delete_no").click().run()
    assert (tmp_path / "doomed.zarr").exists() and not any("Delete the cache" in t for t in texts(at.warning))
    at.button(key="build.delete").click().run()
    no_exceptions(at.button(key="build.delete_yes").click().run())
    assert not (tmp_path / "doomed.zarr").exists() and any("No caches" in t for t in texts(at.info))


# --- Hosted ---------------------------------------------------------------------------------------
def test_hosted_mode_hides_building_and_opening_paths_but_searches(caches, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    monkeypatch.setenv("VFS_HOSTED", "1")
    at = no_exceptions(start_app())
    assert not [b for b in at.button if b.key == "home.demo"] and not at.text_input
    with pytest.raises(ValueError):
        at.switch_page("app_pages/build.py")
    at = no_exceptions(draw(use_cache(page(at, "search"), "search.cache", caches, "small")))
    assert len(at.dataframe[0].value) == 10


def test_hosted_home_says_which_caches_it_offers_and_how_they_were_built(caches, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    monkeypatch.setenv("VFS_HOSTED", "1")
    at = no_exceptions(start_app())
    steps = at.markdown[1].value
    assert "Build" not in steps and steps.startswith("1. **Search** a cache this server offers")
    assert at.header[0].value == "Caches this server offers"
    assert list(at.dataframe[0].value["cache"]) == ["findings", "small", "small_b4"]
    built = next(m.value for m in at.markdown if m.value.startswith("How they were built")).split("\n- ")[1:]
    assert [b.split("**")[1].replace("\\_", "_") for b in built] == ["findings", "small", "small_b4"]
    small = built[1]
    for fact in (
        "`embedded:efficientnet_lite0` at layer `blocks.5` (7×7 cells × 192 channels)",
        "over `embedded:skimage`",
        "centre-cropped to 224 px",
        f"; {SMALL} images;",
        "domains from column `source`",
        "built on 20",
        "torch ",
    ):
        assert fact in small, (fact, small)
    assert "; 6 images;" in built[0] and "domains from column `view`" in built[0]
    assert "layer `blocks.4` (14×14 cells × 112 channels)" in built[2]


def test_a_hosted_server_shows_visitors_no_traceback(caches, monkeypatch):
    """Streamlit's default showed an unforeseen error's traceback, the server's paths in it, to every
    visitor (hosted review): a hosted server shows a generic message and logs the traceback."""
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    monkeypatch.setenv("VFS_HOSTED", "1")
    no_exceptions(start_app())
    assert st.get_option("client.showErrorDetails") == "none"
    monkeypatch.delenv("VFS_HOSTED")
    no_exceptions(start_app())
    assert st.get_option("client.showErrorDetails") == "full"


def test_hosted_mode_searches_a_remote_cache_read_only(caches, tmp_path, monkeypatch):
    from cachehelpers import served

    with served(caches) as base:
        url = f"{base}/small.zarr"
        monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("VFS_HOSTED", "1")
        monkeypatch.setenv("VFS_REMOTE_CACHES", url)
        at = no_exceptions(start_app())
        assert list(at.dataframe[0].value["location"]) == [url]
        at = page(at, "search")
        assert at.selectbox(key="search.cache").value == url
        at = no_exceptions(draw(at))
        assert len(at.dataframe[0].value) == 10


def test_a_remote_cache_rebuilt_behind_its_url_is_searched_anew(caches, tmp_path, monkeypatch):
    """A URL's cache was opened once per server (its stamp was 0 for good): rebuilt behind its URL,
    every session searched the old one's features, in memory (review)."""
    from cachehelpers import served

    monkeypatch.setattr("ui.core.REMOTE_CHECK_S", 0.0)
    monkeypatch.setattr("ui.core.REMOTE_WAIT_S", 60.0)  # the answer in the same run
    shutil.copytree(caches / "small.zarr", tmp_path / "served" / "c.zarr")
    with served(tmp_path / "served") as base:
        monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("VFS_REMOTE_CACHES", f"{base}/c.zarr")
        at = no_exceptions(draw(page(start_app(), "search")))
        assert len(at.dataframe[0].value) == 10
        shutil.rmtree(tmp_path / "served" / "c.zarr")  # rebuilt: another dataset of 6 images, same grid
        shutil.copytree(caches / "findings.zarr", tmp_path / "served" / "c.zarr")
        at = no_exceptions(draw(page(start_app(), "search")))
        assert len(at.dataframe[0].value) == 5  # the 6 images but the query


def test_a_remote_server_that_hangs_holds_no_page_run(caches, tmp_path, monkeypatch):
    """The app asked a URL's cache whether it was replaced in the page's own run: a server that hung
    held every run for its 60 s timeout, though the features were in memory (review). The question
    waits in the background; the answer, once it comes, is taken by a later run."""
    from cachehelpers import served

    monkeypatch.setattr("ui.core.REMOTE_CHECK_S", 0.0)
    shutil.copytree(caches / "small.zarr", tmp_path / "served" / "c.zarr")
    stalled = threading.Event()
    with served(tmp_path / "served", stalled) as base:
        monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("VFS_REMOTE_CACHES", f"{base}/c.zarr")
        first = no_exceptions(draw(page(start_app(), "search"))).dataframe[0].value
        assert len(first) == 10
        stalled.set()
        shutil.rmtree(tmp_path / "served" / "c.zarr")  # rebuilt: another dataset of 6 images, same grid
        shutil.copytree(caches / "findings.zarr", tmp_path / "served" / "c.zarr")
        try:
            started = time.monotonic()
            at = no_exceptions(draw(page(start_app(), "search")))
            assert time.monotonic() - started < 10
            assert at.dataframe[0].value.equals(first)  # the cache in memory, as it was
        finally:
            stalled.clear()
        wait_until(lambda: not [t for t in threading.enumerate() if t.name == "vfs-replaced"], 30)
        assert len(no_exceptions(draw(page(start_app(), "search"))).dataframe[0].value) == 5


def test_a_remote_cache_opened_as_it_is_found_replaced_is_not_kept_twice(caches, tmp_path, monkeypatch):
    """A run that read a URL's stamp just before another found its cache replaced opened the new
    cache under the old stamp: a second copy of its rows, held until evicted (review)."""
    from cachehelpers import served

    import ui.core

    opened = []
    monkeypatch.setattr(
        ui.core, "open_cache", lambda location: opened.append(location) or open_cache(location)
    )
    shutil.copytree(caches / "small.zarr", tmp_path / "c.zarr")
    with served(tmp_path) as base:
        url = f"{base}/c.zarr"
        ui.core._url_generations[url] = 1  # found replaced by another session
        monkeypatch.setattr(ui.core, "_stamp", lambda location: 0)  # as read before that
        assert ui.core.get_cache(url).n == SMALL and len(opened) == 1
        ui.core.get_cache(url)
        assert len(opened) == 2  # not kept under stamp 0: opened again, as the next run opens stamp 1


def test_builds_can_be_switched_off(caches, monkeypatch):
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    monkeypatch.setenv("VFS_ALLOW_BUILD", "0")
    at = no_exceptions(start_app())
    assert not [b for b in at.button if b.key == "home.demo"]
    with pytest.raises(ValueError):
        at.switch_page("app_pages/build.py")


def test_hosted_mode_refuses_a_cache_whose_model_runs_user_code(caches, tmp_path, monkeypatch):
    shutil.copytree(caches / "small.zarr", tmp_path / "evil.zarr")
    group = zarr.open_group(str(tmp_path / "evil.zarr"), mode="r+")
    group.attrs["spec"] = group.attrs["spec"] | {"model": "python:os:getcwd"}
    monkeypatch.setenv("VFS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VFS_HOSTED", "1")
    at = page(start_app(), "search")
    at.radio(key="search.from").set_value("Upload").run()
    no_exceptions(at.file_uploader(key="search.upload").set_value(("q.png", png(), "image/png")).run())
    assert any("python: model specs run arbitrary code" in t for t in texts(at.error))  # said on upload
    assert not at.get("bidi_component")  # no canvas to draw a region the model cannot search


def test_malformed_settings_are_shown(monkeypatch, caches):
    monkeypatch.setenv("VFS_CACHE_DIR", str(caches))
    monkeypatch.setenv("VFS_HOSTED", "perhaps")
    at = no_exceptions(start_app())
    assert any("VFS_HOSTED" in t for t in texts(at.error))
