"""The router's view of the checkpoint's tokenizer (baton.workers.text.tokenizer), and
tokenizing prompts without letting one request stall the others.

`bounded_encode` is how every prompt is tokenized: off the event loop (the `tokenizers`
batch call releases the GIL, the single-text one does not), and bounded: a prompt that
cannot fit the context is refused before it is tokenized in full (more bytes than the
context's tokens could ever cover; or, for long texts, counted chunk by chunk until the count
is past the limit).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from baton.workers.router.grammar import GRAMMAR_MARKUP, GrammarCompiler
from baton.workers.text.tokenizer import Tokenizer, load_tokenizer

# Markup the output processing reads; kept when decoding even where it is a special token.
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
# Long prompts are counted in chunks of this many characters per token of the limit...
CHARS_PER_TOKEN_PROBE = 4
# ...each cut counting at most this many tokens more than the whole text would.
CUT_SLACK_TOKENS = 16


class RouterTokenizer(Protocol):
    """What the router needs of the model's tokenizer."""

    vocab_size: int
    max_token_bytes: int  # the longest token's UTF-8 length

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def render_chat(self, messages: list[dict], template_kwargs: dict) -> str: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_strs(self, ids: Sequence[int]) -> list[str]: ...

    def grammar_compiler(self) -> GrammarCompiler: ...


def markup_tokens(encode, is_special, strings: Sequence[str] = GRAMMAR_MARKUP) -> dict[str, int]:
    """Markup string -> token id, for each markup string the tokenizer encodes as one token
    that llguidance treats as special (is_special: LLTokenizer.is_special_token). Such a token
    is all a model trained on the chat template emits for it, whatever the `special` flag of
    tokenizer.json says (added tokens are special to llguidance either way), and no text in a
    grammar matches it: grammars reference it by id. encode: text -> ids, no specials added."""
    found = {}
    for text in strings:
        ids = encode(text)
        if len(ids) == 1 and is_special(ids[0]):
            found[text] = ids[0]
    return found


# Message ends offered as snapshot points: those of the last this many messages, and the end
# of the last user message. Where the next turn's prompt leaves this one: a tool loop's next
# prompt re-renders this one's generation prompt (`<think>\n` becomes `<think></think>` or the
# reasoning) but keeps every message before it, so the last message's end hits; a new user
# turn makes the template strip the reasoning of the assistant turns since the last user
# message, so only the history up to that user message is kept.
SNAPSHOT_MESSAGES = 4


def message_boundaries(tokenizer: RouterTokenizer, messages: list[dict],
                       template_kwargs: dict[str, Any], text: str,
                       ids: Sequence[int]) -> tuple[int, ...]:
    """Token offsets in the rendered chat (text, tokenized as ids) where each of the last
    SNAPSHOT_MESSAGES messages and the last user message end: the chat up to that message,
    rendered alone, is a prefix of text and tokenizes to a prefix of ids. Ends that are not
    (a template that renders a shorter chat differently, a token across the boundary) are
    left out."""
    kwargs = {**template_kwargs, "add_generation_prompt": False}
    ends = set(range(max(0, len(messages) - SNAPSHOT_MESSAGES), len(messages)))
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if users:
        ends.add(users[-1])
    points = set()
    for i in sorted(ends):
        try:
            head = tokenizer.render_chat(messages[:i + 1], kwargs)
        except Exception:  # a template may refuse a chat cut short; that end is no point
            continue
        if not head or not text.startswith(head):
            continue
        head_ids = tokenizer.encode(head, False)
        n = len(head_ids)
        if 0 < n < len(ids) and list(ids[:n]) == head_ids:
            points.add(n)
    return tuple(sorted(points))


class PromptTooLong(Exception):
    def __init__(self, at_least: int) -> None:
        super().__init__(f"the prompt has at least {at_least} tokens")
        self.at_least = at_least


def _cut(text: str, at: int) -> int:
    """A cut near `at` just before a whitespace that follows other text (where pre-tokenizers
    split anyway), or at `at` when there is none nearby."""
    for i in range(at, min(len(text), at + 256)):
        if text[i].isspace() and i > 0 and not text[i - 1].isspace():
            return i
    return at


