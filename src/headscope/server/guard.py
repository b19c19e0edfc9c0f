"""Access control of the live server, as ASGI middleware: Host check, body-size bound, token."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException as StarletteHTTPException

from headscope.server.responses import error_response

TOKEN_COOKIE = "headscope_token"
MAX_BODY_BYTES = 16 << 20


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
                return await error_response(403, f"unexpected Host header {host!r}")(
                    scope, receive, send
                )
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return await error_response(400, "bad Content-Length")(scope, receive, send)
        if length > MAX_BODY_BYTES:
            return await error_response(413, f"request body over {MAX_BODY_BYTES} bytes")(
                scope, receive, send
            )
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [None])[0]
        if self.token is not None:
            path = scope["path"].lstrip("/")
            protected = path in ("api", "run") or path.startswith(("api/", "run/"))
            if protected and not self._authorized(headers, given):
                return await error_response(
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
