"""The live server as a FastAPI app: the analysis functions over HTTP, plus the browser app and
one run directory as static files.

Every model call runs on one worker thread, in arrival order, behind a bounded queue: the model
is not reentrant, torch already uses every core for one call, and a queue that refuses work
("503 busy, retry") beats one that grows until requests time out. Results per text are cached
by the :class:`Session`, so a second (query, key) pair on a seen text costs no forward pass.

Request and response bodies are the pydantic models of :mod:`headscope.server.schemas`.
"""

from __future__ import annotations

import asyncio
import importlib
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from headscope.analysis.inputs import InputError
from headscope.server import schemas as S
from headscope.server.guard import Guard
from headscope.server.responses import JSON, error_response, readable_errors

if TYPE_CHECKING:
    from headscope.analysis.session import Session

log = logging.getLogger("headscope.server")

APP_DIR = Path(__file__).resolve().parent.parent / "app"
NO_MODEL = "no model loaded: start the server with --model M"
# attend returns T(T+1)/2 weights per head; beyond this the JSON alone is tens of megabytes.
MAX_ATTEND_VALUES = 4_000_000
MAX_GEOMETRY_VALUES = 4_000_000

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


class Busy(Exception):
    """The model queue is full."""


class NoModel(Exception):
    """A live endpoint was called on a server started without a model."""


class NotAvailable(Exception):
    """An analysis this version of headscope does not have."""


