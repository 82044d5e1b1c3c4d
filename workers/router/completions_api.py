"""POST /v1/completions and /v1/chat/completions: a Generation's events as OpenAI's bodies
(bodies.py), one JSON answer or an SSE stream of chunks ending in [DONE].

Errors before the first token are the router's (HTTP errors, server.py); after it, a
non-streamed answer is an error response and a stream ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from baton.workers.router.backend import WorkerFailure
from baton.workers.router.bodies import ChatBodies, Collected, CompletionBodies, sse
from baton.workers.router.errors import ApiError, backend_failure, deadline_exceeded
from baton.workers.router.generation import Generation
from baton.workers.router.params import ParsedRequest, parse_chat, parse_completion

if TYPE_CHECKING:
    from baton.workers.router.server import Router

log = logging.getLogger("baton.router")


class CompletionsApi:
    def __init__(self, router: Router) -> None:
        self.router = router

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.router.serve(request, parse_completion, self._respond)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.router.serve(request, parse_chat, self._respond)

    def _bodies(self, parsed: ParsedRequest):
        want = parsed.sampling.logprobs is not None
        return ChatBodies(want) if parsed.endpoint == "chat" else CompletionBodies(want)

    def _envelope(self, generation: Generation, bodies, object_name: str) -> dict[str, Any]:
        return {"id": bodies.id_prefix + generation.request_id, "object": object_name,
                "created": int(time.time()), "model": self.router.settings.served_model_name}

    async def _respond(self, request: web.Request, generation: Generation,
                       parsed: ParsedRequest) -> tuple[web.StreamResponse, str]:
        if parsed.stream:
            return await self._stream(request, generation, parsed)
        timeout_s = self.router.settings.request_timeout_s
        try:
            return await self._complete(request, generation, parsed), "success"
        except asyncio.TimeoutError:
            return deadline_exceeded(timeout_s).response(), "timeout"
        except WorkerFailure as exc:
            return backend_failure(str(exc)).response(), "error"
        except Exception:
            log.exception("request %s failed", generation.request_id)
            return ApiError(500, "internal error in the router",
                            type="server_error").response(), "error"

    async def _complete(self, request: web.Request, generation: Generation,
                        parsed: ParsedRequest) -> web.Response:
        bodies = self._bodies(parsed)
        collected = [Collected() for _ in generation.choices]
        async for event in generation.events():
            collected[event.index].add(event)
        body = self._envelope(generation, bodies, bodies.object_name)
        body["choices"] = [bodies.choice(i, c) for i, c in enumerate(collected)]
        body["usage"] = generation.usage()
        return web.json_response(body)

    async def _stream(self, request: web.Request, generation: Generation,
                      parsed: ParsedRequest) -> tuple[web.StreamResponse, str]:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        try:
            outcome = await self._write_stream(request, response, generation, parsed)
        except ConnectionResetError:
            # The client went away mid-stream: an ordinary end, not a router error (raised
            # on, aiohttp would log it as one). The caller's finally closes the backend
            # streams, which cancels the workers' share of the request.
            log.debug("request %s: the client disconnected mid-stream", generation.request_id)
            return response, "cancelled"
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client read the whole stream, [DONE] included, and closed first
        return response, outcome

    async def _write_stream(self, request: web.Request, response: web.StreamResponse,
                            generation: Generation, parsed: ParsedRequest) -> str:
        bodies = self._bodies(parsed)
        await response.prepare(request)
        envelope = self._envelope(generation, bodies, bodies.chunk_object)

        def chunk(choices: list[dict[str, Any]]) -> bytes:
            body = dict(envelope)
            body["choices"] = choices
            if parsed.continuous_usage:
                body["usage"] = generation.usage()
            elif parsed.include_usage:
                body["usage"] = None
            return sse(body)

        for c in generation.choices:
            opening = bodies.opening(c.index)
            if opening is not None:
                await response.write(chunk([opening]))
        outcome = "success"
        try:
            async for event in generation.events():
                for choice in bodies.chunk_choices(event):
                    await response.write(chunk([choice]))
                if event.finish_reason is not None:
                    await response.write(chunk([bodies.closing(event.index,
                                                               event.finish_reason)]))
                if event.error is not None:
                    # The choice ended in an error: an error event the client sees (the
                    # official clients raise it).
                    outcome = "error"
                    await response.write(sse({"error": event.error}))
            if parsed.include_usage:
                body = dict(envelope)
                body["choices"] = []
                body["usage"] = generation.usage()
                await response.write(sse(body))
        except asyncio.TimeoutError:
            outcome = "timeout"
            timeout_s = self.router.settings.request_timeout_s
            await response.write(sse(deadline_exceeded(timeout_s).body()))
        except WorkerFailure as exc:
            outcome = "error"
            log.warning("request %s failed after its retry: %s", generation.request_id, exc)
            await response.write(sse(backend_failure(str(exc)).body()))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            # The stream has begun: the client can only learn of a failure in the stream.
            outcome = "error"
            log.exception("request %s failed mid-stream", generation.request_id)
            await response.write(sse(ApiError(500, "internal error in the router",
                                               type="server_error").body()))
        await response.write(sse("[DONE]"))
        generation.delivered = outcome == "success"
        return outcome
