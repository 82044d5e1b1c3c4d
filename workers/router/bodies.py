"""OpenAI response bodies for /v1/chat/completions and /v1/completions, streamed or not.

The one place these bodies are shaped. Both endpoints read the same ChoiceEvents
(generation.py): a streamed answer turns each event into chunks as it comes, a non-streamed
one collects them (`Collected`, the folded Message plus logprob entries) and shapes the
whole body at the end.

Chat deltas: `content`, `reasoning_content` (the `<think>` part) and `tool_calls` (a call's
first delta: index, id, type and name with empty arguments; then argument fragments).
A token's logprob entry rides on its first chunk (or on an empty one when the token settled
no text yet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from baton.workers.router.generation import ChoiceEvent
from baton.workers.router.output import Delta, Message


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        token_logprobs.append(e["logprob"])
        top.append({t: lp for t, lp in e["top"]} if e["top"] else None)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def chat_logprob(e: dict[str, Any]) -> dict[str, Any]:
    def item(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    entry = item(e["token"], e["logprob"])
    entry["top_logprobs"] = [item(t, lp) for t, lp in e["top"]]
    return entry


@dataclass
class Collected:
    """A choice's events folded: what a non-streamed body returns."""

    message: Message = field(default_factory=Message)
    entries: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    error: dict[str, Any] | None = None

    def add(self, event: ChoiceEvent) -> None:
        for d in event.deltas:
            self.message.add(d)
        if event.entry is not None:
            self.entries.append(event.entry)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error


def chat_message(message: Message) -> dict[str, Any]:
    content, calls = message.content, message.tool_calls
    body: dict[str, Any] = {
        "role": "assistant",
        # OpenAI's content is null beside tool calls when the model wrote nothing else.
        "content": content if content or not calls else None,
        "reasoning_content": message.reasoning,
    }
    if calls:
        body["tool_calls"] = calls
    return body


def _chat_delta(d: Delta) -> dict[str, Any]:
    if d.reasoning:
        return {"reasoning_content": d.reasoning}
    if d.tool_call is not None:
        call = d.tool_call
        if call.id is not None:
            piece = {"index": call.index, "id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
        else:
            piece = {"index": call.index, "function": {"arguments": call.arguments}}
        return {"tool_calls": [piece]}
    return {"content": d.content}


class ChatBodies:
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def chunk_choices(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        deltas = event.deltas or ([Delta(content="")] if event.entry is not None else [])
        out = []
        for k, d in enumerate(deltas):
            logprobs = None
            if k == 0 and event.entry is not None:
                logprobs = {"content": [chat_logprob(event.entry)]}
            out.append({"index": event.index, "delta": _chat_delta(d), "logprobs": logprobs,
                        "finish_reason": None})
        return out

    def closing(self, index: int, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    def choice(self, index: int, c: Collected) -> dict[str, Any]:
        return {"index": index, "message": chat_message(c.message),
                "logprobs": {"content": [chat_logprob(e) for e in c.entries]}
                if self.logprobs else None,
                "finish_reason": c.finish_reason, **_error(c)}


def _error(c: Collected) -> dict[str, Any]:
    """A choice that ended in an error (finish_reason "error") says which."""
    return {"error": c.error} if c.error is not None else {}


class CompletionBodies:
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def chunk_choices(self, event: ChoiceEvent) -> list[dict[str, Any]]:
        text = "".join(d.content for d in event.deltas)
        if not text and event.entry is None:
            return []
        logprobs = None
        if event.entry is not None:
            offset = self._offsets.get(event.index, 0)
            logprobs = completion_logprobs([event.entry], offset)
            self._offsets[event.index] = offset + len(event.entry["token"])
        return [{"index": event.index, "text": text, "logprobs": logprobs,
                 "finish_reason": None}]

    def closing(self, index: int, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}

    def choice(self, index: int, c: Collected) -> dict[str, Any]:
        return {"index": index, "text": c.message.content,
                "logprobs": completion_logprobs(c.entries, 0) if self.logprobs else None,
                "finish_reason": c.finish_reason, **_error(c)}
