"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request's `input` and `instructions` become one chat conversation (responses_request.py),
rendered by the same chat template and generated like a chat completion (n = 1); its output
becomes output items, in
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
import copy
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from baton.workers.router.auth import tenant_of
from baton.workers.router.backend import WorkerFailure
from baton.workers.router.bodies import sse
from baton.workers.router.errors import (
    ApiError,
    backend_failure,
    deadline_exceeded,
)
from baton.workers.router.generation import Generation
from baton.workers.router.output import Delta
from baton.workers.router.responses_request import ResponsesRequest, new_id, parse_responses

if TYPE_CHECKING:
    from baton.workers.router.server import Router

log = logging.getLogger("baton.router")

class ResponseStore:
    """The last `capacity` stored responses with their conversations (thread-safe: requests
    are parsed off the event loop). Each belongs to the tenant (API key) that made it: another
    tenant finds it no more than one that was never stored."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], tuple[dict, list[dict]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, owner: str, response: dict, conversation: list[dict]) -> None:
        if self.capacity <= 0:
            return
        key = (owner, response["id"])
        with self._lock:
            self._items[key] = (response, conversation)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, owner: str, response_id: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            found = self._items.get((owner, response_id))
            if found is not None:
                self._items.move_to_end((owner, response_id))
            return found

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            return self._items.pop((owner, response_id), None) is not None

    def owned_by(self, owner: str) -> OwnedResponses:
        return OwnedResponses(self, owner)


class OwnedResponses:
    """One tenant's view of the store: what a request's previous_response_id may find."""

    def __init__(self, store: ResponseStore, owner: str) -> None:
        self.store, self.owner = store, owner
        self.capacity = store.capacity

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        return self.store.get(self.owner, response_id)


# -- output items ------------------------------------------------------------------------------


class OutputItems:
    """The response's output items, built delta by delta; every change as OpenAI's streaming
    events (a non-streamed response keeps only the items)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._kind: str | None = None  # of the open item: reasoning | message | function_call
        self._pieces: list[str] = []  # the open item's text / arguments so far

    def _item_event(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "output_index": len(self.items) - 1,
                "item": copy.deepcopy(self.items[-1])}

    def _part_key(self) -> str:
        return "reasoning_text" if self._kind == "reasoning" else "output_text"

    def _open(self, kind: str, delta: Delta) -> list[dict[str, Any]]:
        events = self._close("completed")
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [],
                    "status": "in_progress"}
        elif kind == "message":
            item = {"type": "message", "id": new_id("msg"), "status": "in_progress",
                    "role": "assistant", "content": []}
        else:
            call = delta.tool_call
            item = {"type": "function_call", "id": new_id("fc"), "call_id": call.id,
                    "name": call.name, "arguments": "", "status": "in_progress"}
        self.items.append(item)
        self._kind = kind
        self._pieces = []
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
                self._pieces.append(delta.tool_call.arguments)
                events.append({"type": "response.function_call_arguments.delta", **where,
                               "delta": delta.tool_call.arguments})
            return events
        text = delta.reasoning or delta.content
        self._pieces.append(text)
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
            item["arguments"] = "".join(self._pieces)
            events.append({"type": "response.function_call_arguments.done", **where,
                           "name": item["name"], "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            part["text"] = "".join(self._pieces)
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
        found = self.store.get(tenant_of(request).name, response_id)
        if found is None:
            raise self._not_found(response_id)
        return web.json_response(found[0])

    async def delete(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        if not self.store.delete(tenant_of(request).name, response_id):
            raise self._not_found(response_id)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def create(self, request: web.Request) -> web.StreamResponse:
        owned = self.store.owned_by(tenant_of(request).name)
        return await self.router.serve(request, lambda b: parse_responses(b, owned),
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

    def _store(self, request: web.Request, req: ResponsesRequest, body: dict,
               items: OutputItems) -> None:
        if req.store:
            self.store.put(tenant_of(request).name, body,
                           [*req.history, items.conversation_turn()])

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
            return err.response(), "timeout"
        except WorkerFailure as exc:
            err = backend_failure(str(exc))
            return err.response(), "error"
        status = _status(generation)
        items.finish(status)
        body = self._response(req, status, items.items, generation, created,
                              error=_error(generation))
        self._store(request, req, body, items)
        return web.json_response(body), "success" if status != "failed" else "error"

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
                error = _error(generation)
                if error is not None:
                    outcome = "error"
                    await send({"type": "error", "code": error["code"],
                                "message": error["message"], "param": None})
                body = self._response(req, status, items.items, generation, created,
                                      error=error)
                self._store(request, req, body, items)
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
    reason = generation.choices[0].finish_reason
    return {"length": "incomplete", "error": "failed"}.get(reason, "completed")


def _error(generation: Generation) -> dict[str, Any] | None:
    """The Response's error: the grammar refused a sampled token (status failed)."""
    error = generation.choices[0].error
    return None if error is None else {"code": "server_error", "message": error["message"]}
