"""Text assembly from token streams (the one implementation; the router's output processing
and the engine's own text path both use it).

- `IncrementalDetokenizer` turns a stream of token ids into text deltas that never split a
  multi-byte character: text is only released once the decoded window no longer ends in the
  replacement character a partial UTF-8 sequence decodes to, and a tokenizer that renders a
  token differently after its neighbours (leading spaces) gets them as left context.
- `StopMatcher` cuts text at the first stop string, holding back text that could still become
  one; `partial_marker_len` is the hold-back rule it shares with the markup parsers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids, safe for characters split across tokens.

    The prompt ids (if given) give the decoder its left context (leading spaces of the first
    generated token depend on it) but are never part of the output.
    """

    # Tokens of left context re-decoded with each new token: enough for a space-merging decoder.
    _CONTEXT = 5

    def __init__(
        self, tokenizer: Any, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])[-self._CONTEXT :]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is partial)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            delta = text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # Keep the list short: only the window from prefix_offset is ever decoded again.
            if self.prefix_offset > 4 * self._CONTEXT:
                cut = self.prefix_offset
                self.ids = self.ids[cut:]
                self.prefix_offset -= cut
                self.read_offset -= cut
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back (a trailing partial character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


def partial_marker_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the markers:
    text a streaming parser must hold back until the next delta says whether a marker (a stop
    string, `</think>`, `<tool_call>`) begins there."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Finds stop strings in generated text, holding back a possible stop prefix.

    `feed(delta)` returns (text safe to emit now, stopped). Text that could be the beginning of
    a stop string is held back until the next delta decides; when a stop string is found the
    output is cut right before it. Only the held-back text is kept (text already emitted can
    never be part of a later match: it was not the start of any stop string), so a long
    output costs no more per delta than a short one.
    """

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stop:
            return delta, False
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        keep = len(text) - partial_marker_len(text, self.stop)
        self._held = text[keep:]
        return text[:keep], False

    def flush(self) -> str:
        """Everything still held back (the request ended for another reason)."""
        out, self._held = self._held, ""
        return out