def _count_exceeds(tokenizer: RouterTokenizer, text: str, limit: int,
                   add_special_tokens: bool) -> int | None:
    """A lower bound on text's token count once it reaches the limit, else None."""
    chunk = CHARS_PER_TOKEN_PROBE * max(limit, 1024)
    count, cuts, start = 0, 0, 0
    while start < len(text):
        end = len(text) if len(text) - start <= chunk else _cut(text, start + chunk)
        count += len(tokenizer.encode(text[start:end], add_special_tokens and start == 0))
        cuts += end < len(text)
        if count - CUT_SLACK_TOKENS * cuts >= limit:
            return count - CUT_SLACK_TOKENS * cuts
        start = end
    return None


def _encode_within(tokenizer: RouterTokenizer, text: str, limit: int,
                   add_special_tokens: bool) -> list[int]:
    n_bytes = len(text.encode("utf-8"))
    if n_bytes >= limit * tokenizer.max_token_bytes:
        raise PromptTooLong(-(-n_bytes // tokenizer.max_token_bytes))
    if len(text) > CHARS_PER_TOKEN_PROBE * max(limit, 1024):
        at_least = _count_exceeds(tokenizer, text, limit, add_special_tokens)
        if at_least is not None:
            raise PromptTooLong(at_least)
    return tokenizer.encode(text, add_special_tokens)


async def bounded_encode(tokenizer: RouterTokenizer, text: str, limit: int,
                         add_special_tokens: bool = True) -> list[int]:
    """text's token ids; PromptTooLong when it has `limit` tokens or more (not always
    tokenized in full to find out). Runs in a worker thread."""
    return await asyncio.to_thread(_encode_within, tokenizer, text, limit, add_special_tokens)


class CheckpointTokenizer:
    """encode / chat rendering / decode with the checkpoint's tokenizer and chat template.

    vocab_size is the model's (config.json), which bounds the token ids a client may send;
    it can exceed the tokenizer's own vocabulary (padded embeddings).
    """

    def __init__(self, model_path: str | Path) -> None:
        self._path = Path(model_path)
        self._tokenizer = load_tokenizer(model_path)
        config_path = self._path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.vocab_size = int(config.get("vocab_size") or self._tokenizer.vocab_size)
        self._hidden: frozenset[int] = frozenset()  # specials decode drops
        self.max_token_bytes = 1
        if isinstance(self._tokenizer, Tokenizer):
            backend = self._tokenizer.backend
            added = backend.get_added_tokens_decoder()
            specials = {i: t.content for i, t in added.items() if t.special}
            self._hidden = frozenset(i for i, c in specials.items() if c not in MARKUP_TOKENS)
            pieces = backend.decode_batch(
                [[i] for i in range(backend.get_vocab_size(with_added_tokens=True))],
                skip_special_tokens=False)
            self.max_token_bytes = max((len(p.encode("utf-8")) for p in pieces), default=1)
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._tokenizer
        if not isinstance(tok, Tokenizer):
            return list(tok.encode(text, add_special_tokens=add_special_tokens))
        backend = tok.backend
        # The batch call releases the GIL while it tokenizes (the single-text one holds it).
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and tok.add_bos_token and tok.bos_token_id is not None:
            if not ids or ids[0] != tok.bos_token_id:
                ids = [tok.bos_token_id, *ids]
        return list(ids)

    def render_chat(self, messages: list[dict], template_kwargs: dict[str, Any]) -> str:
        """The prompt text (tokenize with encode(..., add_special_tokens=False));
        template_kwargs may turn add_generation_prompt off (/tokenize)."""
        kwargs = dict(template_kwargs)
        add = kwargs.pop("add_generation_prompt", True)
        return self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=add, tokenize=False, **kwargs)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; skipping special tokens keeps those that are output markup."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._hidden]
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        if isinstance(self._tokenizer, Tokenizer):
            backend = self._tokenizer.backend
            return [backend.id_to_token(i) or "" for i in ids]
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def grammar_compiler(self) -> GrammarCompiler:
        """The model's grammar compiler, built on first use (blocking: ~1 s for a large
        vocabulary, so call it off the event loop)."""
        with self._compiler_lock:
            if self._compiler is None:
                lltok, markup = None, {}
                if isinstance(self._tokenizer, Tokenizer):
                    from llguidance import LLTokenizer

                    lltok = LLTokenizer(self._tokenizer.backend.to_str(),
                                        n_vocab=self.vocab_size)
                    markup = markup_tokens(lambda t: self.encode(t, False),
                                           lltok.is_special_token)
                self._compiler = GrammarCompiler(lltok, markup)
            return self._compiler
