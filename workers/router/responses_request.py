"""A /v1/responses request as the chat it amounts to (responses_api.py serves it).

`input` (a string, or items: messages, function_call, function_call_output, reasoning) and
`instructions` become chat messages for the model's template: the items of one assistant turn
(its reasoning, output text and function calls) become one assistant message, tool results
tool messages, `developer` the system role; `instructions` are the system message (not
carried over by previous_response_id, as OpenAI does). Flat function tools, tool_choice,
text.format (like chat's response_format) and reasoning.effort ("none": thinking off) map to
the chat request's fields. Every problem is a 400 naming the field (input[i]...).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from baton.workers.router.errors import bad_request, invalid_type
from baton.workers.router.params import (
    SAMPLING_FIELDS,
    THINKING_BUDGET_FIELD,
    ParsedRequest,
    bool_field,
    check_known,
    int_field,
    optional_field,
    parse_output_format,
    parse_reasoning,
    require_object,
    sampling_params,
    text_content,
)
from baton.workers.router.tools import arguments_mapping, parse_tool_choice, parse_tools

if TYPE_CHECKING:
    from baton.workers.router.responses_api import OwnedResponses

_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
    "metadata", "text", "reasoning", "user", "truncation", "include", "service_tier",
    "background", "prompt_cache_key", "safety_identifier", "max_tool_calls", "top_logprobs",
    "stream_options", "chat_template_kwargs", THINKING_BUDGET_FIELD,
}) | SAMPLING_FIELDS
_ROLES = ("user", "system", "developer", "assistant")


def new_id(prefix: str) -> str:
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


def _reasoning_text(i: int, item: dict) -> str:
    parts = item.get("content") or item.get("summary") or []
    if not isinstance(parts, list):
        raise invalid_type(f"input[{i}].content", parts, "a list of reasoning_text parts")
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise invalid_type(f"input[{i}].content[{j}]", part, "{'type': 'reasoning_text', "
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
            raise invalid_type(where, item, "an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(f"{where}.role: must be one of {', '.join(_ROLES)}, got "
                                  f"{role!r:.80}", param=f"{where}.role", code="invalid_value")
            if "content" not in item:
                raise bad_request(f"{where}.content: required", param=f"{where}.content",
                                  code="missing_required_parameter")
            text = text_content(f"{where}.content", item["content"])
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
                raise invalid_type(f"{where}.name", name, "a function name")
            if not isinstance(call_id, str) or not call_id:
                raise invalid_type(f"{where}.call_id", call_id, "a string")
            assistant().setdefault("tool_calls", []).append({
                "id": call_id, "type": "function", "function": {
                    "name": name,
                    "arguments": arguments_mapping(item.get("arguments"),
                                                   f"{where}.arguments")}})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid_type(f"{where}.call_id", call_id, "a string")
            output = item.get("output")
            if output is None:
                raise bad_request(f"{where}.output: required", param=f"{where}.output",
                                  code="missing_required_parameter")
            turn = None
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": text_content(f"{where}.output", output)})
        else:
            raise bad_request(f"{where}.type: supported items are message, reasoning, "
                              f"function_call and function_call_output, got {kind!r:.80}",
                              param=f"{where}.type", code="unsupported_value")
    return messages


def parse_responses(body: Any, store: OwnedResponses) -> ResponsesRequest:
    """Validate a POST /v1/responses body (blocking: it may read the store)."""
    body = require_object(body)
    check_known(body, _FIELDS)
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid_type("model", model, "a string")
    req = ResponsesRequest(endpoint="responses", model=model, response_id=new_id("resp"))
    for name, neutral in (("background", (False,)), ("truncation", ("disabled",)),
                          ("top_logprobs", (0,))):
        v = body.get(name)
        if v is not None and v not in neutral:
            raise bad_request(f"{name}: {v!r:.80} is not supported", param=name,
                              code="unsupported_value")
    req.max_tokens = int_field(body, "max_output_tokens", 1)
    req.sampling = sampling_params(body)
    req.stream = bool_field(body, "stream")
    req.store = bool_field(body, "store", default=True)
    cache_key = req.cache_key = optional_field(body, "prompt_cache_key", str)
    instructions = req.instructions = optional_field(body, "instructions", str)
    metadata = optional_field(body, "metadata", dict)
    optional_field(body, "user", str)
    text = optional_field(body, "text", dict)
    req.output_format = parse_output_format((text or {}).get("format"), "text.format",
                                            flat=True)
    reasoning = optional_field(body, "reasoning", dict)
    req.chat_template_kwargs = dict(optional_field(body, "chat_template_kwargs", dict) or {})
    parse_reasoning(req, (reasoning or {}).get("effort"), body, "reasoning.effort")
    req.tools = parse_tools(body.get("tools"))
    req.tool_choice = parse_tool_choice(body.get("tool_choice"), req.tools)
    req.parallel_tool_calls = bool_field(body, "parallel_tool_calls", default=True)
    max_tool_calls = req.max_tool_calls = int_field(body, "max_tool_calls", 1)
    if req.output_format is not None and req.tool_choice.mode in ("required", "function"):
        raise bad_request("text.format: a tool_choice that forces a call leaves no answer to "
                          "format", param="text.format", code="invalid_value")
    previous = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        if not isinstance(previous, str):
            raise invalid_type("previous_response_id", previous, "a string")
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
