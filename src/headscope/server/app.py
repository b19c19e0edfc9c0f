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
import json
import logging
import math
import mimetypes
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from headscope.analysis.inputs import InputError
from headscope.server import schemas as S

if TYPE_CHECKING:
    from headscope.analysis.session import Session

log = logging.getLogger("headscope.server")

APP_DIR = Path(__file__).resolve().parent.parent / "app"
NO_MODEL = "no model loaded: start the server with --model M"
TOKEN_COOKIE = "headscope_token"
MAX_BODY_BYTES = 16 << 20
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


# ----- JSON out -----------------------------------------------------------------------------------
def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class JSON(JSONResponse):
    """Compact JSON; non-finite floats (a masked key's -inf score) become null, because the
    browser's JSON.parse rejects NaN and Infinity."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except ValueError:
            text = json.dumps(
                _finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
            )
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: escape everything instead
            return json.dumps(json.loads(text), allow_nan=False).encode("ascii")


def _error(status: int, detail: str, headers: dict | None = None, **extra) -> JSON:
    return JSON({"detail": detail, **extra}, status_code=status, headers=headers)


def _field_path(loc) -> str:
    # pydantic puts union-member tags ("list[...]", "function-after[...]", "int", model class
    # names) into locations; a user wants only the field names and list indices.
    keep = []
    for x in loc:
        if x == "body":
            continue
        if isinstance(x, int) or (
            isinstance(x, str) and x.isidentifier() and x.islower() and x not in _TYPE_TAGS
        ):
            keep.append(str(x))
    return ".".join(keep) or "body"


_TYPE_TAGS = {"int", "str", "float", "bool", "none", "list", "dict"}


def _readable(errors: Sequence[Any]) -> str:
    parts: list[str] = []
    for e in errors:
        where = _field_path(e.get("loc", ()))
        msg = e.get("msg", "invalid")
        ctx = e.get("ctx") or {}
        if e.get("type") == "json_invalid" and "error" in ctx:
            msg = f"invalid JSON: {ctx['error']}"
        part = f"{where}: {msg}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request"


# ----- access control -----------------------------------------------------------------------------
def _host_only(header: str) -> str:
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: Host check, body-size bound and the optional access token.

    ``allowed_hosts`` (host names without port) defends a loopback server against DNS
    rebinding: a web page cannot make the browser send it requests under a foreign Host name.
    With a ``token``, every ``/api`` and ``/run`` request needs ``Authorization: Bearer <t>``,
    ``?token=<t>``, or the cookie set when a page was opened with ``?token=<t>``."""

    def __init__(self, app, token: str | None, allowed_hosts: set[str] | None):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = _host_only(headers.get("host", "")).lower()
            if host not in self.allowed_hosts:
                return await _error(403, f"unexpected Host header {host!r}")(scope, receive, send)
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return await _error(400, "bad Content-Length")(scope, receive, send)
        if length > MAX_BODY_BYTES:
            return await _error(413, f"request body over {MAX_BODY_BYTES} bytes")(
                scope, receive, send
            )
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [None])[0]
        if self.token is not None:
            path = scope["path"].lstrip("/")
            protected = path in ("api", "run") or path.startswith(("api/", "run/"))
            if protected and not self._authorized(headers, given):
                return await _error(
                    401,
                    "this server needs its access token: send 'Authorization: Bearer <token>' "
                    "or add ?token=<token> to the URL",
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
            if given is not None and secrets.compare_digest(given, self.token):
                send = self._with_cookie(send)
        return await self.app(scope, _bounded(receive), send)

    def _authorized(self, headers: dict[str, str], given: str | None) -> bool:
        assert self.token is not None
        candidates = [given]
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                candidates.append(value)
        return any(c is not None and secrets.compare_digest(c, self.token) for c in candidates)

    def _with_cookie(self, send):
        # SameSite=Strict: other sites' pages never get to send it along.
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"

        async def wrapped(message):
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message["headers"], (b"set-cookie", cookie.encode())],
                }
            await send(message)

        return wrapped


def _bounded(receive):
    """Stop reading a body (chunked, without Content-Length) once it passes MAX_BODY_BYTES."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise StarletteHTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
        return message

    return wrapped


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
    async def _input_error(_req, err: InputError):
        return _error(422, str(err))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, err: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in err.errors()
        ]
        return _error(422, _readable(err.errors()), errors=errors)

    @app.exception_handler(RecursionError)
    async def _too_deep(_req, _err):
        return _error(400, "the request body is nested too deeply")

    @app.exception_handler(Busy)
    async def _busy(_req, _err):
        return _error(
            503,
            f"busy, retry: {queue.queue_size} model calls are already waiting",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(NoModel)
    async def _no_model(_req, _err):
        return _error(503, NO_MODEL)

    @app.exception_handler(NotAvailable)
    async def _not_available(_req, err):
        return _error(501, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail), headers=getattr(err, "headers", None))

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
        return _error(
            404, f"no such API endpoint: {request.method} /api/{path} (see /openapi.json)"
        )

    # ----- static files
    @app.api_route("/run/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def run_file(path: str):
        if run_root is None:
            return _error(404, "this server has no run: start it with a run directory")
        target = safe_file(run_root, path)
        if target is None:
            return _error(404, "not found")
        return _file_response(target)

    def app_file(path: str):
        target = safe_file(app_root, path or "index.html")
        if target is None:
            if not path and not (app_root / "index.html").is_file():
                return _error(404, "the browser app is not installed in this copy of headscope")
            return _error(404, "not found")
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
