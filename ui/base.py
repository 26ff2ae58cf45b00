"""The light part of the glue: settings, errors shown to the user, session state that survives pages.

Nothing here imports PyTorch (nor the engine): `app.py` and each page's first lines use only this
module, so a freshly started server draws its navigation and the page's title at once, while the
engine loads (several seconds, once per server process) under `loading()`.
"""

from __future__ import annotations

import gc
import re
import string
import sys
import threading
from collections.abc import Callable, Container, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import streamlit as st

from vfs.settings import Settings

T = TypeVar("T")


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a failure the user can act on (bad input, missing file, no internet) as a message, not a
    traceback, and stop the page there (CacheError, ImageError, ModelUnavailable, LayerError, … are
    ValueErrors, RuntimeErrors or OSErrors)."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        layers = sys.modules.get("vfs.models.layers")  # a LayerError comes from there, once it is loaded
        # its words as written: an error quotes paths, labels and a cache's attributes, anyone's text
        if layers is not None and isinstance(e, layers.LayerError):  # names the page's layer list
            st.error(as_written(e.message("the Build page's layer list")))
        else:
            st.error(as_written(str(e) or type(e).__name__))
        st.stop()


_MARKDOWN = re.compile(f"([{re.escape(string.punctuation)}])")


def as_written(text: object) -> str:
    """`text` as it reads where a page renders markdown (captions, headers, image captions): every
    ASCII punctuation character escaped, as CommonMark allows, and its whitespace one space. A
    manifest's labels and paths and a cache's recorded names are their author's text: a `[link](…)`,
    `![…](…)`, `**`, `$…$` or `:red[…]` in one rendered as such (a link and a remote image on a hosted
    server's pages). A URL in the text is still a link to itself, showing itself (GFM's autolinks
    read the text as escaped)."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


_INLINE_MARKDOWN = re.compile(r"([\\`*_~\[\]<>&$:])")


def in_label(text: object) -> str:
    """`text` within a widget's label, after its first words: only what markdown reads inline
    there escaped (emphasis, code, links and images, HTML, entities, LaTeX, Streamlit's `:…:`
    directives), its whitespace one space. The label is also the widget's accessible name, as
    given: a screen reader read `as_written`'s every backslash ("finding\\/label": app review)."""
    return _INLINE_MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


def settings() -> Settings:
    """This instance's settings, read on every run (cheap) so a changed environment applies at once."""
    with user_errors():
        return Settings.from_env()


_frozen = {"modules": 0}
_freezing = threading.Lock()


@contextmanager
def loading() -> Iterator[None]:
    """Around a page's imports of the engine: on the first page a fresh server shows, they load
    PyTorch (seconds); the page's title is already on screen, and this says what is happening.

    Whenever these imports brought new modules, the objects that exist then (above all the modules'
    functions, classes and tables: millions with PyTorch, pandas and plotly, alive as long as the
    server) are moved out of the garbage collector's reach (`gc.freeze`). Streamlit collects garbage
    fully after every run (`runner.postScriptGC`): walking them took ≈ 0.3 s on two cores, holding
    back the run's last messages (a stroke's results); it now walks what runs made, ≈ 1 ms. Frozen
    objects are still freed when no reference is left; only reference cycles among them stay.
    """
    with st.spinner("Loading PyTorch and the search engine (once, after the server starts)…"):
        yield
    with _freezing:
        if len(sys.modules) > _frozen["modules"]:  # a handful of times per server: new pages' imports
            _frozen["modules"] = len(sys.modules)
            gc.freeze()


def bind(
    key: str,
    default: Any,
    shared: str | None = None,
    options: Container | None = None,
    context: Hashable = None,
) -> str:
    """Key for a widget whose value survives visits to other pages.

    Streamlit drops a widget's state when its page is left; the value is also kept under `shared`
    (a session value several pages' widgets show, e.g. the current cache) or a private name. With
    `context` (e.g. the dataset a column was picked from), a value is kept only while its context
    is the same: for another one the widget shows `default` again.
    """
    store = kept_key(key, shared)
    value = st.session_state[key] if key in st.session_state else st.session_state.get(store, default)
    if (options is not None and value not in options) or st.session_state.get(
        f"vfs.context.{key}", context
    ) != context:
        value = default
    st.session_state[key] = st.session_state[store] = value
    st.session_state[f"vfs.context.{key}"] = context
    return key


def kept_key(key: str, shared: str | None = None) -> str:
    """Where `bind` keeps a widget's value between pages: `shared`, or a private name of its own."""
    return shared or f"vfs.kept.{key}"


def memo(name: str, key: object, compute: Callable[[], T]) -> T:
    """The value last computed under `name`, recomputed only when `key` changes (compared with ==; one
    slot per name)."""
    slot = st.session_state.get(f"vfs.memo.{name}")
    if slot is None or slot[0] != key:
        slot = (key, compute())
        st.session_state[f"vfs.memo.{name}"] = slot
    return slot[1]
