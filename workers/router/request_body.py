"""Reading and decoding request bodies, with limits.

- A body over the router's limit is refused with 413 before it is read (Content-Length) or
  as soon as it passes the limit (chunked uploads).
- JSON is decoded strictly: NaN and Infinity (Python's json accepts them) and numbers that
  overflow to infinity are a 400 naming the field, nesting deeper than MAX_JSON_DEPTH is a
  400 (not a RecursionError deep in the parser), and invalid UTF-8 or syntax is a 400.
Decoding runs in a worker thread (`decode_json_body` is blocking): the C decoder holds the
GIL only for a short while even at the size limit, and the walk over the result yields it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from baton.workers.router.errors import ApiError, bad_request

MAX_JSON_DEPTH = 64
_READ_CHUNK = 1 << 16


class _NonFinite:
    """Stands in for a non-finite number until the walk finds where it is."""

    def __init__(self, text: str) -> None:
        self.text = text


def _float(text: str) -> Any:
    value = float(text)
    return _NonFinite(text) if value in (float("inf"), float("-inf")) else value


def too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size} bytes" if size is not None else "larger"
    return ApiError(413, f"The request body is {what}; this router takes at most {limit} "
                    f"bytes (router.maxRequestBodyBytes).", code="request_too_large")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, or 413 once it is known to exceed limit bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(request.content_length, limit)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _check(value: Any) -> None:
    """Depth and non-finite numbers, iteratively (a recursive walk is what deep input
    breaks)."""
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels "
                              f"(at {_path(path)})", param=_path(path), code="invalid_json")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(item, (dict, list)):
                if item:
                    stack.append((item, [*path, key]))
            elif isinstance(item, _NonFinite):
                where = _path([*path, key])
                raise bad_request(f"{where}: {item.text} is not a number JSON allows (finite "
                                  f"numbers only)", param=where, code="invalid_value")


def decode_json_body(raw: bytes) -> Any:
    """The decoded body (blocking); ApiError 400 for anything that is not plain JSON."""
    try:
        value = json.loads(raw, parse_constant=_NonFinite, parse_float=_float)
    except RecursionError:
        raise bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels",
                          code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"The request body is not valid JSON: {exc}",
                          code="invalid_json") from None
    if isinstance(value, _NonFinite):
        raise bad_request(f"The request body {value.text} is not a JSON object",
                          code="invalid_body")
    if isinstance(value, (dict, list)):
        _check(value)
    return value
