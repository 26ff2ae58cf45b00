"""Paint and search inside Jupyter: the engine's exact region search behind an anywidget.

`SearchWidget(cache, query=...)` shows the query as the model saw it; each stroke goes to Python,
which runs `vfs.search_regions` and shows the ranked matches. `distribution_figure` draws the
Distributions page's plot for a result. `SearchWidget` needs `anywidget`
(requirements-notebook.txt), imported when first named; the distributions and the rest of `vfs`
do not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .distributions import distribution_figure, distribution_table
    from .widget import SearchWidget

_EXPORTS = {
    "SearchWidget": ".widget",
    "distribution_figure": ".distributions",
    "distribution_table": ".distributions",
}
__all__ = ["SearchWidget", "distribution_figure", "distribution_table"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vfs.notebook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
