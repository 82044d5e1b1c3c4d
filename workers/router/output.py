"""Output processing: one choice's token ids -> OpenAI content, reasoning and tool calls.

The one place a generated token becomes what a client reads, streamed or not:

    token id -> IncrementalDetokenizer (text deltas that never split a character)
             -> ReasoningSplitter      (`<think>...</think>` -> reasoning | answer)
             -> ToolCallParser        (answer -> content | tool-call deltas)
             -> StopMatcher           (stop strings cut the content)
             -> [Delta, ...]

`ChoiceOutput.push(token)` returns the deltas a token settles (often none: text is held back
while it could still be the start of markup or a stop string); `finish()` returns the rest
when the workers end the choice. A streamed answer sends the deltas as they come; a
non-streamed one folds the same deltas into a `Message`, so the two agree by construction.
Once `stopped` is set (a stop string matched, or the last tool call allowed ended) the
choice is over and its backend stream should be closed.

Completions get text only (no reasoning or tool parsing); chat and the Responses API get the
stages the request asks for (reasoning when the prompt leaves `<think>` open or the answer
opens one; tool calls when the request has tools and tool_choice is not "none").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from baton.workers.router.reasoning import REASONING, ReasoningSplitter
from baton.workers.router.tool_calls import ToolCallDelta, ToolCallParser, new_call_id
from baton.workers.text.streaming import IncrementalDetokenizer, StopMatcher


@dataclass(frozen=True)
class Delta:
    """One piece of a choice's output; exactly one of the fields is set."""

    content: str = ""
    reasoning: str = ""
    tool_call: ToolCallDelta | None = None


def _merge(deltas: list[Delta]) -> list[Delta]:
    """Adjacent pieces of the same kind as one (a token's text may arrive in several)."""
    out: list[Delta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is not None and d.content and last.content:
            out[-1] = Delta(content=last.content + d.content)
        elif last is not None and d.reasoning and last.reasoning:
            out[-1] = Delta(reasoning=last.reasoning + d.reasoning)
        elif (last is not None and d.tool_call is not None and last.tool_call is not None
              and d.tool_call.id is None and last.tool_call.id is None
              and d.tool_call.index == last.tool_call.index):
            # (A call's first delta, with its id and name, stays apart from its arguments.)
            prev = last.tool_call
            out[-1] = Delta(tool_call=ToolCallDelta(prev.index, prev.id, prev.name,
                                                    prev.arguments + d.tool_call.arguments))
        else:
            out.append(d)
    return out


class ChoiceOutput:
    """Turns one choice's generated token ids into Deltas (module docstring).

    tokenizer: has decode(ids, skip_special_tokens=True) (markup tokens are kept).
    prompt_ids: the choice's prompt, left context for the first tokens' decoding.
    reasoning: None: no reasoning split; True: the output starts inside `<think>`; False: it
      starts in the answer (and may open `<think>` itself).
    tools: function name -> its parameters schema; None: no tool-call parsing.
    max_tool_calls: the answer ends after this many calls (parallel_tool_calls false: 1).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], *, stop: Sequence[str] = (),
                 reasoning: bool | None = None, tools: Mapping[str, Any] | None = None,
                 max_tool_calls: int | None = None,
                 new_id: Callable[[], str] = new_call_id) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
        self._splitter = ReasoningSplitter(reasoning) if reasoning is not None else None
        self._calls = ToolCallParser(tools, max_tool_calls, new_id) if tools else None
        self._stop = StopMatcher(list(stop))
        self.stopped = False
        self.stop_matched = False  # a stop string ended the choice
        self.reasoning_tokens = 0  # tokens generated while inside the reasoning

    @property
    def tool_calls(self) -> int:
        return self._calls.calls if self._calls is not None else 0

    def push(self, token_id: int) -> list[Delta]:
        """One generated token; the deltas it settles."""
        if self.stopped:
            return []
        if self._splitter is not None and self._splitter.in_reasoning:
            self.reasoning_tokens += 1
        return _merge(self._process(self._detok.add(token_id), final=False))

    def finish(self) -> list[Delta]:
        """The workers ended the choice: everything still held back."""
        if self.stopped:
            return []
        return _merge(self._process(self._detok.flush(), final=True))

    def finish_reason(self, backend_reason: str | None) -> str | None:
        """OpenAI's finish_reason, from the workers' ("stop" | "length") and what was parsed."""
        if self.stop_matched:
            return "stop"
        if self.tool_calls and (backend_reason == "stop" or self.stopped):
            return "tool_calls"
        return backend_reason

    def _process(self, text: str, final: bool) -> list[Delta]:
        out: list[Delta] = []
        if self._splitter is not None:
            pieces = self._splitter.feed(text) if text else []
            if final:
                pieces += self._splitter.finish()
        else:
            pieces = [("content", text)] if text else []
        for channel, piece in pieces:
            if channel == REASONING:
                out.append(Delta(reasoning=piece))
            elif self._answer(self._calls.feed(piece) if self._calls else [piece], out):
                return out
        if final:
            if self._calls is not None and self._answer(self._calls.finish(), out):
                return out
            held = self._stop.flush()
            if held:
                out.append(Delta(content=held))
        return out

    def _answer(self, items: list[str | ToolCallDelta], out: list[Delta]) -> bool:
        """Content through the stop strings, calls as they are; True once the choice ended."""
        for item in items:
            if isinstance(item, str):
                text, matched = self._stop.feed(item)
                if text:
                    out.append(Delta(content=text))
                if matched:
                    self.stopped = self.stop_matched = True
                    return True
            else:
                # Content before a call is complete: what a stop string held back goes first.
                held = self._stop.flush()
                if held:
                    out.append(Delta(content=held))
                out.append(Delta(tool_call=item))
        if self._calls is not None and self._calls.done:
            self.stopped = True
            return True
        return False


class Message:
    """A choice's output folded from its Deltas (what a non-streamed answer returns).

    Pieces are kept in lists and joined when read: a long answer folds in linear time.
    """

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] | None = None
        self._calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument fragments)

    def add(self, delta: Delta) -> None:
        if delta.content:
            self._content.append(delta.content)
        elif delta.reasoning:
            if self._reasoning is None:
                self._reasoning = []
            self._reasoning.append(delta.reasoning)
        elif delta.tool_call is not None:
            call = delta.tool_call
            if call.id is not None:
                self._calls.append((call.id, call.name, []))
            self._calls[call.index][2].append(call.arguments)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str | None:
        return None if self._reasoning is None else "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """OpenAI's message.tool_calls."""
        return [{"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": "".join(arguments)}}
                for call_id, name, arguments in self._calls]
