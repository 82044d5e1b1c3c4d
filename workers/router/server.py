"""The router's HTTP front end: the OpenAI API on aiohttp.

    GET  /v1/models               the served model
    POST /v1/completions          text or token-id prompt, streamed (SSE) or not
    POST /v1/chat/completions     messages through the model's chat template, streamed or not
    GET  /health                  200 while the router serves (liveness), with its workers
    GET  /ready                   200 when every role has a ready worker, else 503 (readiness)
    GET  /metrics                 Prometheus exposition (client-visible TTFT / ITL, outcomes)

One request's life: parse and validate (params.py) -> tokenize / render the chat template ->
context check -> admission (the bounded wait queue, 429 when full) -> the backend streams
token ids -> TextAssembler turns them into text and applies stop strings -> JSON or SSE.
Errors before the first token are HTTP errors in OpenAI's shape; errors after it (the
backend's one retry failed too, or the deadline passed) are an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import web

from baton.workers.metrics import BatonMetrics
from baton.workers.router.admission import AdmissionQueue
from baton.workers.router.auth import ApiKeys
from baton.workers.router.backend import (
    Backend,
    GenerationRequest,
    NoReadyWorker,
    WorkerFailure,
)
from baton.workers.router.errors import (
    ApiError,
    backend_failure,
    bad_request,
    deadline_exceeded,
    invalid_api_key,
    model_not_found,
    no_ready_worker,
)
from baton.workers.router.params import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ParsedRequest,
    parse_chat,
    parse_completion,
)
from baton.workers.router.responses import (
    Generation,
    chat_logprob,
    completion_logprobs,
    sse,
)

log = logging.getLogger("baton.router")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = web.RequestKey("request_id", str)
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RouterTokenizer(Protocol):
    """What the router needs of the model's tokenizer (tokenization.py adapts the engine's)."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict], template_kwargs: dict) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class RouterSettings:
    served_model_name: str
    max_model_len: int
    request_timeout_s: float = 600.0
    max_queued_requests: int = 256
    api_keys_file: str | None = None
    owned_by: str = "baton"


def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def _outcome(err: ApiError) -> str:
    if err.status == 504:
        return "timeout"
    if err.status < 500 or err.status == 503:
        return "rejected"
    return "error"


