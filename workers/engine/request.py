"""Requests in, token events out, and the engine's per-sequence bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from baton.workers.engine.prefix_cache import CacheKeys
from baton.workers.engine.sampling import SamplingParams
from baton.workers.engine.tokenizer import IncrementalDetokenizer, StopMatcher


@dataclass
class Request:
    """A generation request as the engine receives it (token ids; text is the router's)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenEvent:
    """One step of one request's output stream.

    token_id is None only on an event that carries nothing but a finish reason (abort).
    """

    request_id: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text_delta: str = ""
    finish_reason: str | None = None
    """None while running; "stop" (eos, stop token or stop string), "length", "abort"."""
    num_prompt_tokens: int = 0
    num_generated: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Phase(str, Enum):
    """Where a sequence is in the engine."""

    WAITING = "waiting"
    """Queued; owns no cache."""
    RUNNING = "running"
    """Owns a slot and pages; feeds tokens[cached_len:] a chunk per step."""
    FINISHED = "finished"


@dataclass
class Sequence:
    """The engine's view of one request (plain data the scheduler reads and updates)."""

    request: Request
    seed: int
    tokens: list[int]
    """Prompt followed by every generated token."""
    num_prompt: int
    max_len: int
    """Stop with "length" when tokens reach this many (min of max_model_len, prompt+max_tokens)."""
    eos_ids: frozenset[int]
    phase: Phase = Phase.WAITING
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    cached_len: int = 0
    """Tokens whose KV and Mamba state are in this engine's cache."""
    mtp_cached: int = 0
    """Positions whose MTP KV entry is valid (entry i pairs hidden i with token i+1)."""
    pending_hidden: torch.Tensor | None = None
    """[m, H] main-model hidden states of positions mtp_cached .. cached_len - 1."""
    last_hidden: torch.Tensor | None = None
    """[H] hidden state (after norm_f) of position cached_len - 1: what a prefix-cache
    snapshot keeps, and what the next token is sampled from after a whole-prompt hit."""
    needs_mtp: bool = False
    """This sequence keeps MTP state (MTP KV entries and pending hidden states)."""
    cache_keys: CacheKeys = field(default_factory=CacheKeys)
    """Its prefix-cache chain keys and how much of it is published."""
    cached_tokens: int = 0
    """Tokens its last admission took from the prefix cache instead of computing them."""
    sink: object | None = None
    """A PrefillSink: this is a prefill-only request whose state goes to another engine."""
    sink_from: int = 0
    """First prompt position whose state the sink needs (the receiver holds the rest)."""
    on_prefilled: object | None = None
    """Called with the PrefillResult when a prefill-only request has its first token."""
    spec_tokens: int = 0
    """Drafts this step (speculative decoding)."""
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopMatcher | None = None
    added_at: float = 0.0
    """time.monotonic() when the request entered this engine."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def uncached(self) -> int:
        return len(self.tokens) - self.cached_len
