"""One attempt of a request on its workers, as an explicit state machine (DESIGN.md, Round 3
seams: one attempt, one state machine); DisaggregatedBackend (disaggregated.py) runs one, and
a retry another.

    STARTING --Reserve--> RESERVED --Generate (+ Prefill)--> GENERATING
    GENERATING --P answered--> PREFILLED --first token--> STREAMING --finish--> ENDED
    RESERVED --local prefill: Generate only--> PREFILLED
    any state --failure, cancellation--> ENDED
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.prefill.v1 import prefill_pb2
from baton.workers import headers
from baton.workers.router.backend import GenerationRequest, NoReadyWorker, TokenOutput
from baton.workers.router.discovery import Worker

if TYPE_CHECKING:
    from baton.workers.router.disaggregated import DisaggregatedBackend

# A worker that failed this many health checks in a row while a request waits on it is taken
# for hung (a stuck GPU, a stopped process: alive to TCP, answering nothing): the request is
# retried elsewhere instead of waiting out its deadline. A draining worker still answers
# (NOT_SERVING) and keeps its requests.
STALLED_AFTER_FAILED_CHECKS = 3
WATCH_INTERVAL_S = 0.25
_FINISH = {
    decode_pb2.FINISH_REASON_STOP: "stop",
    decode_pb2.FINISH_REASON_LENGTH: "length",
    decode_pb2.FINISH_REASON_GRAMMAR_ERROR: "grammar_error",
}
# Codes that say the request itself is wrong: another worker would refuse it as well.
NOT_RETRIED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.UNIMPLEMENTED}


class AttemptFailed(Exception):
    """One attempt failed on its workers; the request may be retried elsewhere."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def describe(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or ''}".rstrip(": ")


class AttemptState(Enum):
    """Where one attempt is (see Attempt)."""

    STARTING = "starting"
    RESERVED = "reserved"
    GENERATING = "generating"
    PREFILLED = "prefilled"
    STREAMING = "streaming"
    ENDED = "ended"


