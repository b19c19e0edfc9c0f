"""The live server as a FastAPI app: the analysis functions over HTTP, plus the browser app and
one run directory as static files.

Two lanes. Every request is first tried on a small pool of threads that may not run the model
(:func:`~headscope.analysis.session.cached_only`): what the :class:`Session`'s text cache
already holds (another pair, head or layer of a seen text) is answered there, also while a
forward pass runs. Work that needs the model moves to one worker thread, in arrival order,
behind a bounded queue: the model is not reentrant, torch already uses every core for one
call, and a queue that refuses work ("503 busy, retry") beats one that grows until requests
time out. So under load it is new texts that are shed, never answers the cache holds.

Every live endpoint is generated from the operation table (:mod:`headscope.operations`): its
request model validates the body, its result model is the response. Errors are
:class:`~headscope.errors.HeadscopeError` subclasses, mapped to their status in one handler.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import mimetypes
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from headscope.analysis.session import NeedsModel, cached_only
from headscope.errors import Busy, HeadscopeError
from headscope.operations import OPERATIONS, Context, Operation
from headscope.server.guard import Guard
from headscope.server.responses import JSON, error_response, readable_errors, result_response
from headscope.server.run_routes import add_run_routes

if TYPE_CHECKING:
    from headscope.analysis.session import Session

log = logging.getLogger("headscope.server")

APP_DIR = Path(__file__).resolve().parent.parent / "app"

_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/markdown; charset=utf-8",
    ".npy": "application/octet-stream",
    ".parquet": "application/octet-stream",
    ".safetensors": "application/octet-stream",
}


# ----- the model queue ----------------------------------------------------------------------------
class ModelQueue:
    """One worker thread runs every model call in arrival order; at most ``queue_size`` calls
    wait behind the running one, further calls are refused with :class:`Busy`."""

    def __init__(self, queue_size: int, *, workers: int = 1, name: str = "model"):
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.queue_size = queue_size
        self.workers = workers
        self.name = name
        self._slots = threading.BoundedSemaphore(queue_size + workers)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def try_submit(self, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` or raise :class:`Busy`; the slot is freed when ``fn`` finishes."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"busy, retry: {self.queue_size} {self.name} calls are already waiting")
        try:
            with self._lock:
                if self._executor is None:  # created on first use: no thread at import/creation
                    self._executor = ThreadPoolExecutor(
                        self.workers, thread_name_prefix=f"headscope-{self.name}"
                    )
                fut = self._executor.submit(fn)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        return fut

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.try_submit(fn))

    def shutdown(self) -> None:
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)


# ----- static files -------------------------------------------------------------------------------
def safe_file(root: Path, rel: str) -> Path | None:
    """``root/rel`` if it is a regular file inside ``root`` (symlinks resolved), else None.

    Refuses absolute paths, ``.``/``..`` segments (the ASGI path is already percent-decoded, so
    ``%2e%2e`` arrives here as ``..``), backslashes, NUL bytes and anything that resolves outside
    ``root``, e.g. through a symlink."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return None
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    try:
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return None
    except (OSError, RuntimeError, ValueError):
        return None
    return target


def _file_response(path: Path) -> FileResponse:
    ctype = _CONTENT_TYPES.get(path.suffix.lower()) or (
        mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    )
    # no-cache = revalidate (ETag) every time: the app and a running precompute change on disk.
    return FileResponse(path, media_type=ctype, headers={"Cache-Control": "no-cache"})


