"""The seam between the HTTP front end and whatever produces tokens.

The front end (server.py) turns an OpenAI request into a `GenerationRequest` of token ids
and SamplingParams (the one sampling type: baton.workers.sampling_params), and asks a
`Backend` for a stream of `TokenOutput`. The production backend (disaggregated.py) drives a
prefill and a decode worker over gRPC; tests plug in a fake behind the same interface so
validation, error shapes and queueing run without workers.

A backend signals conditions the front end turns into HTTP answers:
  NoCapacity     every decode worker refused (full): the request waits in the router's queue
  NoReadyWorker  a role has no ready worker at all: 503
  WorkerFailure  the request failed on its workers, retry included: 502 / an SSE error event
Closing the async iterator (client gone, stop string matched) cancels the work on both workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from baton.workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # the client's x-request-id, or one the router made
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # max_tokens resolved against the context (server.py)
    deadline: float  # time.time() by which the request must have finished
    # Session affinity for prefix-aware routing (OpenAI's prompt_cache_key); None: none given.
    cache_key: str | None = None
    # The prefix cache's isolation domain on the workers (server.py: the API key's salt mixed
    # with the request's cache_salt); b"": the shared cache.
    cache_salt: bytes = b""
    # Prompt offsets where a later request will likely branch (chat message ends): the
    # workers snapshot their prefix cache there too.
    snapshot_points: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenOutput:
    # None only on a finish-only output: the worker ended the stream after its last token.
    token_id: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first
    finish_reason: str | None = None  # "stop" (eos / stop token) or "length" on the last token
    # Prompt tokens served from a prefix cache instead of computed; set on the first output
    # (OpenAI's usage.prompt_tokens_details.cached_tokens), None on the others.
    cached_tokens: int | None = None


@dataclass
class BackendStatus:
    """What /health and /ready report about the workers behind the router."""

    ready: bool
    workers: dict[str, list[dict]] = field(default_factory=dict)  # role -> worker summaries


class NoCapacity(Exception):
    """Every candidate decode worker refused the request for lack of room (retry later)."""


class NoReadyWorker(Exception):
    """A role has no ready (serving, not draining) worker."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no ready {role} worker")
        self.role = role


class WorkerFailure(Exception):
    """The request failed on its workers and the one retry failed too."""


class Backend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        """Stream the request's tokens; the last one carries a finish_reason."""
        ...

    def check_ready(self) -> None:
        """Raise NoReadyWorker when a role has no ready worker (cheap; no I/O)."""
        ...

    def status(self) -> BackendStatus: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
