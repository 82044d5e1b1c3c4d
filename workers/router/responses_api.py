"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request's `input` (a string, or items: messages, function_call, function_call_output,
reasoning) and `instructions` become one chat conversation, rendered by the same chat
template and generated like a chat completion (n = 1); its output becomes output items, in
the order the model wrote them: a `reasoning` item (the `<think>` part), `message` items
(output_text) and `function_call` items (call_id, name, arguments). Function tools are the
flat `{"type": "function", "name", "parameters"}`; `text.format` json_schema / json_object
constrain the answer like chat's response_format; `reasoning.effort` "none" turns thinking
off (chat_template_kwargs are taken as well).

Streaming sends OpenAI's events: response.created, response.in_progress, then per item
response.output_item.added, response.content_part.added, response.output_text.delta /
response.reasoning_text.delta / response.function_call_arguments.delta, the matching .done
events, response.output_item.done, and finally response.completed (response.incomplete when
max_output_tokens cut it; an `error` event and response.failed when the workers failed).
A non-streamed response is built from the same item sequence, so both agree.

`store` (default true) keeps the finished response, with the conversation it ended, in this
router's memory (a bounded LRU of RouterSettings.stored_responses): GET returns it, DELETE
drops it, and `previous_response_id` continues its conversation (its instructions are not
carried over, as OpenAI does). A response stored by another router replica, evicted, or made
with store false is not found: previous_response_id is then a 400 saying so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from baton.workers.router.backend import WorkerFailure
from baton.workers.router.bodies import sse
from baton.workers.router.errors import (
    ApiError,
    backend_failure,
    bad_request,
    deadline_exceeded,
)
from baton.workers.router.generation import Generation
from baton.workers.router.output import Delta
from baton.workers.router.params import (
    ParsedRequest,
    _bool,
    _check_known,
    _fail_type,
    _int,
    _require_object,
    _text_content,
    parse_output_format,
    sampling_params,
)
from baton.workers.router.tools import arguments_mapping, parse_tool_choice, parse_tools

if TYPE_CHECKING:
    from baton.workers.router.server import Router

log = logging.getLogger("baton.router")

_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
    "metadata", "text", "reasoning", "user", "truncation", "include", "service_tier",
    "background", "prompt_cache_key", "safety_identifier", "max_tool_calls", "top_logprobs",
    "stream_options", "seed", "top_k", "chat_template_kwargs",
})
_ROLES = ("user", "system", "developer", "assistant")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponsesRequest(ParsedRequest):
    """A validated /v1/responses request: the chat it amounts to, and what its response
    object echoes back."""

    response_id: str = ""
    instructions: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # stored: without instructions
    echo_fields: dict[str, Any] = field(default_factory=dict)


class ResponseStore:
    """The last `capacity` stored responses with their conversations (thread-safe: requests
    are parsed off the event loop)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[response["id"]] = (response, conversation)
            self._items.move_to_end(response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            found = self._items.get(response_id)
            if found is not None:
                self._items.move_to_end(response_id)
            return found

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None


# -- input items -> chat messages ---------------------------------------------------------------


def _reasoning_text(i: int, item: dict) -> str:
    parts = item.get("content") or item.get("summary") or []
    if not isinstance(parts, list):
        raise _fail_type(f"input[{i}].content", parts, "a list of reasoning_text parts")
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise _fail_type(f"input[{i}].content[{j}]", part, "{'type': 'reasoning_text', "
                             "'text': ...}")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """The chat messages of a Responses `input` (items of one assistant turn -- reasoning,
    output text, function calls -- become one assistant message, as the template renders
    it)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input: expected a string or a non-empty list of items",
                          param="input", code="invalid_value")
    messages: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant turn being assembled

    def assistant(starts_with_reasoning: bool = False) -> dict[str, Any]:
        nonlocal turn
        if turn is None or (starts_with_reasoning and (turn["content"] or turn.get(
                "tool_calls") or "reasoning_content" in turn)):
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _fail_type(where, item, "an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(f"{where}.role: must be one of {', '.join(_ROLES)}, got "
                                  f"{role!r:.80}", param=f"{where}.role", code="invalid_value")
            if "content" not in item:
                raise bad_request(f"{where}.content: required", param=f"{where}.content",
                                  code="missing_required_parameter")
            text = _text_content(f"{where}.content", item["content"])
            if role == "assistant":
                message = assistant()
                message["content"] += text
            else:
                turn = None
                messages.append({"role": "system" if role == "developer" else role,
                                 "content": text})
        elif kind == "reasoning":
            assistant(starts_with_reasoning=True)["reasoning_content"] = _reasoning_text(i, item)
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name:
                raise _fail_type(f"{where}.name", name, "a function name")
            if not isinstance(call_id, str) or not call_id:
                raise _fail_type(f"{where}.call_id", call_id, "a string")
            assistant().setdefault("tool_calls", []).append({
                "id": call_id, "type": "function", "function": {
                    "name": name,
                    "arguments": arguments_mapping(item.get("arguments"),
                                                   f"{where}.arguments")}})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _fail_type(f"{where}.call_id", call_id, "a string")
            output = item.get("output")
            if output is None:
                raise bad_request(f"{where}.output: required", param=f"{where}.output",
                                  code="missing_required_parameter")
            turn = None
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text_content(f"{where}.output", output)})
        else:
            raise bad_request(f"{where}.type: supported items are message, reasoning, "
                              f"function_call and function_call_output, got {kind!r:.80}",
                              param=f"{where}.type", code="unsupported_value")
    return messages


