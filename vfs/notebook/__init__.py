"""Paint and search inside Jupyter: the engine's exact region search behind an anywidget.

`SearchWidget(cache, query=...)` shows the query as the model saw it; each stroke goes to Python,
which runs `vfs.search_regions` and shows the ranked matches. `distribution_figure` draws the
Distributions page's plot for a result. Needs `anywidget` (requirements-notebook.txt); the rest
of `vfs` does not.
"""

from .distributions import distribution_figure, distribution_table
from .widget import SearchWidget

__all__ = ["SearchWidget", "distribution_figure", "distribution_table"]
