"""JSON responses of the live server: compact, browser-parseable, errors with readable details."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel


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


def result_response(result: BaseModel) -> Response:
    """A result model as compact JSON, serialised by pydantic in one step (non-finite floats
    become null, as in :class:`JSON`); :class:`JSON` where pydantic cannot (a lone surrogate)."""
    try:
        return Response(result.model_dump_json(), media_type="application/json")
    except ValueError:
        return JSON(result.model_dump())


def error_response(status: int, detail: str, headers: dict | None = None, **extra) -> JSON:
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


def readable_errors(errors: Sequence[Any]) -> str:
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
