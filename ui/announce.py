"""A line said to screen readers when it changes (a live region): new results after a stroke, which
otherwise come silently. A component, so that one element persists from rerun to rerun and only its
text changes — a live region made anew with its text already in it is not read out: a page calls it
once a run, in one place (an `st.empty`), with or without results to say."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import vfs

_announcer = st.components.v2.component(
    "vfs.announce",
    js="""
export default function ({ data, parentElement }) {
  let line = parentElement.querySelector(".vfs-said");
  if (!line) {
    line = document.createElement("div");
    line.className = "vfs-said"; // painter.css: read, not shown
    line.setAttribute("role", "status");
    parentElement.appendChild(line);
  }
  if (line.textContent !== data.text) line.textContent = data.text;
}
""",
    css=(Path(vfs.__file__).parent / "notebook" / "painter.css").read_text(),
)


def announce(text: str) -> None:
    """Say `text` (once per change) to a screen reader."""
    _announcer(key="vfs.announce", data={"text": text})
