"""headscope: what every attention head of a transformer language model does, across a dataset.

``open_run(RUN)`` reads a precomputed run; ``serve(...)`` starts the local server and returns a
handle with ``.stop()``; ``show(RUN, head=...)`` shows the app inline in Jupyter.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_run", "serve", "show"]


def open_run(path):
    """Open a complete run directory (see ``headscope.store.Run``)."""
    from headscope.store import open_run as _open

    return _open(path)


def __getattr__(name: str) -> Any:
    # serve/show pull in the server stack; import them only when asked for.
    if name == "serve":
        from headscope.server.serve import serve

        return serve
    if name == "show":
        from headscope.server.notebook import show

        return show
    raise AttributeError(name)