class Router:
    """The aiohttp application around one backend, tokenizer and settings."""

    def __init__(self, backend: Backend, tokenizer: RouterTokenizer, settings: RouterSettings,
                 metrics: BatonMetrics) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.queue = AdmissionQueue(settings.max_queued_requests)
        self.api_keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
        self.created = int(time.time())
        self.running = 0
        self._worker_ids: set[str] = set()

    # -- application -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_page)
        app.on_response_prepare.append(self._add_request_id)
        app.on_startup.append(lambda _app: self.backend.start())
        app.on_cleanup.append(lambda _app: self.backend.close())
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        request[REQUEST_ID] = rid if _REQUEST_ID_OK.match(rid) else uuid.uuid4().hex
        try:
            if request.path.startswith("/v1/"):
                self._authorize(request)
            return await handler(request)
        except ApiError as err:
            return _error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found" if exc.status == 404 else "invalid_request_error"
            return _error_response(ApiError(exc.status, f"{exc.reason}: {request.method} "
                                            f"{request.path}", type=kind))

    async def _add_request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        if REQUEST_ID in request:
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]

    def _authorize(self, request: web.Request) -> None:
        if self.api_keys is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not self.api_keys.allows(key.strip()):
            raise invalid_api_key()

    # -- small endpoints -------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.served_model_name, "object": "model",
                "created": self.created, "owned_by": self.settings.owned_by,
                "max_model_len": self.settings.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.settings.served_model_name:
            raise model_not_found(name)
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        # Liveness must not depend on the workers: a router restarted while its workers
        # load would only trade a clear 503 for refused connections.
        status = self.backend.status()
        return web.json_response({"status": "ok", "ready": status.ready,
                                  "workers": status.workers})

    async def ready(self, request: web.Request) -> web.Response:
        status = self.backend.status()
        body = {"status": "ready" if status.ready else "unavailable", "workers": status.workers}
        return web.json_response(body, status=200 if status.ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.metrics.requests_waiting.set(self.queue.waiting)
        self.metrics.requests_running.set(self.running)
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- generation ------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def _read_body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}",
                              code="invalid_json") from None

    async def _prompt_ids(self, parsed: ParsedRequest) -> list[int]:
        if parsed.prompt_ids is not None:
            vocab = self.tokenizer.vocab_size
            bad = [t for t in parsed.prompt_ids if t >= vocab]
            if bad:
                raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary "
                                  f"(size {vocab})", param="prompt", code="invalid_value")
            return parsed.prompt_ids
        if parsed.endpoint == "chat":
            try:
                ids = await asyncio.to_thread(self.tokenizer.render_chat, parsed.messages,
                                              parsed.chat_template_kwargs)
            except (ValueError, TypeError, KeyError) as exc:
                raise bad_request(f"messages: the chat template failed: {exc}",
                                  param="messages", code="invalid_value") from None
        else:
            ids = await asyncio.to_thread(self.tokenizer.encode, parsed.prompt_text)
        if not ids:
            raise bad_request("prompt: tokenizes to no tokens", param="prompt",
                              code="invalid_value")
        return ids

    def _max_tokens(self, parsed: ParsedRequest, prompt_len: int) -> int:
        limit = self.settings.max_model_len
        param = "messages" if parsed.endpoint == "chat" else "prompt"
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_len} tokens, leaving no room for output.",
                param=param, code="context_length_exceeded")
        if parsed.max_tokens is None:
            default = DEFAULT_COMPLETION_MAX_TOKENS if parsed.endpoint == "completions" else None
            return min(default or limit, limit - prompt_len)
        if prompt_len + parsed.max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_len} tokens and max_tokens asks for {parsed.max_tokens} more.",
                param="max_tokens", code="context_length_exceeded")
        return parsed.max_tokens

    def _worker_request_id(self, request_id: str) -> str:
        """The id the workers see: the client's x-request-id, made unique among this
        router's requests in flight (a client may reuse an id; workers key state on it)."""
        unique, n = request_id, 0
        while unique in self._worker_ids:
            n += 1
            unique = f"{request_id}.{n}"
        self._worker_ids.add(unique)
        return unique

    async def _open(self, gen: GenerationRequest):
        async def start():
            stream = self.backend.generate(gen)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                raise WorkerFailure("the workers returned no token") from None
            except BaseException:
                await stream.aclose()
                raise
            return stream, first

        # The deadline covers the wait in the queue and the prefill up to the first token.
        return await asyncio.wait_for(self.queue.admit(start, gen.deadline),
                                      max(0.0, gen.deadline - time.time()))

    async def _generate(self, request: web.Request, parse) -> web.StreamResponse:
        t_arrival = time.monotonic()
        timeout_s = self.settings.request_timeout_s
        stream = None
        gen: GenerationRequest | None = None
        generation: Generation | None = None
        outcome = "error"
        self.running += 1
        try:
            try:
                parsed = parse(await self._read_body(request))
                if parsed.model != self.settings.served_model_name:
                    raise model_not_found(parsed.model)
                prompt_ids = await self._prompt_ids(parsed)
                vocab = self.tokenizer.vocab_size
                stop_ids = parsed.sampling.stop_token_ids
                if any(t >= vocab for t in stop_ids):
                    raise bad_request(f"stop_token_ids: ids must be below the vocabulary size "
                                      f"{vocab}, got {stop_ids}",
                                      param="stop_token_ids", code="invalid_value")
                sampling = replace(parsed.sampling,
                                   max_tokens=self._max_tokens(parsed, len(prompt_ids)))
                gen = GenerationRequest(request_id=self._worker_request_id(request[REQUEST_ID]),
                                        prompt_ids=tuple(prompt_ids), sampling=sampling,
                                        deadline=time.time() + timeout_s)
                try:
                    self.backend.check_ready()
                    stream, first = await self._open(gen)
                except NoReadyWorker as exc:
                    raise no_ready_worker(exc.role) from None
                except asyncio.TimeoutError:
                    raise deadline_exceeded(timeout_s) from None
                except WorkerFailure as exc:
                    raise backend_failure(str(exc)) from None
            except ApiError as err:
                outcome = _outcome(err)
                return _error_response(err)
            generation = Generation(parsed, gen, request[REQUEST_ID], self.tokenizer.decode,
                                    self.metrics)
            events = generation.events(stream, first, t_arrival)
            if parsed.stream:
                response, outcome = await self._stream(request, generation, events)
            else:
                try:
                    response = await self._complete(generation, events)
                    outcome = "success"
                except asyncio.TimeoutError:
                    outcome = "timeout"
                    response = _error_response(deadline_exceeded(timeout_s))
                except WorkerFailure as exc:
                    response = _error_response(backend_failure(str(exc)))
                except Exception:
                    log.exception("request %s failed", request[REQUEST_ID])
                    response = _error_response(ApiError(500, "internal error in the router",
                                                        type="server_error"))
            if outcome == "success":
                self.metrics.request_duration.observe(time.monotonic() - t_arrival)
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            # A client that read all of a stream and closed at once can cancel this handler
            # while the response is finished off: that request succeeded.
            outcome = "success" if generation is not None and generation.delivered \
                else "cancelled"
            raise
        finally:
            self.running -= 1
            if gen is not None:
                self._worker_ids.discard(gen.request_id)
            # Counted before the await below: a cancellation landing there (the client closed
            # as the answer ended) must not lose the count.
            self.metrics.request_finished(outcome)
            self.queue.notify()
            log.info("request %s %s %s: %d prompt + %d completion tokens in %.3f s",
                     request[REQUEST_ID], request.path, outcome,
                     len(gen.prompt_ids) if gen is not None else 0,
                     generation.completion_tokens if generation is not None else 0,
                     time.monotonic() - t_arrival)
            if stream is not None:
                # Closing the backend's stream cancels whatever the workers still do for it
                # (shielded: it completes even if this handler is being cancelled).
                await asyncio.shield(stream.aclose())

    def _envelope(self, generation: Generation, object_name: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if generation.parsed.endpoint == "chat" else "cmpl-"
        return {"id": prefix + generation.client_request_id, "object": object_name,
                "created": int(time.time()), "model": self.settings.served_model_name}

    async def _complete(self, generation: Generation, events) -> web.Response:
        parts, entries = [], []
        async for delta, entry in events:
            parts.append(delta)
            if entry is not None:
                entries.append(entry)
        text = "".join(parts)
        want_logprobs = generation.parsed.sampling.logprobs is not None
        if generation.parsed.endpoint == "chat":
            body = self._envelope(generation, "chat.completion")
            body["choices"] = [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": [chat_logprob(e) for e in entries]}
                if want_logprobs else None,
                "finish_reason": generation.finish_reason,
            }]
        else:
            body = self._envelope(generation, "text_completion")
            body["choices"] = [{
                "index": 0, "text": text,
                "logprobs": completion_logprobs(entries, 0) if want_logprobs else None,
                "finish_reason": generation.finish_reason,
            }]
        body["usage"] = generation.usage()
        return web.json_response(body)

    async def _stream(self, request: web.Request, generation: Generation,
                      events) -> tuple[web.StreamResponse, str]:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        try:
            outcome = await self._write_stream(request, response, generation, events)
        except ConnectionResetError:
            # The client went away mid-stream: an ordinary end, not a router error (raised
            # on, aiohttp would log it as one). The caller's finally closes the backend
            # stream, which cancels the workers' share of the request.
            log.debug("request %s: the client disconnected mid-stream",
                      generation.gen.request_id)
            return response, "cancelled"
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client read the whole stream, [DONE] included, and closed first
        return response, outcome

    async def _write_stream(self, request: web.Request, response: web.StreamResponse,
                            generation: Generation, events) -> str:
        parsed = generation.parsed
        chat = parsed.endpoint == "chat"
        await response.prepare(request)
        envelope = self._envelope(generation, "chat.completion.chunk" if chat
                                  else "text_completion")

        def chunk(choice: dict[str, Any] | None) -> bytes:
            body = dict(envelope)
            body["choices"] = [] if choice is None else [choice]
            if parsed.include_usage:
                body["usage"] = None
            return sse(body)

        if chat:
            await response.write(chunk({"index": 0, "delta": {"role": "assistant",
                                        "content": ""}, "logprobs": None,
                                        "finish_reason": None}))
        text_offset = 0
        outcome = "success"
        try:
            async for delta, entry in events:
                if not delta and entry is None:
                    continue
                if chat:
                    choice = {"index": 0, "delta": {"content": delta},
                              "logprobs": {"content": [chat_logprob(entry)]}
                              if entry is not None else None, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": delta,
                              "logprobs": completion_logprobs([entry], text_offset)
                              if entry is not None else None, "finish_reason": None}
                    text_offset += len(entry["token"]) if entry is not None else 0
                await response.write(chunk(choice))
            final = {"index": 0, "logprobs": None, "finish_reason": generation.finish_reason}
            final.update({"delta": {}} if chat else {"text": ""})
            await response.write(chunk(final))
            if parsed.include_usage:
                body = dict(envelope)
                body["choices"] = []
                body["usage"] = generation.usage()
                await response.write(sse(body))
        except asyncio.TimeoutError:
            outcome = "timeout"
            await response.write(sse(deadline_exceeded(self.settings.request_timeout_s).body()))
        except WorkerFailure as exc:
            outcome = "error"
            log.warning("request %s failed after its retry: %s", generation.gen.request_id, exc)
            await response.write(sse(backend_failure(str(exc)).body()))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            # The stream has begun: the client can only learn of a failure in the stream.
            outcome = "error"
            log.exception("request %s failed mid-stream", generation.gen.request_id)
            await response.write(sse(ApiError(500, "internal error in the router",
                                               type="server_error").body()))
        await response.write(sse("[DONE]"))
        generation.delivered = outcome == "success"
        return outcome


async def start_site(app: web.Application, host: str, port: int,
                     shutdown_timeout_s: float = 60.0) -> tuple[web.AppRunner, int]:
    """Serve app on host:port (0 = any free port); returns the runner and the bound port.

    handler_cancellation: a client that goes away cancels its handler, which closes the
    backend stream and so frees the request's slots on both workers at once.
    shutdown_timeout_s: at runner.cleanup() the listener closes at once and requests in
    flight get this long to finish (a router pod's termination grace covers one deadline).
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=shutdown_timeout_s)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
