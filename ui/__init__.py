"""Streamlit glue shared by the pages: cached resources, session state, the query drawer, result views.

Everything that computes lives in `vfs/`; this package only decides what is loaded once, what a
session remembers across pages, and how shared pieces of the pages look.
"""
