"""Reasoning in the Nemotron 3 format: `<think>...</think>` split from the answer, streaming.

The chat template's generation prompt opens the reasoning itself (`<think>\\n`) when thinking
is on, so the output starts inside it and ends it with `</think>`; with thinking off the prompt
ends in `<think></think>` and the output is the answer (a model may still open `<think>` at the
very start; that is reasoning too). The template renders reasoning as
`<think>\\n{reasoning | trim}\\n</think>\\n{content}`, so the split trims the same way: the
reasoning without its surrounding whitespace, the content without the whitespace after
`</think>`. Text that could still become `</think>` (or a trailing space the trim would
drop) is held back until the next delta settles it, so streamed pieces concatenate to exactly
the non-streamed split.
"""

from __future__ import annotations

import enum

from baton.workers.text.streaming import partial_marker_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

REASONING = "reasoning"
CONTENT = "content"


class _State(enum.Enum):
    OPENING = 1  # output start in answer mode: does it open <think>?
    REASONING_START = 2  # inside reasoning, before its first non-space character
    REASONING = 3
    CONTENT_START = 4  # after </think>, before the answer's first non-space character
    CONTENT = 5  # pass-through


class ReasoningSplitter:
    """Splits a choice's text into (channel, text) pieces, channel REASONING or CONTENT.

    in_reasoning: the prompt left a `<think>` open (the output starts inside the reasoning);
    otherwise only an output that itself starts with `<think>` has reasoning.
    """

    def __init__(self, in_reasoning: bool) -> None:
        self._state = _State.REASONING_START if in_reasoning else _State.OPENING
        self._buf = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state in (_State.REASONING_START, _State.REASONING)

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self._state is _State.CONTENT:
            return [(CONTENT, text)] if text else []
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            state = self._state
            if state is _State.OPENING:
                rest = self._buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self._buf = rest[len(THINK_OPEN):]
                    self._state = _State.REASONING_START
                elif THINK_OPEN.startswith(rest):
                    return out  # empty or a prefix of <think>: wait
                else:
                    self._state = _State.CONTENT
            elif state in (_State.REASONING_START, _State.CONTENT_START):
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return out
                self._state = (_State.REASONING if state is _State.REASONING_START
                               else _State.CONTENT)
            elif state is _State.REASONING:
                end = self._buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning = self._buf[:end].rstrip()
                    if reasoning:
                        out.append((REASONING, reasoning))
                    self._buf = self._buf[end + len(THINK_CLOSE):]
                    self._state = _State.CONTENT_START
                    continue
                # Hold back a possible start of </think>, and trailing whitespace the trim
                # would drop if </think> follows.
                keep = len(self._buf) - partial_marker_len(self._buf, (THINK_CLOSE,))
                keep = len(self._buf[:keep].rstrip())
                if keep:
                    out.append((REASONING, self._buf[:keep]))
                    self._buf = self._buf[keep:]
                return out
            else:  # CONTENT
                if self._buf:
                    out.append((CONTENT, self._buf))
                self._buf = ""
                return out

    def finish(self) -> list[tuple[str, str]]:
        """The output ended: what is still held back (reasoning never closed stays reasoning,
        without the trailing whitespace a close would have trimmed)."""
        buf, self._buf = self._buf, ""
        if self._state in (_State.REASONING_START, _State.REASONING):
            buf = buf.rstrip()
            return [(REASONING, buf)] if buf else []
        if self._state is _State.CONTENT_START:
            return []
        return [(CONTENT, buf)] if buf else []
