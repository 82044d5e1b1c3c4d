"""The router's HTTP connections: limits and the errors aiohttp answers by itself.

- Idle keep-alive: a connection that holds no request in progress for keepalive_timeout_s
  is closed, a new one included (one that sends nothing, or trickles its request head, is
  closed when that long passes without a complete request head).
- A connection cap: connections past max_connections are closed as they are accepted (and
  logged), so a flood of open sockets cannot take the router's file descriptors or memory.
- aiohttp's own answers (a bad request line, headers over the size limit, bad chunked
  encoding, an exception past the application's middleware) come in OpenAI's error shape,
  as JSON, and no response names the server software's version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from baton.workers.router.errors import ApiError

log = logging.getLogger("baton.router")

SERVER_NAME = "baton"


@dataclass(frozen=True)
class ConnectionLimits:
    keepalive_timeout_s: float = 60.0
    max_connections: int = 4096


def error_response(status: int, message: str) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = "internal_error" if status >= 500 else "bad_http_request"
    response = ApiError(status, message, type=kind, code=code).response()
    response.headers["Server"] = SERVER_NAME
    return response


class _Handler(RequestHandler):
    def __init__(self, manager: web.Server, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._max_connections = max_connections
        self.saw_request = False  # a complete request head arrived (set by _Server)
        self._head_timer: asyncio.TimerHandle | None = None

    def _close_if_silent(self) -> None:
        if not self.saw_request:
            self.force_close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # The first request head must arrive within the keep-alive timeout (aiohttp starts
        # its own idle timer only after a first response in releases before 3.14).
        if self.keepalive_timeout > 0:
            self._head_timer = asyncio.get_running_loop().call_later(
                self.keepalive_timeout, self._close_if_silent)
        open_now = len(self._manager.connections) if self._manager is not None else 0
        if open_now > self._max_connections:
            log.warning("refused a connection from %s: %d open, the cap is %d",
                        transport.get_extra_info("peername"), open_now - 1,
                        self._max_connections)
            self.force_close()
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # The base class logs (with the traceback) and refuses once a response has begun.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            text = "The server failed to handle the request."
        else:
            detail = (message or HTTPStatus(status).phrase).replace("\n", " ")
            text = f"The request is not valid HTTP: {detail:.200}"
        response = error_response(status, text)
        response.force_close()
        return response


class _Server(web.Server):
    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_connections = max_connections
        make_request = self.request_factory

        def request_factory(message, payload, protocol, *args: Any, **kwargs: Any):
            protocol.saw_request = True
            return make_request(message, payload, protocol, *args, **kwargs)

        self.request_factory = request_factory

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, max_connections=self._max_connections,
                        **self._kwargs)


class LimitedAppRunner(web.AppRunner):
    """An AppRunner whose connections follow ConnectionLimits."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _Server(plain.request_handler, request_factory=plain.request_factory,
                       handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                       max_connections=self._limits.max_connections, **plain._kwargs)