# ----- the model queue ----------------------------------------------------------------------------
class ModelQueue:
    """One worker thread runs every model call in arrival order; at most ``queue_size`` calls
    wait behind the running one, further calls are refused with :class:`Busy`."""

    def __init__(self, queue_size: int):
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.queue_size = queue_size
        self._slots = threading.BoundedSemaphore(queue_size + 1)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def try_submit(self, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` or raise :class:`Busy`; the slot is freed when ``fn`` finishes."""
        if not self._slots.acquire(blocking=False):
            raise Busy
        try:
            with self._lock:
                if self._executor is None:  # created on first use: no thread at import/creation
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="headscope-model")
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
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": S.ErrorResponse, "description": "access token missing or wrong"},
    422: {"model": S.ErrorResponse, "description": "invalid request"},
    503: {"model": S.ErrorResponse, "description": "no model loaded, or busy (retry)"},
}


def _lazy(module: str, name: str) -> Callable:
    full = f"headscope.analysis.{module}"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as err:
        if err.name == full:
            raise NotAvailable(f"{module} is not available in this version of headscope") from None
        raise
    return getattr(mod, name)


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

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()

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
    app.state.run_dir = run_root
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_hosts)

    # ----- errors
    @app.exception_handler(InputError)
    async def _inputerror_response(_req, err: InputError):
        return error_response(422, str(err))

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

    @app.exception_handler(Busy)
    async def _busy(_req, _err):
        return error_response(
            503,
            f"busy, retry: {queue.queue_size} model calls are already waiting",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(NoModel)
    async def _no_model(_req, _err):
        return error_response(503, NO_MODEL)

    @app.exception_handler(NotAvailable)
    async def _not_available(_req, err):
        return error_response(501, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _httperror_response(_req, err: StarletteHTTPException):
        return error_response(
            err.status_code, str(err.detail), headers=getattr(err, "headers", None)
        )

    def need_session() -> Session:
        if session is None:
            raise NoModel
        return session

    async def call(fn: Callable[[Session], Any]) -> JSON:
        sess = need_session()
        return JSON(await queue.run(lambda: fn(sess)))

    # ----- live API
    @app.get("/api/health", response_model=S.HealthResponse, responses=_ERRORS)
    async def health():
        """Which model and run this server has."""
        spec = session.adapter.spec if session is not None else None
        return JSON(
            {
                "model": session.adapter.name if session is not None else None,
                "n_layers": spec.n_layers if spec else None,
                "n_heads": spec.n_heads if spec else None,
                "run": run_root.name if run_root is not None else None,
                "max_tokens": session.max_tokens if session is not None else None,
            }
        )

    @app.post("/api/tokenize", response_model=S.TokenizeResponse, responses=_ERRORS)
    async def tokenize(req: S.TokenizeRequest):
        """Tokens of a text as the model sees it (BOS first)."""
        from headscope.analysis.inputs import encode_text

        def run(sess: Session):
            ids = encode_text(sess.adapter, req.text, sess.max_tokens)[0]
            return {"tokens": sess.adapter.tokens.displays(ids), "ids": ids.tolist()}

        return await call(run)

    @app.post("/api/attend", response_model=S.AttendResponse, responses=_ERRORS)
    async def attend(req: S.AttendRequest):
        """Attention patterns of the given heads (all heads when null) on a text."""
        from headscope.analysis.attend import attend as attend_fn
        from headscope.analysis.inputs import encode_text, parse_heads

        def run(sess: Session):
            n = encode_text(sess.adapter, req.text, sess.max_tokens).shape[1]
            n_heads = len(parse_heads(sess.adapter, req.heads))
            if n_heads * n * (n + 1) // 2 > MAX_ATTEND_VALUES:
                raise InputError(
                    f"{n_heads} heads x {n} tokens is {n_heads * n * (n + 1) // 2:,} attention "
                    f"weights; the limit is {MAX_ATTEND_VALUES:,}: ask for fewer heads or a "
                    "shorter text"
                )
            return attend_fn(
                sess.adapter, req.text, req.heads, max_tokens=sess.max_tokens
            ).to_dict()

        return await call(run)

    @app.post("/api/rank-heads", response_model=S.RankHeadsResponse, responses=_ERRORS)
    async def rank_heads(req: S.PairRequest):
        """Every head's attention and score on one (query, key) pair, highest attention first."""
        from headscope.analysis.attribution import rank_heads as fn

        return await call(lambda sess: fn(sess, req.text, req.query, req.key))

    def basis(name: str):
        if name == "components":
            return None
        if app.state.dictionaries is None:
            raise InputError(
                "no dictionaries loaded: serve with --dictionaries DIR, or put residual SAEs in "
                "RUN/dictionaries/"
            )
        return app.state.dictionaries

    @app.post("/api/attribute/qk", response_model=S.QKResponse, responses=_ERRORS)
    async def attribute_qk(req: S.QKRequest):
        """A head's pre-softmax score on (query, key) as query-component x key-component terms."""
        from headscope.analysis.attribution import qk_attribution

        return await call(
            lambda sess: qk_attribution(
                sess, req.text, req.head, req.query, req.key, top=req.top, basis=basis(req.basis)
            )
        )

    @app.post("/api/attribute/ov", response_model=S.OVResponse, responses=_ERRORS)
    async def attribute_ov(req: S.OVRequest):
        """What a head moves from key to query, by key-side component, read out as logits."""
        from headscope.analysis.attribution import ov_attribution

        def run(sess: Session):
            return ov_attribution(
                sess,
                req.text,
                req.head,
                req.query,
                req.key,
                top=req.top,
                n_tokens=req.n_tokens,
                basis=basis(req.basis),
            )

        return await call(run)

    @app.post("/api/composition", response_model=S.CompositionResponse, responses=_ERRORS)
    async def composition(req: S.CompositionRequest):
        """Which earlier heads drive this edge's score, at the key and at the query."""
        from headscope.analysis.attribution import composition as fn

        return await call(
            lambda sess: fn(sess, req.text, req.head, req.query, req.key, top=req.top)
        )

    @app.post("/api/sweep", response_model=S.SweepResponse, responses=_ERRORS)
    async def sweep(req: S.SweepRequest):
        """Attention from query to key as one slot of a template takes each value."""
        values = req.value_list()

        def run(sess: Session):
            fn = _lazy("sweep", "sweep")
            return fn(sess, req.template, values, req.heads, req.query, req.key)

        return await call(run)

    @app.post("/api/geometry", response_model=S.GeometryResponse, responses=_ERRORS)
    async def geometry(req: S.GeometryRequest):
        """Cosine similarity of heads' query and key vectors on marked tokens ([[token]])."""

        def run(sess: Session):
            from headscope.analysis.inputs import parse_heads

            fn = _lazy("geometry", "qk_geometry")
            n = len(parse_heads(sess.adapter, req.heads)) * len(req.queries) * len(req.keys)
            if n > MAX_GEOMETRY_VALUES:
                raise InputError(
                    f"{n:,} cosine similarities (heads x queries x keys); the limit is "
                    f"{MAX_GEOMETRY_VALUES:,}: ask for fewer heads"
                )
            return fn(sess, req.queries, req.keys, req.heads)

        return await call(run)

    @app.post("/api/intervene", response_model=S.InterveneResponse, responses=_ERRORS)
    async def intervene(req: S.InterveneRequest):
        """Attention after scaling one component's contribution to a head's query or key."""

        def run(sess: Session):
            fn = _lazy("intervene", "intervene")
            return fn(
                sess,
                req.text,
                req.heads,
                req.component,
                req.side,
                req.scale,
                req.query,
                req.key,
                freeze_patterns=req.freeze_patterns,
            )

        return await call(run)

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
