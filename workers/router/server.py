"""The router's HTTP front end: the OpenAI API on aiohttp.

    GET  /v1/models               the served model
    POST /v1/completions          text or token-id prompts (one or several), streamed (SSE) or not
    POST /v1/chat/completions     messages through the model's chat template, streamed or not,
                                  with tools, reasoning and structured output
    POST /v1/responses            the Responses API (responses_api.py)
    GET / DELETE /v1/responses/{id}   a stored response
    POST /tokenize, /detokenize   the model's tokenizer (vLLM's shapes)
    GET  /health                  200 while the router serves (liveness), with its workers
    GET  /ready                   200 when every role has a ready worker, else 503 (readiness)
    GET  /metrics                 Prometheus exposition (client-visible TTFT / ITL, outcomes)

Connections (connections.py): idle keep-alive connections and ones that send no complete
request head close after keepalive_timeout_s, connections past max_connections close as they
are accepted, and aiohttp's own errors answer in OpenAI's shape. Any exception a handler
does not turn into an ApiError is an OpenAI-shaped 500 naming the request id, logged with its
traceback.

One request's life: read the body (413 past the size limit, 503 while the bodies in flight
fill body_budget_bytes, 408 past body_timeout_s; only then does it count as running) ->
decode and validate it off the event loop (request_body.py, params.py) -> render the chat
template and tokenize, bounded (tokenization.py) -> context check -> the output grammar, if
any (grammar.py) -> one choice per prompt and per n (generation.py): choice 0 through
admission (the bounded wait queue, 429 when full), the others after its first token -> each
choice's tokens through output processing (output.py) -> OpenAI bodies (bodies.py), JSON or
SSE. Errors before the first
token are HTTP errors in OpenAI's shape; errors after it (the backend's one retry failed too,
or the deadline passed) are an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2
from aiohttp import web

from baton.operator.spec import ReasoningSpec
from baton.workers.metrics import BatonMetrics
from baton.workers.router.admission import ANONYMOUS, AdmissionQueue
from baton.workers.router.auth import TENANT, ApiKeys, cache_salt, tenant_of
from baton.workers.router.backend import (
    Backend,
    GenerationRequest,
    NoCapacity,
    NoReadyWorker,
    WorkerFailure,
)
from baton.workers.router.completions_api import CompletionsApi
from baton.workers.router.connections import SERVER_NAME, ConnectionLimits, LimitedAppRunner
from baton.workers.router.errors import (
    ApiError,
    backend_failure,
    bad_request,
    deadline_exceeded,
    invalid_api_key,
    model_not_found,
    no_ready_worker,
    no_room_for_choices,
)
from baton.workers.router.generation import Choice, Generation, choice_seed
from baton.workers.router.grammar import GrammarError
from baton.workers.router.output import ChoiceOutput
from baton.workers.router.params import DEFAULT_COMPLETION_MAX_TOKENS, ParsedRequest
from baton.workers.router.request_body import BodyBudget, BodyDecoder, read_body
from baton.workers.router.responses_api import ResponsesApi
from baton.workers.router.tokenization import (
    PromptTooLong,
    RouterTokenizer,
    bounded_encode,
    message_boundaries,
)
from baton.workers.router.tokenize_api import TokenizeApi

log = logging.getLogger("baton.router")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = web.RequestKey("request_id", str)
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Paths behind the API keys (the probes and /metrics stay open).
_AUTHORIZED = ("/v1/", "/tokenize", "/detokenize")


@dataclass(frozen=True)
class RouterSettings:
    served_model_name: str
    max_model_len: int
    request_timeout_s: float = 600.0
    max_queued_requests: int = 256
    api_keys_file: str | None = None
    owned_by: str = "baton"
    max_body_bytes: int = 16 * 1024**2  # larger request bodies are a 413
    stored_responses: int = 1024  # Responses API: how many previous_response_id can name
    # Request bodies being read at once hold at most this many bytes (8 maximum-size bodies
    # by default); past it a request is a 503 before its body is read.
    body_budget_bytes: int = 128 * 1024**2
    body_timeout_s: float = 60.0  # a body not in within this is a 408 (connection closed)
    # An idle keep-alive connection, or one that has not sent a complete request head,
    # closes after this long.
    keepalive_timeout_s: float = 60.0
    max_connections: int = 4096  # connections past this are closed as they are accepted
    reasoning: ReasoningSpec = field(default_factory=ReasoningSpec)  # budgets per effort


def _outcome(err: ApiError) -> str:
    if err.status == 504:
        return "timeout"
    if err.status < 500 or err.status == 503:
        return "rejected"
    return "error"


@dataclass
class PreparedPrompt:
    """A prompt ready for the workers."""

    ids: list[int]
    text: str | None  # what was tokenized (echo; the reasoning check)
    in_reasoning: bool | None  # chat: the prompt leaves `<think>` open; None: completions
    snapshot_points: tuple[int, ...] = ()  # where a later request will likely branch off it


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
        self.running = 0  # requests past their body read, not yet answered
        self.body_budget = BodyBudget(settings.body_budget_bytes)
        self._worker_ids: set[str] = set()
        # No array in a body may hold more items than the context has tokens.
        self.bodies = BodyDecoder(settings.max_model_len + 1)
        self.completions = CompletionsApi(self)
        self.responses = ResponsesApi(self)
        self.tokenize_api = TokenizeApi(self)

    # -- application -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=self.settings.max_body_bytes)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        self.completions.add_routes(app)
        self.responses.add_routes(app)
        self.tokenize_api.add_routes(app)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_page)
        app[SETTINGS] = self.settings
        app.on_response_prepare.append(self._add_request_id)
        app.on_startup.append(lambda _app: self.backend.start())
        app.on_cleanup.append(lambda _app: self.backend.close())
        app.on_cleanup.append(self._close_decoder)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        request[REQUEST_ID] = rid if _REQUEST_ID_OK.match(rid) else uuid.uuid4().hex
        try:
            if request.path.startswith(_AUTHORIZED):
                self._authorize(request)
            return await handler(request)
        except ApiError as err:
            return err.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found" if exc.status == 404 else "invalid_request_error"
            return ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}",
                            type=kind).response()
        except ConnectionError:
            raise  # the client is gone: nobody to answer
        except Exception:
            rid = request[REQUEST_ID]
            log.exception("request %s %s %s failed", rid, request.method, request.path)
            if request.writer is not None and request.writer.output_size > 0:
                raise  # an answer has begun: the connection is cut, as aiohttp does
            return ApiError(500, f"The server failed to handle the request (request id "
                            f"{rid}).", type="server_error", code="internal_error").response()

    async def _close_decoder(self, app: web.Application) -> None:
        self.bodies.close()

    async def _add_request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_NAME  # not aiohttp's name and version
        if REQUEST_ID in request:
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]

    def _authorize(self, request: web.Request) -> None:
        """The request's tenant (its API key's; one anonymous tenant without keys)."""
        if self.api_keys is None:
            request[TENANT] = ANONYMOUS
            return
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        tenant = self.api_keys.tenant(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise invalid_api_key()
        request[TENANT] = tenant

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

    # -- request preparation (shared with the Responses API) -------------------------------

    async def read_request(self, request: web.Request, parse) -> Any:
        """The body decoded and validated by parse, off the event loop (413 / 503 / 408 /
        400 first); the raw body counts in the body budget until it is decoded."""
        reservation = self.body_budget.reserve()
        try:
            raw = await read_body(request, self.settings.max_body_bytes, reservation,
                                  self.settings.body_timeout_s)
            body = await self.bodies.decode(raw)
            del raw
        finally:
            reservation.release()
        return await asyncio.to_thread(parse, body)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise model_not_found(model)

    def template_kwargs(self, parsed: ParsedRequest) -> dict[str, Any]:
        kwargs = dict(parsed.chat_template_kwargs)
        # tool_choice "none": the model is not shown the tools, so it answers in text.
        if parsed.tools and parsed.tool_choice.mode != "none":
            kwargs["tools"] = [t.template_dict() for t in parsed.tools]
        return kwargs

    async def render_chat(self, messages: list[dict], kwargs: dict[str, Any]) -> str:
        try:
            return await asyncio.to_thread(self.tokenizer.render_chat, messages, kwargs)
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as exc:
            raise bad_request(f"messages: the chat template failed: {exc}",
                              param="messages", code="invalid_value") from None

    def context_error(self, param: str, detail: str) -> ApiError:
        return bad_request(f"This model's maximum context length is "
                           f"{self.settings.max_model_len} tokens; {detail}.", param=param,
                           code="context_length_exceeded")

    async def encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        try:
            ids = await bounded_encode(self.tokenizer, text, self.settings.max_model_len,
                                       add_special_tokens)
        except PromptTooLong as exc:
            raise self.context_error(param, f"the prompt has at least {exc.at_least} tokens, "
                                     "leaving no room for output") from None
        if not ids:
            raise bad_request(f"{param}: tokenizes to no tokens", param=param,
                              code="invalid_value")
        return ids

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        if ids and max(ids) >= vocab:
            bad = next(t for t in ids if t >= vocab)
            raise bad_request(f"{param}: token id {bad} is outside the vocabulary "
                              f"(size {vocab})", param=param, code="invalid_value")

    async def _prompts(self, parsed: ParsedRequest) -> list[PreparedPrompt]:
        if parsed.endpoint == "completions":
            prompts = []
            for i, p in enumerate(parsed.prompts):
                param = "prompt" if len(parsed.prompts) == 1 else f"prompt[{i}]"
                if p.ids is not None:
                    if len(p.ids) >= self.settings.max_model_len:
                        raise self.context_error(param, f"the prompt has {len(p.ids)} tokens, "
                                                 "leaving no room for output")
                    self.check_ids(p.ids, param)
                    text = self.tokenizer.decode(p.ids) if parsed.echo else None
                    prompts.append(PreparedPrompt(p.ids, text, None))
                else:
                    ids = await self.encode(p.text, param, True)
                    prompts.append(PreparedPrompt(ids, p.text, None))
            for prompt in prompts:
                bad = [t for t in parsed.snapshot_points if t >= len(prompt.ids)]
                if bad:
                    raise bad_request(f"snapshot_points: {bad[0]} is not inside the prompt "
                                      f"({len(prompt.ids)} tokens)", param="snapshot_points",
                                      code="invalid_value")
                prompt.snapshot_points = parsed.snapshot_points
            return prompts
        kwargs = self.template_kwargs(parsed)
        text = await self.render_chat(parsed.messages, kwargs)
        ids = await self.encode(text, "messages", add_special_tokens=False)
        points = await asyncio.to_thread(message_boundaries, self.tokenizer, parsed.messages,
                                         kwargs, text, ids)
        return [PreparedPrompt(ids, text, text.rfind("<think>") > text.rfind("</think>"),
                               points)]

    def reasoning_budget(self, parsed: ParsedRequest) -> int | None:
        """The most tokens the reasoning may take: the request's thinking_token_budget, else
        its effort's budget, else the default effort's; None: unbounded."""
        if parsed.reasoning_budget is not None:
            return parsed.reasoning_budget
        effort = parsed.reasoning_effort or self.settings.reasoning.default_effort
        if effort is None or effort == "none":
            return None
        return self.settings.reasoning.budget(effort)

    async def _grammar(self, parsed: ParsedRequest, prompt: PreparedPrompt) -> str | None:
        fmt = parsed.output_format
        budget = self.reasoning_budget(parsed) if prompt.in_reasoning else None
        if (fmt is None and parsed.tool_choice.mode not in ("required", "function")
                and budget is None):
            return None
        tools_param = ("tools[{i}].function.parameters" if parsed.endpoint == "chat"
                       else "tools[{i}].parameters")

        def compile_grammar() -> str | None:
            return self.tokenizer.grammar_compiler().compile(
                fmt, parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls,
                bool(prompt.in_reasoning), tools_param, reasoning_budget=budget)

        try:
            return await asyncio.to_thread(compile_grammar)
        except GrammarError as exc:
            raise bad_request(str(exc), param=exc.param, code="invalid_schema") from None

    def _max_tokens(self, parsed: ParsedRequest, prompt_len: int) -> int:
        limit = self.settings.max_model_len
        param = "prompt" if parsed.endpoint == "completions" else "messages"
        if prompt_len >= limit:
            raise self.context_error(param, f"the prompt has {prompt_len} tokens, leaving no "
                                     "room for output")
        if parsed.max_tokens is None:
            default = DEFAULT_COMPLETION_MAX_TOKENS if parsed.endpoint == "completions" else None
            return min(default or limit, limit - prompt_len)
        if prompt_len + parsed.max_tokens > limit:
            raise self.context_error(
                "max_output_tokens" if parsed.endpoint == "responses" else "max_tokens",
                f"the prompt has {prompt_len} tokens and the request asks for "
                f"{parsed.max_tokens} more")
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

    async def _choices(self, parsed: ParsedRequest, client_request_id: str,
                       salt: bytes = b"") -> list[Choice]:
        prompts = await self._prompts(parsed)
        vocab = self.tokenizer.vocab_size
        sp = parsed.sampling
        if any(t >= vocab for t in sp.stop_token_ids):
            raise bad_request(f"stop_token_ids: ids must be below the vocabulary size "
                              f"{vocab}, got {sp.stop_token_ids}",
                              param="stop_token_ids", code="invalid_value")
        outside = sorted(t for t in sp.logit_bias if t >= vocab)
        if outside:
            raise bad_request(f"logit_bias: token {outside[0]} is outside the vocabulary "
                              f"(size {vocab})", param="logit_bias", code="invalid_value")
        budgets = [self._max_tokens(parsed, len(p.ids)) for p in prompts]
        if sp.min_tokens > min(budgets):
            raise bad_request(f"min_tokens: {sp.min_tokens} is more than the {min(budgets)} "
                              "tokens this request may generate (max_tokens / the context)",
                              param="min_tokens", code="invalid_value")
        grammar = await self._grammar(parsed, prompts[0])
        functions = ({t.name: t.parameters for t in parsed.tools}
                     if parsed.tools and parsed.tool_choice.parses_calls else None)
        one_call = not parsed.parallel_tool_calls or parsed.tool_choice.mode == "function"
        max_calls = 1 if one_call else parsed.max_tool_calls
        deadline = time.time() + self.settings.request_timeout_s
        choices = []
        for p_index, (prompt, budget) in enumerate(zip(prompts, budgets)):
            # n > 1: the choices share a cache key, so a prefix cache serves their prompt.
            cache_key = parsed.cache_key or (f"{client_request_id}/{p_index}"
                                             if parsed.n > 1 else None)
            for j in range(parsed.n):
                sampling = replace(sp, max_tokens=budget, seed=choice_seed(sp.seed, j),
                                   grammar=grammar or "")
                gen = GenerationRequest(
                    request_id=self._worker_request_id(client_request_id),
                    prompt_ids=tuple(prompt.ids), sampling=sampling, deadline=deadline,
                    cache_key=cache_key, snapshot_points=prompt.snapshot_points,
                    cache_salt=salt)
                output = ChoiceOutput(self.tokenizer, prompt.ids, stop=sp.stop,
                                      reasoning=prompt.in_reasoning, tools=functions,
                                      max_tool_calls=max_calls)
                choices.append(Choice(index=len(choices), prompt_index=p_index, gen=gen,
                                      output=output,
                                      echo=prompt.text if parsed.echo else ""))
        return choices

    async def _open(self, gen: GenerationRequest):
        """One choice's backend stream up to its first token (NoCapacity: no room now)."""
        stream = self.backend.generate(gen)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise WorkerFailure("the workers returned no token") from None
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def _open_later(self, gen: GenerationRequest, n: int):
        """A choice after the first, opened as the request is admitted: no room for it
        refuses the whole request (429) before anything is streamed."""
        try:
            return await self._open(gen)
        except NoCapacity:
            raise no_room_for_choices(n, self.queue.retry_after_s) from None
        except NoReadyWorker as exc:
            raise WorkerFailure(f"no ready {exc.role} worker for another choice") from None

    def _token_name(self, parsed: ParsedRequest):  # logprob entries' token strings
        if parsed.tokens_as_ids:
            return lambda t: f"token_id:{t}"
        return lambda t: self.tokenizer.decode([t])

    async def start(self, request: web.Request, parsed: ParsedRequest,
                    t_arrival: float) -> Generation:
        """Choice 0 open up to its first token; ApiError for anything before that."""
        self.check_model(parsed.model)
        choices = await self._choices(parsed, request[REQUEST_ID],
                                      cache_salt(tenant_of(request), parsed.cache_salt))

        def open_choice(gen: GenerationRequest):
            return self._open(gen) if gen is choices[0].gen \
                else self._open_later(gen, len(choices))

        generation = Generation(request[REQUEST_ID], choices, open_choice, self.metrics,
                                parsed.sampling.logprobs, self._token_name(parsed),
                                on_freed=self.queue.freed)
        request[_GENERATION] = generation
        timeout_s = self.settings.request_timeout_s
        # A request weighs its choices times its tokens (the prompt and what it may generate).
        cost = sum(len(c.gen.prompt_ids) + c.gen.sampling.max_tokens for c in choices)
        deadline = choices[0].gen.deadline
        try:
            self.backend.check_ready()
            # The deadline covers the wait in the queue and the prefill up to the first token.
            await asyncio.wait_for(
                self.queue.admit(lambda: generation.open(t_arrival), deadline,
                                 tenant_of(request), parsed.priority, cost),
                max(0.0, deadline - time.time()))
            request[_ADMITTED] = True
        except NoReadyWorker as exc:
            raise no_ready_worker(exc.role) from None
        except asyncio.TimeoutError:
            raise deadline_exceeded(timeout_s) from None
        except WorkerFailure as exc:
            raise backend_failure(str(exc)) from None
        return generation

    async def serve(self, request: web.Request, parse, respond) -> web.StreamResponse:
        """One generation request from body to answer, with its outcome counted.

        respond(generation, parsed) -> (response, outcome) writes the answer.
        """
        t_arrival = time.monotonic()
        generation: Generation | None = None
        outcome = "error"
        running = False
        try:
            try:
                parsed = await self.read_request(request, parse)
                # Running from here: a connection still sending its body is no load on the
                # workers (baton_requests_running feeds the autoscaler).
                self.running += 1
                running = True
                generation = await self.start(request, parsed, t_arrival)
            except ApiError as err:
                outcome = _outcome(err)
                return err.response()
            response, outcome = await respond(request, generation, parsed)
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
            if running:
                self.running -= 1
            generation = request.get(_GENERATION)
            if generation is not None:
                for c in generation.choices:
                    self._worker_ids.discard(c.gen.request_id)
            # Counted before the await below: a cancellation landing there (the client closed
            # as the answer ended) must not lose the count.
            self.metrics.request_finished(outcome)
            log.info("request %s %s %s: %d prompt + %d completion tokens in %.3f s",
                     request[REQUEST_ID], request.path, outcome,
                     generation.usage()["prompt_tokens"] if generation is not None else 0,
                     generation.completion_tokens if generation is not None else 0,
                     time.monotonic() - t_arrival)
            try:
                if generation is not None:
                    # Closing the backend's streams cancels whatever the workers still do for
                    # them (shielded: it completes even if this handler is being cancelled).
                    await asyncio.shield(generation.close())
            finally:
                if request.get(_ADMITTED):  # its slots are free now: one waiter each
                    self.queue.release(tenant_of(request),
                                       len(generation.choices) - generation.freed)

_GENERATION = web.RequestKey("generation", Generation)
_ADMITTED = web.RequestKey("admitted", bool)
SETTINGS = web.AppKey("router_settings", RouterSettings)


async def start_site(app: web.Application, host: str, port: int,
                     shutdown_timeout_s: float = 60.0) -> tuple[web.AppRunner, int]:
    """Serve app on host:port (0 = any free port); returns the runner and the bound port.

    handler_cancellation: a client that goes away cancels its handler, which closes the
    backend stream and so frees the request's slots on both workers at once.
    shutdown_timeout_s: at runner.cleanup() the listener closes at once and requests in
    flight get this long to finish (a router pod's termination grace covers one deadline).
    Connection limits: the router's settings (RouterSettings keepalive_timeout_s,
    max_connections) when app is a Router's.
    """
    settings = app.get(SETTINGS)
    limits = ConnectionLimits() if settings is None else ConnectionLimits(
        keepalive_timeout_s=settings.keepalive_timeout_s,
        max_connections=settings.max_connections)
    runner = LimitedAppRunner(app, limits, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=shutdown_timeout_s)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
