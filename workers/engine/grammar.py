"""Grammar-constrained decoding with llguidance: compiled grammars, per-request matchers, masks.

A request's SamplingParams.grammar is an llguidance grammar, its JSON serialization (a
TopLevelGrammar: '{"grammars": [{"json_schema": {...}}]}', or a lark grammar with embedded
JSON Schemas: '{"grammars": [{"lark_grammar": "start: ..."}]}'). Its life in one engine:

1. Admission (the caller's thread: a gRPC handler, never the engine loop): GrammarCompiler
   compiles it against the engine's tokenizer into an LLMatcher, kept in an LRU keyed by the
   grammar text; a grammar that does not compile is a ValueError naming llguidance's reason.
2. First sample: GrammarState takes a copy of the compiled matcher (microseconds) and
   consumes the request's output so far: on a decode worker that is the earlier attempt's
   output (Request.num_output_tokens) and the prefill worker's first token, so the state is
   rebuilt from tokens and nothing grammar-related crosses the wire.
3. Every step: MaskComputer fills the token bitmasks of all constrained rows in one call of
   llguidance's parallel executor (it drops the GIL) on a helper thread, started before the
   forward pass, so the masks are computed while the model runs; `mask_bias` unpacks
   the words into a [n, V] additive bias (0 allowed, -inf forbidden) on the device.
4. Speculation: each MTP draft is pushed into the matcher (`push`: refused drafts are not
   consumed and leave the matcher as it was), so the mask of draft depth d, which is also the
   mask of verification row d, is the grammar's after drafts[:d]; `settle` rolls the matcher
   back to the drafts verification accepted.
5. The grammar ends the request: once the matcher is stopped (nothing but eos can follow, or
   eos was taken), `stopped_at` says at which length the request stops.

Shapes: [n, W]  n rows, W = ceil(V / 32) int32 mask words; bit v % 32 of word v // 32 set
means token v is allowed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 64
"""Compiled grammars kept per engine (an agent's tools and schemas repeat across requests)."""
_MAX_ERROR_CHARS = 600


def _llguidance():
    import llguidance

    return llguidance


def llg_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]):
    """The llguidance tokenizer of an engine tokenizer (a `tokenizers`-backed Tokenizer or the
    ByteTokenizer); vocab_size is the model's (it may exceed the tokenizer's: padding)."""
    llg = _llguidance()
    eos = sorted(int(e) for e in eos_ids) or None
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "to_str"):
        return llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    # ByteTokenizer: id b < 256 is the byte b; ids from 256 up are specials (0xff marks them).
    specials = list(range(256, vocab_size))
    eos_id = eos[0] if eos else (specials[0] if specials else 0)

    class _Bytes:
        eos_token_id = eos_id
        bos_token_id = None
        tokens = [bytes([b]) for b in range(min(256, vocab_size))] + [
            b"\xff<special_%d>" % t for t in specials
        ]
        special_token_ids = specials

        def __call__(self, text: str | bytes) -> list[int]:
            return list(text if isinstance(text, bytes) else text.encode("utf-8"))

    return llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()), n_vocab=vocab_size, eos_token=eos)


