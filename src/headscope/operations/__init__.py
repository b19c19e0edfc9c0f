"""The live operations, declared once for the server and the CLI (see :mod:`.table`)."""

from headscope.operations.table import OPERATIONS, Context, Operation

__all__ = ["OPERATIONS", "Context", "Operation"]