# ----- the app ------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    """Whether a model is loaded and which run is served. ``model`` is null without a model."""

    model: str | None
    n_layers: int | None
    n_heads: int | None
    run: str | None = Field(description="name of the served run directory, null without one")
    max_tokens: int | None = Field(None, description="longest text accepted, BOS included")
    dictionary_layers: list[int] = Field(
        default_factory=list, description="layers with a residual dictionary (feature basis)"
    )
    dictionary_training: dict[str, Any] | None = Field(
        None,
        description="dictionaries training in the background: phase, running, layers, "
        "layers_ready, tokens, tokens_total, eta_seconds, elapsed_seconds (null: none)",
    )


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a message a user can act on."""

    detail: str
    errors: list[dict] | None = Field(None, description="per-field validation errors (422)")


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "access token missing or wrong"},
    422: {"model": ErrorResponse, "description": "invalid request"},
    503: {"model": ErrorResponse, "description": "no model loaded, or busy (retry)"},
}


def _dictionary_layers(dictionaries) -> list[int]:
    return sorted(dictionaries.by_layer) if dictionaries is not None else []


def _dictionary_training(dictionaries) -> dict[str, Any] | None:
    status = getattr(dictionaries, "status", None)  # LiveDictionaries: training in the background
    return status() if callable(status) else None


# Threads answering from the text cache, and how many such calls may wait for one. Their work
# is milliseconds; the bound only stops a flood from queueing without limit.
CACHE_WORKERS = 2
CACHE_QUEUE = 256


def _from_cache(ctx: Context, op: Operation, req) -> Any:
    with cached_only():
        return op.run(ctx, req)


def _add_route(
    app: FastAPI, op: Operation, ctx: Context, queue: ModelQueue, fast: ModelQueue
) -> None:
    """``POST /api/<op.path>``: validate the body with ``op.request``, run ``op`` from the text
    cache or else on the model queue, answer with ``op.result``."""

    async def endpoint(req):
        try:
            result = await fast.run(lambda: _from_cache(ctx, op, req))
        except NeedsModel:
            result = await queue.run(lambda: op.run(ctx, req))
        return result_response(result)

    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("req", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=op.request)]
    )
    endpoint.__name__ = op.path.replace("/", "_").replace("-", "_")
    app.post(
        f"/api/{op.path}",
        response_model=op.result,
        responses=_ERRORS,
        summary=op.help,
        name=op.name,
    )(endpoint)


def create_app(
    run_dir: Path | str | None,
    session: Session | None,
    *,
    token: str | None = None,
    queue_size: int = 8,
    allowed_hosts: set[str] | None = None,
    dictionaries=None,
) -> FastAPI:
    """The live server app.

    ``run_dir``: a run directory served read-only under ``/run/`` (None: none).
    ``session``: the model and its text cache (None: static files only; live endpoints 503).
    ``token``: when set, required on every ``/api`` and ``/run`` request.
    ``queue_size``: model calls that may wait behind the running one before new ones get 503.
    ``allowed_hosts``: accepted Host header names (None: any); :func:`serve` sets the loopback
    names when it binds to loopback.
    ``dictionaries``: a ``DictionarySet`` for ``basis="sae"`` attributions (default: the run's
    ``dictionaries/`` folder when it has one)."""
    run_root = None
    if run_dir is not None:
        run_root = Path(run_dir).expanduser().resolve()
        if not run_root.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        if dictionaries is None and (run_root / "dictionaries").is_dir():
            from headscope.dictionaries.basis import DictionarySet

            dictionaries = DictionarySet(run_root / "dictionaries")
    app_root = APP_DIR.resolve()
    queue = ModelQueue(queue_size)
    fast = ModelQueue(CACHE_QUEUE, workers=CACHE_WORKERS, name="cache")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()
        fast.shutdown()

    app = FastAPI(
        title="headscope live server",
        version="1",
        summary="Attention heads of a transformer LM, live: patterns, QK/OV attributions, "
        "head ranking, composition, sweeps, QK geometry, interventions.",
        # The bundled Swagger/ReDoc pages load from a CDN; the app must work offline.
        docs_url=None,
        redoc_url=None,
        default_response_class=JSON,
        lifespan=lifespan,
    )
    app.state.session = session
    app.state.dictionaries = dictionaries
    app.state.queue = queue
    app.state.cache_queue = fast
    app.state.run_dir = run_root
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_hosts)

    # ----- errors: every expected one is a HeadscopeError that knows its status
    @app.exception_handler(HeadscopeError)
    async def _headscope_error(_req, err: HeadscopeError):
        headers = {"Retry-After": "1"} if isinstance(err, Busy) else None
        return error_response(err.status, str(err), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validationerror_response(_req, err: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in err.errors()
        ]
        return error_response(422, readable_errors(err.errors()), errors=errors)

    @app.exception_handler(RecursionError)
    async def _too_deep(_req, _err):
        return error_response(400, "the request body is nested too deeply")

    @app.exception_handler(StarletteHTTPException)
    async def _httperror_response(_req, err: StarletteHTTPException):
        return error_response(
            err.status_code, str(err.detail), headers=getattr(err, "headers", None)
        )

    text = None
    if run_root is not None:
        from headscope.dictionaries.feature_page import TextSource

        text = TextSource.of_run(run_root)  # feature pages read the run's own data
    ctx = Context(session, dictionaries, text)

    @app.get("/api/health", response_model=HealthResponse, responses=_ERRORS)
    async def health():
        """Which model, run and dictionaries this server has."""
        spec = session.adapter.spec if session is not None else None
        return JSON(
            {
                "model": session.adapter.name if session is not None else None,
                "n_layers": spec.n_layers if spec else None,
                "n_heads": spec.n_heads if spec else None,
                "run": run_root.name if run_root is not None else None,
                "max_tokens": session.max_tokens if session is not None else None,
                "dictionary_layers": _dictionary_layers(dictionaries),
                "dictionary_training": _dictionary_training(dictionaries),
            }
        )

    for op in OPERATIONS:
        _add_route(app, op, ctx, queue, fast)
    add_run_routes(app, run_root, ctx, queue)

    @app.api_route(
        "/api/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def unknown_api(path: str, request: Request):
        return error_response(
            404, f"no such API endpoint: {request.method} /api/{path} (see /openapi.json)"
        )

    # ----- static files
    @app.api_route("/run/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def run_file(path: str):
        if run_root is None:
            return error_response(404, "this server has no run: start it with a run directory")
        target = safe_file(run_root, path)
        if target is None:
            return error_response(404, "not found")
        return _file_response(target)

    def app_file(path: str):
        target = safe_file(app_root, path or "index.html")
        if target is None:
            if not path and not (app_root / "index.html").is_file():
                return error_response(
                    404, "the browser app is not installed in this copy of headscope"
                )
            return error_response(404, "not found")
        return _file_response(target)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return app_file("")

    @app.api_route("/app/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def app_files(path: str):
        return app_file(path)

    # The app's index.html uses relative URLs (style.css, main.js, run/, api/...), so its own
    # files are also served from the root.
    @app.api_route("/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def root_files(path: str):
        return app_file(path)

    return app