class Attempt:
    """One attempt of a request (see the module docstring for its states).

    It waits on its sources (D's next message, P's answer, the stall watcher) in one place,
    `_next`; every transition is a method; `_end` runs once, whatever ended the attempt: it
    cancels what still runs (D's call releases D's reservation, P's call stops its
    transfer), releases a reservation no Generate call was made for, and settles the decode
    worker's in-flight count with the balancer once.
    """

    def __init__(self, backend: DisaggregatedBackend, request: GenerationRequest,
                 emitted: list[int], attempt: int, avoid: set[str]) -> None:
        self.backend = backend
        self.request = request
        self.avoid = avoid
        self.prompt = [*request.prompt_ids, *emitted]
        self.num_emitted = len(emitted)
        budget = request.sampling.max_tokens - len(emitted)
        self.sampling = replace(request.sampling, max_tokens=budget).to_proto()
        self.request_id = request.request_id if attempt == 0 else (
            f"{request.request_id}.retry{attempt}")
        self.metadata = (("x-request-id", request.request_id),)
        self.state = AttemptState.STARTING
        self.decode: Worker | None = None
        self.prefill: Worker | None = None
        self.reserved: decode_pb2.ReserveResponse | None = None
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._prefill_task: asyncio.Task | None = None
        self._read: asyncio.Future | None = None
        self._watch: asyncio.Task | None = None
        self._got = 0
        self._generated: list[int] = []

    async def run(self) -> AsyncIterator[TokenOutput]:
        await self._reserve()
        try:
            self._start()
            want_logprobs = self.request.sampling.logprobs is not None
            while True:
                message = await self._next()
                if message is None:
                    continue  # P answered; D's next message is still to come
                reason = message.finish_reason
                if reason == decode_pb2.FINISH_REASON_ABORT:
                    raise AttemptFailed(f"decode worker {self.decode.address} aborted the "
                                        "request")
                finish = _FINISH.get(reason)
                tokens = list(message.tokens)
                if self.state is not AttemptState.STREAMING and tokens:
                    self._first_token()
                self._generated.extend(t.token_id for t in tokens)
                if finish is not None:
                    self.backend.balancer.finished(self.decode, self.prompt + self._generated)
                for i, token in enumerate(tokens):
                    self._got += 1
                    yield TokenOutput(
                        token_id=token.token_id,
                        logprob=token.logprob if want_logprobs else None,
                        top_logprobs=tuple((t.token_id, t.logprob) for t in token.top_logprobs),
                        finish_reason=finish if i + 1 == len(tokens) else None,
                        cached_tokens=message.num_cached_tokens if self._got == 1 else None)
                if finish is not None:
                    if not tokens:  # the finish came in a message of its own
                        yield TokenOutput(token_id=None, finish_reason=finish)
                    return
        finally:
            self._end()

    # ---- transitions ---------------------------------------------------------------------

    async def _reserve(self) -> None:
        """STARTING -> RESERVED: a decode worker holds room (or NoCapacity / failures)."""
        backend, request = self.backend, self.request
        self.decode, self.reserved = await backend._reserve(
            decode_pb2.ReserveRequest(
                request_id=self.request_id, prompt_token_ids=self.prompt,
                sampling=self.sampling, deadline=_timestamp(request.deadline),
                num_output_tokens=self.num_emitted,
                local_prefill_max_tokens=backend.local_prefill_limit(self.prompt, self.avoid),
                snapshot_points=request.snapshot_points, cache_salt=request.cache_salt),
            request.deadline, self.metadata, self.avoid, request.cache_key)
        self.state = AttemptState.RESERVED
        backend.balancer.held(self.decode, self.prompt, self.reserved.cached_tokens,
                              request.cache_key)

    def _start(self) -> None:
        """RESERVED -> GENERATING (D's Generate and P's Prefill), or -> PREFILLED when D
        prefills locally (Generate only)."""
        backend, request, decode, reserved = (self.backend, self.request, self.decode,
                                              self.reserved)
        if reserved.local_prefill:
            backend.local_prefills += 1
            self.avoid.add(decode.address)  # a retry goes elsewhere
        else:
            ranked = backend.balancer.order(backend.prefill.ready_workers(), self.avoid,
                                            prompt=self.prompt, cache_key=request.cache_key)
            if not ranked:
                raise NoReadyWorker("prefill")
            self.prefill = ranked[0]
            self.avoid.update((decode.address, self.prefill.address))  # a retry goes elsewhere
        # From here on, cancelling D's call releases its reservation.
        self._call = decode.stub.Generate(
            decode_pb2.GenerateRequest(request_id=self.request_id,
                                       reservation_id=reserved.reservation_id),
            timeout=max(0.001, request.deadline - time.time()), metadata=self.metadata)
        if self.prefill is None:
            self.state = AttemptState.PREFILLED
        else:
            self._prefill_task = asyncio.create_task(backend._prefill(
                self.prefill, prefill_pb2.PrefillRequest(
                    request_id=self.request_id, prompt_token_ids=self.prompt,
                    sampling=self.sampling, decode_target=decode.address,
                    deadline=_timestamp(time.time() + backend.transfer_timeout_s),
                    reservation_id=reserved.reservation_id,
                    reservation_token=reserved.reservation_token,
                    prompt_chain_hash=reserved.prompt_chain_hash,
                    decode_cached_tokens=reserved.cached_tokens,
                    num_output_tokens=self.num_emitted,
                    snapshot_points=request.snapshot_points, cache_salt=request.cache_salt),
                self.metadata))
            self._prefill_task.add_done_callback(retrieve)
            self.state = AttemptState.GENERATING
        # Off the per-token path: one watcher per attempt, not a timed wait per message.
        self._watch = asyncio.create_task(watch_stall(self._waited_on))

    def _prefilled(self) -> None:
        """GENERATING -> PREFILLED: P answered (its state is with D), or failed."""
        exc = self._prefill_task.exception()
        if exc is not None:
            raise _prefill_failure(self.prefill, self.decode, exc)
        self.state = AttemptState.PREFILLED
        answer = self._prefill_task.result()
        self.backend.balancer.held(self.prefill, self.prompt, answer.cached_tokens)
        self.backend.balancer.computed(self.prefill, self.prompt, answer.cached_tokens,
                                       self.request.snapshot_points)

    def _first_token(self) -> None:
        """-> STREAMING: D holds the whole prompt now (and computed it, if it prefilled)."""
        self.state = AttemptState.STREAMING
        if self.reserved.local_prefill:
            self.backend.balancer.computed(self.decode, self.prompt,
                                           self.reserved.cached_tokens,
                                           self.request.snapshot_points)
        else:
            self.backend.balancer.received(self.decode, self.prompt)

    def _end(self) -> None:
        """-> ENDED, once: cancel what runs, release what no call holds, report the load."""
        if self.state is AttemptState.ENDED:
            return
        streaming = self.state is AttemptState.STREAMING
        self.state = AttemptState.ENDED
        if self._watch is not None:
            self._watch.cancel()
        self.decode.inflight -= 1
        if self._read is not None:
            if self._read.done():
                retrieve(self._read)  # failed beside a prefill failure that was reported
            else:
                self._read.cancel()
        if self._call is None:
            # Given up between Reserve and Generate (no prefill worker, cancelled).
            self.backend._release(self.decode, self.reserved.reservation_id, self.metadata)
        else:
            # Cancelling D's call releases its reservation once its handler runs. Before D
            # streamed anything the handler may never run (a call cancelled before it is
            # dispatched), so the reservation is released too (idempotent: a freed one answers
            # released=false). Cancelling P's call stops its transfer.
            self._call.cancel()
            if not streaming:
                self.backend._release(self.decode, self.reserved.reservation_id, self.metadata)
        if self._prefill_task is not None and not self._prefill_task.done():
            self._prefill_task.cancel()

    # ---- the one wait ----------------------------------------------------------------------

    def _waited_on(self) -> tuple[Worker, ...]:
        if self.state is AttemptState.GENERATING:
            return self.decode, self.prefill
        return (self.decode,)

    async def _next(self) -> decode_pb2.GenerateResponse | None:
        """Waits for whichever source moves first: D's next message (returned), P's answer
        (a transition; None), or the stall watcher (the attempt fails)."""
        if self._read is None:
            self._read = asyncio.ensure_future(self._call.read())
        sources = {self._read, self._watch}
        if self.state is AttemptState.GENERATING:
            sources.add(self._prefill_task)
        await asyncio.wait(sources, return_when=asyncio.FIRST_COMPLETED)
        if self._watch.done():
            raise self._watch.result()
        if self.state is AttemptState.GENERATING and self._prefill_task.done():
            self._prefilled()
        if not self._read.done():
            return None
        read, self._read = self._read, None
        try:
            message = read.result()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and (
                    time.time() >= self.request.deadline):
                raise asyncio.TimeoutError from None
            if code == grpc.StatusCode.UNAVAILABLE:
                self.decode.mark_failed()
            raise AttemptFailed(f"decode worker {self.decode.address} failed after "
                                f"{self._got} tokens: {describe(exc)}",
                                code not in NOT_RETRIED) from None
        if message is grpc.aio.EOF:
            raise AttemptFailed(f"decode worker {self.decode.address} ended the stream "
                                f"without a finish reason after {self._got} tokens")
        return message


