"""``headscope.show(RUN, head=...)``: the app inline in a Jupyter notebook.

Starts (once per run and model) a local server in a background thread and returns an object
whose HTML representation is an iframe on the requested view; no IPython import needed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from headscope.server.serve import ServerHandle, serve

_SERVERS: dict[tuple[str, str | None], ServerHandle] = {}


@dataclass(frozen=True)
class AppView:
    url: str
    height: int = 720

    def _repr_html_(self) -> str:
        src = html.escape(self.url, quote=True)
        return f'<iframe src="{src}" width="100%" height="{self.height}" style="border:1px solid #ddd"></iframe>'

    def __str__(self) -> str:
        return self.url


def show(
    run: str | Path,
    head: str | None = None,
    *,
    model: str | None = None,
    view: str | None = None,
    height: int = 720,
) -> AppView:
    """Show the run in the notebook: the head page of ``head``, or ``view`` (``custom``,
    ``sweep``, ``geometry``), or the head selector. ``model`` enables the live views."""
    key = (str(Path(run).resolve()), model)
    if key not in _SERVERS:
        _SERVERS[key] = serve(run, model)
    handle = _SERVERS[key]
    base = handle.browser_url if hasattr(handle, "browser_url") else handle.url
    fragment = f"#/head/{head}" if head else (f"#/{view}" if view else "")
    return AppView(base + fragment, height)


def stop_all() -> None:
    """Stop every server ``show`` started."""
    for handle in _SERVERS.values():
        handle.stop()
    _SERVERS.clear()
