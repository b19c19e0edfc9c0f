"""The live server: the analysis library over HTTP for the browser app (see :func:`serve`)."""

from headscope.server.app import create_app
from headscope.server.serve import ServerHandle, serve

__all__ = ["ServerHandle", "create_app", "serve"]
