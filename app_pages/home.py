"""Home: what the tool does, the caches there are, and the one-click demo cache for a fresh install (or, on a
server that builds nothing, how the caches it offers were built)."""

from pathlib import Path

import streamlit as st

from ui.base import loading, settings

st.title("Visual Feature Search")
st.markdown("""
See what a vision model thinks is similar, **region by region**. Paint over part of an image (a face,
a wheel, the heart on a chest X-ray) and every image of a dataset is ranked by the cosine similarity
between the model's features under your paint and the best-matching window of that image, at one
layer of the network.
""")

s = settings()
build_step = ["**Build** a feature cache: one layer of one model over a dataset, computed once."]
steps = [
    *(build_step if s.allow_build else []),
    f"**Search**{'' if s.allow_build else ' a cache this server offers (below)'}: pick a query image, "
    "paint a region, see the top matches with their windows outlined.",
    "**Distributions**: every image's best score grouped by a label: does the region tell the groups apart?",
    "**Compare**: the same query in two caches of one dataset (two models, two layers, two checkpoints).",
]
st.markdown("\n".join(f"{n}. {step}" for n, step in enumerate(steps, 1)))

with loading():  # the text above is on screen while a fresh server loads PyTorch
    from ui.core import CACHE, DEMO_JOB, OPENED, build_registry, cache_rows, get_cache, user_errors
    from ui.views import build_panel, cache_provenance, cache_table, start_build
    from vfs.cache import CacheError
    from vfs.jobs import BuildJob
    from vfs.settings import is_url

rows = cache_rows()
demo = s.cache_path("demo")
demo_row = next((r for r in rows if Path(r["path"]) == demo), None)
demo_build = build_registry().get(demo)
if (
    s.allow_build
    and not (demo_row and demo_row["complete"])
    and not (demo_build and demo_build.status().running)
):
    st.button(
        "Build the demo cache" if demo_row is None else "Resume building the demo cache",
        type="primary",
        key="home.demo",
        on_click=start_build,
        args=(BuildJob.from_toml(DEMO_JOB, out=str(demo)),),
    )
    st.caption(
        "EfficientNet-Lite0 (its weights ship with the installed package) on 213 scikit-image sample "
        "photos and faces, offline: 10–15 s on two idle CPU cores, 20–45 s on two busy ones."
    )
if s.allow_build:
    build_panel()

st.header("Caches" if s.allow_build else "Caches this server offers")
if rows:
    cache_table(rows)
    if not s.allow_build:  # visitors did not build these: say how they were made
        built = [f"- {cache_provenance(get_cache(r['path']))}" for r in rows if r["complete"]]
        st.markdown("\n".join(["How they were built, as each cache records it:", "", *built]))
    links = st.columns(4)
    links[0].page_link("app_pages/search.py", label="Search a cache", icon=":material/image_search:")
    links[1].page_link("app_pages/distributions.py", label="Score distributions", icon=":material/bar_chart:")
    links[2].page_link("app_pages/compare.py", label="Compare two caches", icon=":material/compare:")
else:
    st.info(
        f"No caches yet in {s.cache_dir}/."
        + (" Build the demo cache above to start." if s.allow_build else "")
    )

if not s.hosted:
    with st.form("home.open", border=False):
        location = st.text_input(
            "Open a cache by path or URL",
            key="home.location",
            placeholder="/data/caches/imagenet.zarr or https://example.org/caches/demo.zarr",
        )
        opened = st.form_submit_button("Open cache")
    typed = location.strip()
    if opened and typed:
        if not is_url(typed):
            typed = str(Path(typed).expanduser())
        with user_errors():
            if not is_url(typed) and not Path(typed).exists():  # a typo, not a cache gone since
                raise CacheError(f"no cache at {typed}: there is no such folder")
            get_cache(typed)
        st.session_state[OPENED] = [*st.session_state.get(OPENED, []), typed]
        st.session_state[CACHE] = typed
        st.rerun()
