"""Reading and decoding request bodies, with limits, without stalling the event loop.

- A body over the router's limit is refused with 413 before it is read (Content-Length) or
  as soon as it passes the limit (chunked uploads).
- JSON is decoded strictly: NaN and Infinity (Python's json accepts them) and numbers that
  overflow to infinity are a 400 naming the field, nesting deeper than MAX_JSON_DEPTH is a
  400 (found from the raw brackets before decoding, not a RecursionError deep in the
  parser), and invalid UTF-8 or syntax is a 400. So is a lone UTF-16 surrogate in any
  string (`"\ud800"` is valid JSON but no text: nothing downstream can encode it).
- No JSON array or object in a request may have more items than the model's context has
  tokens (no field needs more): a longer one is a 400 before anything walks it.

Where it runs: Python's C JSON decoder holds the GIL for the whole decode (~90 ms for 1 MiB
of token ids on a busy 2-core machine), so a thread does not keep the event loop free.
Bodies up to PROCESS_DECODE_BYTES are decoded in a thread (a few ms at most); larger ones in
a child process, which sends back only bodies that passed the checks (a value whose arrays
fit the context unpickles in a few ms).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from aiohttp import web

from baton.workers.router.errors import ApiError, bad_request

MAX_JSON_DEPTH = 64
PROCESS_DECODE_BYTES = 256 * 1024
_READ_CHUNK = 1 << 16


class _NonFinite:
    """Stands in for a non-finite number until the walk finds where it is."""

    def __init__(self, text: str) -> None:
        self.text = text


def too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size} bytes" if size is not None else "larger"
    return ApiError(413, f"The request body is {what}; this router takes at most {limit} "
                    f"bytes (router.maxRequestBodyBytes).", code="request_too_large")


class BodyBudget:
    """The bytes of request bodies the router holds at once (read, not yet decoded), across
    all requests. A body that would take it past its limit is refused before it is read in
    full: at once when its Content-Length says so, else as its chunks arrive."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held = 0
        self.peak = 0  # the most ever held at once
        self.refused = 0

    def reserve(self) -> BodyReservation:
        return BodyReservation(self)


class BodyReservation:
    """One body's share of a BodyBudget; release() gives it back."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def grow(self, n: int) -> None:
        budget = self.budget
        if budget.held + n > budget.limit_bytes:
            budget.refused += 1
            raise ApiError(503, f"The router holds {budget.held} bytes of request bodies in "
                           f"flight and takes at most {budget.limit_bytes} "
                           f"(router.requestBodyBudgetBytes); retry later.",
                           type="service_unavailable", code="body_budget_exhausted",
                           headers={"Retry-After": "1"})
        budget.held += n
        budget.peak = max(budget.peak, budget.held)
        self.bytes += n

    def release(self) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0


async def read_body(request: web.Request, limit: int, reservation: BodyReservation,
                    timeout_s: float) -> bytes:
    """The raw body, held within reservation: 413 once it is known to exceed limit bytes,
    503 when the budget has no room for it, 408 (and the connection closed) when it has not
    arrived in full within timeout_s."""
    if request.content_length is not None:
        if request.content_length > limit:
            raise too_large(request.content_length, limit)
        reservation.grow(request.content_length)
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.content.iter_chunked(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(None, limit)
            if size > reservation.bytes:
                reservation.grow(size - reservation.bytes)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout_s:g} s "
                       f"({size} bytes came).", code="request_timeout",
                       close_connection=True) from None
    return b"".join(chunks)


_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"\\')


def _depth_exceeded(raw: bytes) -> bool:
    """Whether raw JSON nests deeper than MAX_JSON_DEPTH, from its brackets outside strings
    (checked before decoding, which deep input would break). Only the structural bytes are
    scanned in Python: every other byte is dropped at C speed first."""
    structure = raw.translate(None, _STRUCTURE)
    depth, in_string, escaped = 0, False, False
    for c in structure:
        if in_string:
            if escaped:
                escaped = False
            elif c == 92:  # backslash
                escaped = True
            elif c == 34:  # quote
                in_string = False
        elif c == 34:
            in_string = True
        elif c in (91, 123):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif c in (93, 125):
            depth -= 1
    return False


def _path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _walk(value: Any, max_items: int, non_finite: bool) -> None:
    """Containers' sizes, and where a non-finite number is (iteratively: input may be deep;
    a container's size is checked before its items are looked at)."""
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if len(node) > max_items:
            where = _path(path)
            raise bad_request(f"{where}: {len(node)} items, more than the model's context "
                              f"({max_items - 1} tokens) could use", param=where,
                              code="context_length_exceeded")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(item, (dict, list)):
                if item:
                    stack.append((item, [*path, key]))
            elif non_finite and isinstance(item, _NonFinite):
                where = _path([*path, key])
                raise bad_request(f"{where}: {item.text} is not a number JSON allows (finite "
                                  f"numbers only)", param=where, code="invalid_value")


