"""Start the live server in a background thread, from a notebook, a script or the CLI."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from headscope.limits import MAX_TOKENS

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from headscope.analysis.session import Session
    from headscope.dictionaries.basis import DictionarySet
    from headscope.model import ModelAdapter

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerHandle:
    """A running server. ``url`` ends in ``/``; ``browser_url`` carries the token when one is
    set. ``stop()`` shuts it down and frees the port; also a context manager."""

    url: str
    host: str
    port: int
    token: str | None
    app: FastAPI
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _sock: socket.socket = field(repr=False)

    @property
    def browser_url(self) -> str:
        return self.url + (f"?token={self.token}" if self.token else "")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def headers(self) -> dict[str, str]:
        """The headers an HTTP client needs (the Authorization header when a token is set)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, wait for the server thread and release the port."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._sock.close()
        self.app.state.queue.shutdown()
        self.app.state.cache_queue.shutdown()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _session(model: str | ModelAdapter | Session | None, max_tokens: int) -> Session | None:
    if model is None:
        return None
    from headscope.analysis.session import Session
    from headscope.model import ModelAdapter

    if isinstance(model, Session):
        return model
    if isinstance(model, ModelAdapter):
        return Session(model, max_tokens=max_tokens)
    return Session(ModelAdapter.load(str(model)), max_tokens=max_tokens)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections of
    # sockets that say so, and with Nagle on, every keep-alive response stalls ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def _wait_until_answers(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not handle._server.started:
        if not handle._thread.is_alive():
            raise RuntimeError("the server thread exited during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start within {timeout} s")
        time.sleep(0.01)
    req = urllib.request.Request(handle.url + "api/health", headers=handle.headers())
    while True:
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def serve(
    run_dir: str | Path | None = None,
    model: str | ModelAdapter | Session | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    block: bool = False,
    queue_size: int = 8,
    log_level: str = "warning",
    dictionaries: str | Path | DictionarySet | None = None,
    max_tokens: int = MAX_TOKENS,
) -> ServerHandle:
    """Serve the browser app, ``run_dir`` (under ``/run/``) and, with ``model``, the live API.

    ``model``: a model name (``"default"``, a HF directory, a ``.gguf``), a loaded
    :class:`ModelAdapter` or a :class:`Session`; None serves static files only.
    ``dictionaries``: residual SAEs for the feature basis, a folder or a loaded set.
    ``max_tokens``: the longest text a live request takes (BOS included; at most the model's
    context): a cached text costs ~400 kB per token on the default model.
    ``port=0`` picks a free port (see ``handle.url``). Returns once the server answers; with
    ``block=True`` serves until Ctrl-C and returns the stopped handle.

    The server binds to 127.0.0.1 unless told otherwise, because it runs the model on request
    and serves files: on another interface anyone who can reach the machine could use it. For
    another host an access token is required (generated when ``token`` is None) and a warning is
    printed to stderr."""
    import uvicorn

    from headscope.server.app import create_app

    loopback = is_loopback(host)
    if not loopback:
        if token is None:
            token = secrets.token_urlsafe(24)
        print(
            f"headscope: WARNING: serving on {host}, not 127.0.0.1: anyone who can reach this "
            "machine can run the model and read the run; every request needs the access token.",
            file=sys.stderr,
        )
    session = _session(model, max_tokens)
    dicts = None
    if isinstance(dictionaries, (str, Path)):
        from headscope.dictionaries.basis import DictionarySet

        dicts = DictionarySet(dictionaries)
    elif dictionaries is not None:
        dicts = dictionaries  # a loaded basis, e.g. the demo's LiveDictionaries
    app = create_app(
        run_dir,
        session,
        dictionaries=dicts,
        token=token,
        queue_size=queue_size,
        allowed_hosts=LOOPBACK_NAMES if loopback else None,
    )
    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        app,
        log_level=log_level,
        # Don't reconfigure the process's logging (a notebook's, say) from a library call.
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="headscope-server", daemon=True
    )
    handle = ServerHandle(
        url=f"http://{url_host}:{actual_port}/",
        host=host,
        port=actual_port,
        token=token,
        app=app,
        _server=server,
        _thread=thread,
        _sock=sock,
    )
    thread.start()
    try:
        _wait_until_answers(handle, timeout=30.0)
    except BaseException:
        handle.stop()
        raise
    if block:
        what = f"model {session.adapter.name}" if session is not None else "no model"
        run = f"run {Path(run_dir).name}" if run_dir is not None else "no run"
        print(
            f"headscope: serving {run}, {what} at {handle.browser_url} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        handle.wait()
    return handle
