"""The run directory: atomic writers and the reader (``open_run``)."""

from headscope.store.run import Run, RunError, open_run

__all__ = ["Run", "RunError", "open_run"]