async def watch_stall(waited_on) -> AttemptFailed:
    """Returns once a worker in waited_on() stops answering health checks (the discovery
    loop counts them), with the attempt's failure."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        for worker in waited_on():
            if worker.failures >= STALLED_AFTER_FAILED_CHECKS:
                return AttemptFailed(f"{worker.role} worker {worker.address} stopped "
                                     f"answering ({worker.failures} health checks failed in "
                                     "a row)")


def _prefill_failure(prefill: Worker, decode: Worker, exc: BaseException) -> AttemptFailed:
    if not isinstance(exc, grpc.aio.AioRpcError):
        return AttemptFailed(f"prefill worker {prefill.address} failed: {exc!r}")
    retryable = exc.code() not in NOT_RETRIED
    if _failed_peer(exc) == "decode":
        # P is fine: its transfer to D failed (D died, refused the handshake, ...).
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            decode.mark_failed()
        return AttemptFailed(f"the transfer from prefill worker {prefill.address} to "
                             f"decode worker {decode.address} failed: {describe(exc)}",
                             retryable)
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        prefill.mark_failed()  # P is unreachable or draining
    return AttemptFailed(f"prefill worker {prefill.address} failed: {describe(exc)}",
                         retryable)


def _failed_peer(exc: grpc.aio.AioRpcError) -> str | None:
    """Which peer a worker's failure was about (its trailing metadata), if it says."""
    for key, value in exc.trailing_metadata() or ():
        if key == headers.FAILED_PEER:
            return value
    return None


def retrieve(task: asyncio.Future) -> None:
    """Marks a finished task's exception as seen (the attempt reports what matters)."""
    if not task.cancelled():
        task.exception()
