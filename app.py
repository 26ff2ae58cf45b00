"""Visual Feature Search, the dashboard: `streamlit run app.py`.

Declares the pages; each page file in `app_pages/` reads top to bottom as what the user sees.
The folder is not called `pages/`: with a `pages/` folder Streamlit runs a deep link such as
/search on a fresh server as a stand-alone page (its old multipage mode) until some session has
run this script once. The Build page is left out where the settings switch building off (hosted).

Nothing here loads PyTorch: on a freshly started server the navigation and the page's first lines
show at once, and each page loads the engine after its title (`ui.base.loading`).
"""

import streamlit as st

from ui.base import settings

st.set_page_config(page_title="Visual Feature Search", page_icon="🔎", layout="wide")
# A public server's visitors get a generic message for an error the pages did not foresee; its
# traceback, which names the server's paths, goes to the server's log.
st.set_option("client.showErrorDetails", "none" if settings().hosted else "full")
# The keyboard's focus, seen on every control: Streamlit's own rings are faint (its navigation links
# 1.1:1 against the sidebar, a button's ring 1.9:1); this orange holds 5.2:1 on white.
st.html("<style>:focus-visible {outline: 2px solid #c2410c !important; outline-offset: 2px}</style>")

home = st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True)
build = st.Page("app_pages/build.py", title="Build", icon=":material/construction:", url_path="build")
search = st.Page("app_pages/search.py", title="Search", icon=":material/image_search:", url_path="search")
distributions = st.Page(
    "app_pages/distributions.py", title="Distributions", icon=":material/bar_chart:", url_path="distributions"
)
compare = st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:", url_path="compare")
st.navigation([home, *([build] if settings().allow_build else []), search, distributions, compare]).run()