# A surrogate escape, or a surrogate's bytes (Python's json decodes bytes with surrogatepass);
# only a body that has one is walked for a lone one (a pair is one character once decoded).
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _find_lone_surrogate(value: Any) -> None:
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = _path(path)
                raise bad_request(f"{where}: holds a lone UTF-16 surrogate "
                                  f"({node[exc.start]!r}); text must be valid Unicode",
                                  param=where, code="invalid_value") from None
        elif isinstance(node, dict):
            for key, item in node.items():
                stack.append((key, [*path, key]))
                stack.append((item, [*path, key]))
        elif isinstance(node, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(node))


def decode_json_text(text: str, where: str) -> Any:
    """A JSON document held in a string field (tool-call arguments), decoded with the same
    depth bound as a body; ApiError 400 naming where for anything else."""
    if _depth_exceeded(text.encode("utf-8", "surrogatepass")):
        raise bad_request(f"{where}: nests deeper than {MAX_JSON_DEPTH} levels", param=where,
                          code="invalid_value")
    try:
        return json.loads(text)
    except RecursionError:
        raise bad_request(f"{where}: nests deeper than {MAX_JSON_DEPTH} levels", param=where,
                          code="invalid_value") from None
    except ValueError as exc:
        raise bad_request(f"{where}: not valid JSON ({exc})", param=where,
                          code="invalid_value") from None


def decode_json_body(raw: bytes, max_items: int) -> Any:
    """The decoded body (blocking); ApiError 400 for anything that is not plain JSON or
    has a container of more than max_items items."""
    if _depth_exceeded(raw):
        raise bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels",
                          code="invalid_json")
    non_finite = []

    def constant(text: str) -> _NonFinite:
        non_finite.append(text)
        return _NonFinite(text)

    def number(text: str) -> Any:
        value = float(text)
        return constant(text) if value in (float("inf"), float("-inf")) else value

    try:
        value = json.loads(raw, parse_constant=constant, parse_float=number)
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
        _walk(value, max_items, bool(non_finite))
    if _SURROGATE.search(raw):
        _find_lone_surrogate(value)
    return value


class BodyDecoder:
    """decode_json_body off the event loop: in a thread, or in a child process for bodies
    over PROCESS_DECODE_BYTES (started on first use, one worker; module docstring)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._pool: ProcessPoolExecutor | None = None

    async def decode(self, raw: bytes) -> Any:
        if len(raw) <= PROCESS_DECODE_BYTES:
            return await asyncio.to_thread(decode_json_body, raw, self.max_items)
        if self._pool is None:
            # spawn: the router's process has threads (gRPC), which fork does not copy.
            self._pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, decode_json_body, raw,
                                              self.max_items)
        except BrokenProcessPool:
            self._pool = None
            raise ApiError(500, "the request body decoder stopped; retry the request",
                           type="server_error", code="decoder_failed") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
