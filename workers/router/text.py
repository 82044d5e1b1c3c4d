"""Incremental detokenization and stop strings: the router owns text.

Workers stream token ids; `TextAssembler` turns them into text deltas a client can append.
Two things make this more than `decode(token)`:
- A token may end in the middle of a UTF-8 character (byte-level BPE), and a tokenizer may
  render a token differently depending on its neighbours (leading spaces). Each step decodes a
  short window of previous tokens and emits only what the window adds, and holds text back
  while it ends in an incomplete character (U+FFFD).
- Stop strings can span tokens. Text that could still become the start of a stop string is
  held back until the next token settles it; once a stop string appears, the text ends just
  before it and the assembler reports `stopped`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Tokens of context decoded before the new ones so that neighbour-dependent renderings
# (e.g. sentencepiece's leading-space marker) come out as they do in the full text.
CONTEXT_TOKENS = 6


class TextAssembler:
    """Accumulates generated tokens into text, emitting safe deltas.

    decode: token ids -> text (the model tokenizer's decode, special tokens skipped).
    prompt_ids: the prompt's ids, used only as leading context for the first tokens.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stop: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""  # all text decoded so far (up to a stop string, once one matched)
        self._emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string matched; no further text

    def _decode_new(self, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= len(prefix) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window[len(prefix):]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that can be sent now (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        return self._advance(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """The generation ended (eos, length, stop token): return all text still held back."""
        if self.stopped:
            return ""
        return self._advance(self._decode_new(final=True), final=True)

    def _advance(self, delta: str, final: bool) -> str:
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += delta
        if self._stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        if final:
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted:upto]
        self._emitted = upto
        return out