def parse_responses(body: Any, store: ResponseStore) -> ResponsesRequest:
    """Validate a POST /v1/responses body (blocking: it may read the store)."""
    body = _require_object(body)
    _check_known(body, _FIELDS)
    model = body.get("model")
    if not isinstance(model, str):
        raise _fail_type("model", model, "a string")
    req = ResponsesRequest(endpoint="responses", model=model, response_id=_new_id("resp"))
    for name, neutral in (("background", (False,)), ("truncation", ("disabled",)),
                          ("top_logprobs", (0,))):
        v = body.get(name)
        if v is not None and v not in neutral:
            raise bad_request(f"{name}: {v!r:.80} is not supported", param=name,
                              code="unsupported_value")
    req.max_tokens = _int(body, "max_output_tokens", 1)
    req.sampling = sampling_params(body)
    req.stream = _bool(body, "stream")
    req.store = _bool(body, "store", default=True)
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None and not isinstance(cache_key, str):
        raise _fail_type("prompt_cache_key", cache_key, "a string")
    req.cache_key = cache_key
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _fail_type("instructions", instructions, "a string")
    req.instructions = instructions
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _fail_type("metadata", metadata, "an object")
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise _fail_type("text", text, "an object")
    req.output_format = parse_output_format((text or {}).get("format"), "text.format",
                                            flat=True)
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _fail_type("reasoning", reasoning, "an object")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _fail_type("chat_template_kwargs", kwargs, "an object")
    req.chat_template_kwargs = dict(kwargs or {})
    if (reasoning or {}).get("effort") == "none":
        req.chat_template_kwargs.setdefault("enable_thinking", False)
    req.tools = parse_tools(body.get("tools"))
    req.tool_choice = parse_tool_choice(body.get("tool_choice"), req.tools)
    req.parallel_tool_calls = _bool(body, "parallel_tool_calls", default=True)
    max_tool_calls = _int(body, "max_tool_calls", 1)
    if max_tool_calls == 1:
        req.parallel_tool_calls = False
    if req.output_format is not None and req.tool_choice.mode in ("required", "function"):
        raise bad_request("text.format: a tool_choice that forces a call leaves no answer to "
                          "format", param="text.format", code="invalid_value")
    previous = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        if not isinstance(previous, str):
            raise _fail_type("previous_response_id", previous, "a string")
        found = store.get(previous)
        if found is None:
            raise bad_request(
                f"previous_response_id: no stored response {previous!r:.80}. This router "
                f"keeps the last {store.capacity} responses made with store true, in its own "
                "memory (not those of other router replicas, and not across restarts); send "
                "the conversation as input items instead.", param="previous_response_id",
                code="previous_response_not_found")
        history = list(found[1])
    req.previous_response_id = previous
    if "input" not in body:
        raise bad_request("input: required", param="input", code="missing_required_parameter")
    req.history = history + input_messages(body["input"])
    system = [{"role": "system", "content": instructions}] if instructions else []
    req.messages = system + req.history
    req.echo_fields = {
        "instructions": instructions, "max_output_tokens": req.max_tokens,
        "metadata": metadata or {}, "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": previous, "reasoning": {
            "effort": (reasoning or {}).get("effort"), "summary": None},
        "store": req.store, "temperature": req.sampling.temperature,
        "top_p": req.sampling.top_p,
        "text": {"format": (text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or ("auto" if req.tools else "none"),
        "tools": [{"type": "function", "name": t.name, "description": t.description,
                   "parameters": dict(t.parameters), "strict": t.strict} for t in req.tools],
        "truncation": "disabled", "user": body.get("user"),
        "prompt_cache_key": cache_key, "max_tool_calls": max_tool_calls,
    }
    return req


# -- output items ------------------------------------------------------------------------------


class OutputItems:
    """The response's output items, built delta by delta; every change as OpenAI's streaming
    events (a non-streamed response keeps only the items)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._kind: str | None = None  # of the open item: reasoning | message | function_call
        self._call_index = -1

    def _item_event(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "output_index": len(self.items) - 1,
                "item": json.loads(json.dumps(self.items[-1]))}

    def _part_key(self) -> str:
        return "reasoning_text" if self._kind == "reasoning" else "output_text"

    def _open(self, kind: str, delta: Delta) -> list[dict[str, Any]]:
        events = self._close("completed")
        if kind == "reasoning":
            item = {"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": [],
                    "status": "in_progress"}
        elif kind == "message":
            item = {"type": "message", "id": _new_id("msg"), "status": "in_progress",
                    "role": "assistant", "content": []}
        else:
            call = delta.tool_call
            item = {"type": "function_call", "id": _new_id("fc"), "call_id": call.id,
                    "name": call.name, "arguments": "", "status": "in_progress"}
        self.items.append(item)
        self._kind = kind
        events.append(self._item_event("response.output_item.added"))
        if kind != "function_call":
            part = ({"type": "reasoning_text", "text": ""} if kind == "reasoning" else
                    {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            item["content"].append(part)
            events.append({"type": "response.content_part.added", "item_id": item["id"],
                           "output_index": len(self.items) - 1, "content_index": 0,
                           "part": dict(part)})
        return events

    def add(self, delta: Delta) -> list[dict[str, Any]]:
        kind = ("reasoning" if delta.reasoning else "message" if delta.content
                else "function_call")
        events = []
        starts_call = kind == "function_call" and delta.tool_call.id is not None
        if kind != self._kind or starts_call:
            events += self._open(kind, delta)
        item = self.items[-1]
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        if kind == "function_call":
            if delta.tool_call.arguments:
                item["arguments"] += delta.tool_call.arguments
                events.append({"type": "response.function_call_arguments.delta", **where,
                               "delta": delta.tool_call.arguments})
            return events
        text = delta.reasoning or delta.content
        item["content"][0]["text"] += text
        if kind == "reasoning":
            events.append({"type": "response.reasoning_text.delta", **where,
                           "content_index": 0, "delta": text})
        else:
            events.append({"type": "response.output_text.delta", **where, "content_index": 0,
                           "delta": text, "logprobs": []})
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        if self._kind is None:
            return []
        item = self.items[-1]
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        events = []
        if self._kind == "function_call":
            events.append({"type": "response.function_call_arguments.done", **where,
                           "name": item["name"], "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            done = ("response.reasoning_text.done" if self._kind == "reasoning"
                    else "response.output_text.done")
            extra = {} if self._kind == "reasoning" else {"logprobs": []}
            events.append({"type": done, **where, "content_index": 0, "text": part["text"],
                           **extra})
            events.append({"type": "response.content_part.done", **where, "content_index": 0,
                           "part": dict(part)})
        item["status"] = status
        events.append(self._item_event("response.output_item.done"))
        self._kind = None
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        return self._close(status)

    def conversation_turn(self) -> dict[str, Any]:
        """The output as the assistant message a later previous_response_id continues."""
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        for item in self.items:
            if item["type"] == "reasoning":
                message["reasoning_content"] = item["content"][0]["text"]
            elif item["type"] == "message":
                message["content"] += item["content"][0]["text"]
            else:
                message.setdefault("tool_calls", []).append({
                    "id": item["call_id"], "type": "function", "function": {
                        "name": item["name"], "arguments": json.loads(item["arguments"])}})
        return message


class ResponsesApi:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.store = ResponseStore(router.settings.stored_responses)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.create)
        app.router.add_get("/v1/responses/{response_id}", self.retrieve)
        app.router.add_delete("/v1/responses/{response_id}", self.delete)

    def _not_found(self, response_id: str) -> ApiError:
        return ApiError(404, f"No stored response {response_id!r:.80} (this router keeps the "
                        f"last {self.store.capacity} made with store true).",
                        param="response_id", code="response_not_found", type="not_found")

    async def retrieve(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        found = self.store.get(response_id)
        if found is None:
            raise self._not_found(response_id)
        return web.json_response(found[0])

    async def delete(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        if not self.store.delete(response_id):
            raise self._not_found(response_id)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def create(self, request: web.Request) -> web.StreamResponse:
        return await self.router.serve(request, lambda b: parse_responses(b, self.store),
                                       self._respond)

    def _response(self, req: ResponsesRequest, status: str, items: list[dict],
                  generation: Generation | None, created: int,
                  error: dict | None = None) -> dict[str, Any]:
        usage = None
        if generation is not None and status != "in_progress":
            u = generation.usage()
            usage = {"input_tokens": u["prompt_tokens"],
                     "input_tokens_details": {
                         "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                         "cache_write_tokens": 0},
                     "output_tokens": u["completion_tokens"],
                     "output_tokens_details": {
                         "reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]},
                     "total_tokens": u["total_tokens"]}
        body = {"id": req.response_id, "object": "response", "created_at": created,
                "status": status, "model": self.router.settings.served_model_name,
                "output": items, "usage": usage, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                **req.echo_fields}
        if status in ("completed", "incomplete"):
            body["completed_at"] = int(time.time())
        return body

    def _store(self, req: ResponsesRequest, body: dict, items: OutputItems) -> None:
        if req.store:
            self.store.put(body, [*req.history, items.conversation_turn()])

    async def _respond(self, request: web.Request, generation: Generation,
                       req: ResponsesRequest) -> tuple[web.StreamResponse, str]:
        created = int(time.time())
        if req.stream:
            return await self._stream(request, generation, req, created)
        items = OutputItems()
        try:
            async for event in generation.events():
                for d in event.deltas:
                    items.add(d)
        except asyncio.TimeoutError:
            err = deadline_exceeded(self.router.settings.request_timeout_s)
            return web.json_response(err.body(), status=err.status), "timeout"
        except WorkerFailure as exc:
            err = backend_failure(str(exc))
            return web.json_response(err.body(), status=err.status), "error"
        status = _status(generation)
        items.finish(status)
        body = self._response(req, status, items.items, generation, created)
        self._store(req, body, items)
        return web.json_response(body), "success"

    async def _stream(self, request: web.Request, generation: Generation,
                      req: ResponsesRequest, created: int) -> tuple[web.StreamResponse, str]:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        sequence = 0

        async def send(event: dict[str, Any]) -> None:
            nonlocal sequence
            event["sequence_number"] = sequence
            sequence += 1
            await response.write(f"event: {event['type']}\n".encode() + sse(event))

        items = OutputItems()
        outcome = "success"
        try:
            opening = self._response(req, "in_progress", [], None, created)
            await send({"type": "response.created", "response": opening})
            await send({"type": "response.in_progress", "response": opening})
            try:
                async for event in generation.events():
                    for d in event.deltas:
                        for e in items.add(d):
                            await send(e)
                status = _status(generation)
                for e in items.finish(status):
                    await send(e)
                body = self._response(req, status, items.items, generation, created)
                self._store(req, body, items)
                await send({"type": f"response.{status}", "response": body})
            except (asyncio.TimeoutError, WorkerFailure) as exc:
                outcome = "timeout" if isinstance(exc, asyncio.TimeoutError) else "error"
                err = (deadline_exceeded(self.router.settings.request_timeout_s)
                       if outcome == "timeout" else backend_failure(str(exc)))
                await send({"type": "error", "code": err.code, "message": err.message,
                            "param": None})
                for e in items.finish("incomplete"):
                    await send(e)
                failed = self._response(req, "failed", items.items, generation, created,
                                        error={"code": "server_error", "message": err.message})
                await send({"type": "response.failed", "response": failed})
            generation.delivered = outcome == "success"
            await response.write_eof()
        except ConnectionResetError:
            log.debug("request %s: the client disconnected mid-stream", req.response_id)
            return response, "cancelled"
        return response, outcome


def _status(generation: Generation) -> str:
    return "incomplete" if generation.choices[0].finish_reason == "length" else "completed"