def _shorten(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + " ..."


def _check_format(grammar: str) -> None:
    try:
        top = json.loads(grammar)
    except json.JSONDecodeError as exc:
        raise ValueError(
            "SamplingParams.grammar is invalid: not JSON (an llguidance TopLevelGrammar, "
            f'{{"grammars": [...]}}, is expected): {exc}'
        ) from None
    if not isinstance(top, dict) or not isinstance(top.get("grammars"), list):
        raise ValueError(
            "SamplingParams.grammar is invalid: an llguidance TopLevelGrammar is a JSON object "
            'with a "grammars" list, e.g. {"grammars": [{"json_schema": {...}}]}'
        )


class GrammarCompiler:
    """Compiles grammars against one engine's tokenizer, with an LRU of compiled matchers.

    Thread-safe: admission compiles on callers' threads while the engine thread copies.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = list(eos_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._llg_tokenizer = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.compiled_total = 0
        """Grammars compiled (cache misses), for tests and stats."""

    @property
    def llg_tokenizer(self):
        # Built at the first grammar (about a second for a 128k vocabulary), not at start-up.
        with self._lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = llg_tokenizer(
                    self._tokenizer, self.vocab_size, self._eos_ids
                )
            return self._llg_tokenizer

    def compile(self, grammar: str):
        """The compiled (never advanced) LLMatcher of grammar; ValueError if it cannot compile."""
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher
        _check_format(grammar)
        llg = _llguidance()
        tokenizer = self.llg_tokenizer
        # Outside the lock: a large grammar takes a while, and llguidance drops the GIL.
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(
                f"SamplingParams.grammar is invalid: {_shorten(messages[0] if messages else '')}"
            )
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"SamplingParams.grammar is invalid: {_shorten(matcher.get_error())}")
        with self._lock:
            self.compiled_total += 1
            self._compiled[grammar] = matcher
            self._compiled.move_to_end(grammar)
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def new_state(self, grammar: str, start: int) -> GrammarState:
        """A fresh matcher for one request whose output starts at token index start."""
        # llguidance cannot roll back over a lexeme bounded by max_tokens (a reasoning
        # budget): such a request's speculation restores a copy instead.
        return GrammarState(self.compile(grammar).deep_copy(), start,
                            copy_rollback="max_tokens=" in grammar)

    def count_accepted(self, grammar: str, tokens: Sequence[int]) -> int:
        """How many of tokens, from the grammar's start, it accepts in a row."""
        if not tokens:
            return 0
        return self.compile(grammar).deep_copy().try_consume_tokens(list(tokens))


class GrammarState:
    """One request's matcher, and how far through the request's tokens it is.

    consumed: token index the matcher has reached (the output's first index at the start);
    pushed: speculative drafts consumed beyond it; stopped_at: the sequence length at which
    the grammar ended the request (None while it goes on); refused_at: the index of a token
    the grammar refused (it ended the request there: an error, not a stop).
    """

    def __init__(self, matcher, start: int, copy_rollback: bool = False) -> None:
        self.matcher = matcher
        self._copy_rollback = copy_rollback
        self._before = None  # copy_rollback: the matcher before the drafts pushed
        self._drafts: list[int] = []
        self.consumed = start
        self.pushed = 0
        self.stopped_at: int | None = None
        self.refused_at: int | None = None
        self._push_stop: int | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def consume(self, token: int) -> None:
        """Advance by the token at index `consumed` (a sampled or already generated one)."""
        if self.pushed:
            raise RuntimeError("GrammarState.consume with speculative drafts pushed")
        self.consumed += 1
        if self.stopped:
            return
        if not self.matcher.consume_token(int(token)):
            # Only a token the masks never offered gets here (a peer's first token, a
            # fallback, a grammar that does not fit the tokenizer): the matcher is broken
            # from here, so the request ends there, as an error.
            log.warning("grammar refused token %d at index %d: %s", token, self.consumed - 1,
                        _shorten(self.matcher.get_error()))
            self.refused_at = self.consumed - 1
            self.stopped_at = self.consumed
            return
        if self.matcher.is_stopped():
            self.stopped_at = self.consumed

    def advance(self, tokens: Sequence[int], upto: int | None = None) -> None:
        """Consume tokens[consumed:upto] (upto defaults to len(tokens))."""
        end = len(tokens) if upto is None else upto
        while self.consumed < end:
            self.consume(tokens[self.consumed])

    def push(self, draft: int) -> bool:
        """Speculatively consume a draft; False (nothing changes) if the grammar refuses it."""
        if self.stopped or self._push_stop is not None:
            return False
        before = self.matcher.deep_copy() if self._copy_rollback and not self.pushed else None
        if self.matcher.try_consume_tokens([int(draft)]) != 1:
            return False
        if before is not None:
            self._before = before
        self._drafts.append(int(draft))
        self.pushed += 1
        if self.matcher.is_stopped():
            self._push_stop = self.pushed
        return True

    def settle(self, accepted: int) -> None:
        """Verification kept `accepted` drafts: roll the other pushed ones back."""
        keep = min(accepted, self.pushed)
        if self.pushed > keep:
            if self._before is not None:
                self.matcher = self._before
                if keep:
                    self.matcher.consume_tokens(self._drafts[:keep])
            else:
                self.matcher.rollback(self.pushed - keep)
        self._before = None
        self._drafts.clear()
        if self._push_stop is not None and self._push_stop <= keep:
            self.stopped_at = self.consumed + self._push_stop
        # Drafts past a stop are accepted only as tokens the stopped grammar offered (eos):
        # the matcher stays where it stopped, the positions move on.
        self.consumed += accepted
        self.pushed = 0
        self._push_stop = None


class MaskBatch:
    """Bitmask rows being filled by a MaskComputer; `wait()` before reading them."""

    def __init__(self, words: torch.Tensor) -> None:
        self.words = words
        self._pending: list[Future] = []

    def wait(self) -> None:
        for future in self._pending:
            future.result()
        self._pending.clear()


class MaskComputer:
    """Fills token bitmasks for many matchers at once, off the calling thread."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.device = torch.device(device)
        self._executor = None
        self._thread: ThreadPoolExecutor | None = None
        # The logit bias of every byte value's 8 bits, [256, 8] float32: -inf where a bit is
        # cleared, 0 where set. Mask words unpack by table lookup (little-endian words: token v
        # is bit v % 8 of byte v // 8) straight into an additive bias: adding it is several
        # times faster on the CPU than masked_fill with a bool mask, and equal (x + 0 = x,
        # x + -inf = -inf for every finite or -inf x).
        byte = torch.arange(256, dtype=torch.int32)
        bits = (byte.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1
        self._bias = torch.where(bits == 0, float("-inf"), 0.0).to(torch.float32).to(
            self.device)
        self.seconds_total = 0.0
        """Time spent filling masks (on the helper thread), for the per-token cost report."""

    def new_batch(self, rows: int) -> MaskBatch:
        # Rows start all-allowed (-1: every bit set): a row nobody fills constrains nothing.
        pin = self.device.type == "cuda"
        return MaskBatch(torch.full((rows, self.num_words), -1, dtype=torch.int32,
                                    pin_memory=pin))

    def start(self, batch: MaskBatch, jobs: list[tuple[Any, int]]) -> None:
        """Fill batch rows: jobs are (matcher, row index); runs while the caller goes on."""
        if not jobs:
            return
        if self._thread is None:
            llg = _llguidance()
            self._executor = llg.LLExecutor()
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="baton-grammar")
        batch._pending.append(self._thread.submit(self._fill, batch.words, list(jobs)))

    def _fill(self, words: torch.Tensor, jobs: list[tuple[Any, int]]) -> None:
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that
        # module (it compiles a torch kernel at import).
        t0 = time.perf_counter()
        rows, width = words.shape
        self._executor.unsafe_compute_mask_ptr(jobs, words.data_ptr(), width * 4, rows)
        self.seconds_total += time.perf_counter() - t0

    def mask_bias(self, words: torch.Tensor) -> torch.Tensor:
        """[n, W] int32 mask words (host) -> [n, V] float32 on the device: 0 for an allowed
        token, -inf for a forbidden one (added to fp32 logits)."""
        n = words.shape[0]
        w = words.to(self.device, non_blocking=True).view(torch.uint8)
        # index_select, not advanced indexing: several times faster on the CPU.
        bias = self._bias.index_select(0, w.reshape(-1).long())
        return bias.view(n, self.num_words * 32)[:, : self.vocab_size]

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
