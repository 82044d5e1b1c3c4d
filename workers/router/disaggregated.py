"""The production backend: one request through a decode worker and, unless the decode worker
prefills it itself, a prefill worker, in explicit steps (DESIGN.md, Round 2 seams: P/D with
caches).

One attempt, as the router drives it:
  1. Pick a decode worker D (balancer.py) and call D.Reserve. D takes cache room, pinning the
     longest prefix of the prompt its prefix cache holds, and answers with a reservation id,
     its cached tokens d, and whether it prefills the rest itself (local prefill: at most
     local_prefill_limit() tokens are missing: localPrefillMaxTokens, or more, up to
     LOCAL_PREFILL_STRETCH times it, where the prefill workers' best hit is so far behind
     that P would compute more than RECOMPUTE_BOUND times what D lacks). A full D refuses
     with RESOURCE_EXHAUSTED and the next D is tried; when every D refused, the request goes
     back to the router's queue (NoCapacity). A D that answers nothing (hung) is left after
     a few failed health checks.
  2. Unless D prefills locally, pick a prefill worker P. (None ready: Release the reservation
     and answer 503.) Call D.Generate(reservation id), and P.Prefill(reservation id, d, D's
     address): P computes the prompt from its own best hit and streams only what D lacks
     (KV from d, the Mamba state at the prompt's end) straight to D.
  3. Read D's token stream (the first token included; its first message says how many prompt
     tokens a prefix cache served) while watching P's call: if P fails, D's call is
     cancelled, which releases D's reservation.
A failed attempt (a worker died, a bad chunk, a refused handshake, a stalled transfer) is
retried once on other workers where there are others. If tokens were already streamed, the
retry prefills prompt + emitted tokens and asks for the remaining budget, so the client sees
neither a duplicated token nor a gap; seeded sampling is keyed on (seed, position), so a
seeded request continues exactly as it would have. A second failure is a WorkerFailure.
Closing the generator (client gone, stop string matched) cancels both workers' calls; a
reservation whose Generate call was never made is released (and one the router could not
even learn of expires on D).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.prefill.v1 import prefill_pb2
from baton.workers import headers
from baton.workers.router.backend import (
    BackendStatus,
    GenerationRequest,
    NoCapacity,
    NoReadyWorker,
    TokenOutput,
    WorkerFailure,
)
from baton.workers.router.balancer import Balancer
from baton.workers.router.discovery import Worker, WorkerPool

log = logging.getLogger("baton.router.requests")

MAX_ATTEMPTS = 2  # the first try and one retry
CAPACITY_POLL_S = 0.1  # a retry that finds every decode worker full polls this often
# A worker that failed this many health checks in a row while a request waits on it is taken
# for hung (a stuck GPU, a stopped process: alive to TCP, answering nothing): the request is
# retried elsewhere instead of waiting out its deadline. A draining worker still answers
# (NOT_SERVING) and keeps its requests.
STALLED_AFTER_FAILED_CHECKS = 3
WATCH_INTERVAL_S = 0.25
# D answers Reserve between two engine steps; one that takes longer than this is treated as
# unreachable for this request (a hung one is left sooner, by its failed health checks).
RESERVE_TIMEOUT_S = 10.0
RELEASE_TIMEOUT_S = 5.0
# Local prefill past localPrefillMaxTokens (local_prefill_limit): when a prefill worker would
# compute more than this many times the tokens the decode worker lacks ...
RECOMPUTE_BOUND = 1.3
# ... and the decode worker lacks at most this many times localPrefillMaxTokens.
LOCAL_PREFILL_STRETCH = 8
_FULL = object()  # a decode worker that refused the reservation for lack of room
_UNREACHABLE = object()  # a decode worker that did not answer the reservation
_FINISH = {
    decode_pb2.FINISH_REASON_STOP: "stop",
    decode_pb2.FINISH_REASON_LENGTH: "length",
    decode_pb2.FINISH_REASON_GRAMMAR_ERROR: "grammar_error",
}
# Codes that say the request itself is wrong: another worker would refuse it as well.
_NOT_RETRIED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
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


def _describe(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or ''}".rstrip(": ")


class DisaggregatedBackend:
    """Backend over a prefill pool and a decode pool (see the module docstring)."""

    def __init__(self, prefill: WorkerPool, decode: WorkerPool, balancer: Balancer,
                 transfer_timeout_s: float = 30.0, local_prefill_max_tokens: int = 512,
                 reserve_timeout_s: float = RESERVE_TIMEOUT_S) -> None:
        if local_prefill_max_tokens < 0:
            raise ValueError(f"local_prefill_max_tokens={local_prefill_max_tokens} must be "
                             ">= 0 (0: never prefill on the decode worker)")
        self.prefill = prefill
        self.decode = decode
        self.balancer = balancer
        self.transfer_timeout_s = transfer_timeout_s
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.reserve_timeout_s = reserve_timeout_s
        self.retries = 0  # attempts that failed and were retried (tests, logs)
        self.local_prefills = 0  # attempts a decode worker prefilled itself (tests, logs)
        self._releases: set[asyncio.Task] = set()

    async def start(self) -> None:
        await asyncio.gather(self.prefill.start(), self.decode.start())

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await asyncio.gather(self.prefill.close(), self.decode.close())

    def check_ready(self) -> None:
        for pool in (self.prefill, self.decode):
            if not pool.ready_workers():
                raise NoReadyWorker(pool.role)

    def status(self) -> BackendStatus:
        workers = {pool.role: [w.summary() for w in pool.workers.values()]
                   for pool in (self.prefill, self.decode)}
        ready = all(pool.ready_workers() for pool in (self.prefill, self.decode))
        return BackendStatus(ready=ready, workers=workers)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        emitted: list[int] = []
        avoid: set[str] = set()
        attempt = 0
        while True:
            try:
                async for out in self._attempt(request, emitted, attempt, avoid):
                    if out.token_id is not None:
                        emitted.append(out.token_id)
                    yield out
                return
            except NoCapacity:
                if not emitted:
                    raise  # the request waits in the router's queue
                # Mid-stream there is no queue to go back to: wait here for room.
                if time.time() + CAPACITY_POLL_S >= request.deadline:
                    raise asyncio.TimeoutError from None
                await asyncio.sleep(CAPACITY_POLL_S)
            except NoReadyWorker as exc:
                if not emitted:
                    raise  # 503 before anything was streamed
                raise WorkerFailure(f"request {request.request_id} cannot continue: no ready "
                                    f"{exc.role} worker is left for its retry") from None
            except AttemptFailed as exc:
                attempt += 1
                if not exc.retryable or attempt == MAX_ATTEMPTS:
                    raise WorkerFailure(f"request {request.request_id} failed: {exc}") from None
                self.retries += 1
                log.warning("request %s: attempt %d failed after %d tokens (%s); retrying on "
                            "other workers", request.request_id, attempt, len(emitted), exc)

    async def _reserve(self, req: decode_pb2.ReserveRequest, deadline: float,
                       metadata: tuple, avoid: set[str], cache_key: str | None,
                       ) -> tuple[Worker, decode_pb2.ReserveResponse]:
        need = len(req.prompt_token_ids) + 1  # D reserves the prompt; output pages come later
        candidates = self.balancer.order(self.decode.ready_workers(), avoid, need,
                                         prompt=req.prompt_token_ids, cache_key=cache_key)
        if not candidates:
            raise NoReadyWorker("decode")
        refused = 0
        for worker in candidates:
            worker.inflight += 1  # counted from now, so a burst spreads over the workers
            try:
                answer = await self._reserve_on(worker, req, deadline, metadata)
            except BaseException:
                worker.inflight -= 1
                raise
            if answer is _FULL or answer is _UNREACHABLE:
                worker.inflight -= 1
                if answer is _FULL:
                    refused += 1
                else:
                    worker.mark_failed()
                    avoid.add(worker.address)
                continue
            return worker, answer
        if refused:
            # Every reachable decode worker is full (the unreachable ones are marked).
            raise NoCapacity()
        raise AttemptFailed("no decode worker could be reached")

    async def _reserve_on(self, worker: Worker, req: decode_pb2.ReserveRequest,
                          deadline: float, metadata: tuple):
        """D's ReserveResponse; _FULL: D has no room; _UNREACHABLE: D did not answer."""
        timeout = max(0.001, min(deadline, time.time() + self.reserve_timeout_s) - time.time())
        call = worker.stub.Reserve(req, timeout=timeout, metadata=metadata)
        reply = asyncio.ensure_future(call)
        reply.add_done_callback(_retrieve)
        stalled = asyncio.create_task(self._watch_stall(lambda: (worker,), lambda _: None))
        try:
            await asyncio.wait({reply, stalled}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (the client left). An answer that came meanwhile is released; one D
            # gives after this is refused there (its Reserve call is gone), or expires.
            call.cancel()
            if reply.done() and not reply.cancelled() and reply.exception() is None:
                self._release(worker, reply.result().reservation_id, metadata)
            raise
        finally:
            stalled.cancel()
        if not reply.done():
            call.cancel()
            return _UNREACHABLE  # D stopped answering health checks while we waited
        exc = reply.exception()
        if exc is None:
            return reply.result()
        if not isinstance(exc, grpc.aio.AioRpcError):
            raise AttemptFailed(f"decode worker {worker.address} failed to reserve: {exc!r}")
        code = exc.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _FULL
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.time() >= deadline:
            raise asyncio.TimeoutError
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED):
            return _UNREACHABLE
        raise AttemptFailed(f"decode worker {worker.address} refused the request: "
                            f"{_describe(exc)}", code not in _NOT_RETRIED)

    def _release(self, worker: Worker, reservation_id: str, metadata: tuple) -> None:
        """Frees a reservation no Generate call was made for (in the background)."""

        async def release() -> None:
            try:
                await worker.stub.Release(decode_pb2.ReleaseRequest(
                    reservation_id=reservation_id), timeout=RELEASE_TIMEOUT_S,
                    metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                # The reservation expires on the worker anyway.
                log.debug("releasing %s on %s failed: %s", reservation_id, worker.address,
                          _describe(exc))

        task = asyncio.create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def local_prefill_limit(self, prompt: Sequence[int], avoid: Collection[str] = ()) -> int:
        """How many missing tokens the decode worker may prefill itself for `prompt`.

        localPrefillMaxTokens always. Beyond it, a prefill worker computes from its own best
        hit h_p, which lags a decode worker's whenever earlier turns of the session were
        prefilled locally (P never saw them): sending the turn to P would compute n - h_p
        tokens for the n - h_d that D lacks. Where that is more than RECOMPUTE_BOUND times as
        many, D prefills the rest itself instead (up to LOCAL_PREFILL_STRETCH times
        localPrefillMaxTokens, which bounds how long a local prefill holds D's decode batch):
        the limit becomes (n - h_p) / RECOMPUTE_BOUND. Only with prefix-aware routing (the
        index says where the prefill workers' hits are); 0 keeps local prefill off."""
        limit = self.local_prefill_max_tokens
        if limit == 0:
            return 0
        behind = self.balancer.deepest_held(self.prefill.ready_workers(), prompt, avoid)
        if behind is None:
            return limit
        stretched = int((len(prompt) - behind) / RECOMPUTE_BOUND)
        return max(limit, min(stretched, LOCAL_PREFILL_STRETCH * limit))

    async def _prefill(self, worker: Worker, req: prefill_pb2.PrefillRequest,
                       metadata: tuple) -> prefill_pb2.PrefillResponse:
        worker.inflight += 1
        try:
            # A little past the transfer deadline, so P reports its own DEADLINE_EXCEEDED.
            return await worker.stub.Prefill(req, timeout=self.transfer_timeout_s + 2.0,
                                             metadata=metadata)
        finally:
            worker.inflight -= 1

    async def _attempt(self, request: GenerationRequest, emitted: list[int], attempt: int,
                       avoid: set[str]) -> AsyncIterator[TokenOutput]:
        prompt = [*request.prompt_ids, *emitted]
        budget = request.sampling.max_tokens - len(emitted)
        sampling = replace(request.sampling, max_tokens=budget).to_proto()
        request_id = request.request_id if attempt == 0 else (
            f"{request.request_id}.retry{attempt}")
        metadata = (("x-request-id", request.request_id),)
        decode, reserved = await self._reserve(
            decode_pb2.ReserveRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
                deadline=_timestamp(request.deadline), num_output_tokens=len(emitted),
                local_prefill_max_tokens=self.local_prefill_limit(prompt, avoid),
                snapshot_points=request.snapshot_points),
            request.deadline, metadata, avoid, request.cache_key)
        self.balancer.held(decode, prompt, reserved.cached_tokens, request.cache_key)
        call: grpc.aio.UnaryStreamCall | None = None
        prefill_task: asyncio.Task | None = None
        read: asyncio.Future | None = None
        watch: asyncio.Task | None = None
        stalled: list[AttemptFailed] = []
        try:
            prefill = None
            if reserved.local_prefill:
                self.local_prefills += 1
                avoid.add(decode.address)  # a retry goes elsewhere
            else:
                ranked = self.balancer.order(self.prefill.ready_workers(), avoid,
                                             prompt=prompt, cache_key=request.cache_key)
                if not ranked:
                    raise NoReadyWorker("prefill")
                prefill = ranked[0]
                avoid.update((decode.address, prefill.address))  # a retry goes elsewhere
            # From here on, cancelling D's call releases its reservation.
            call = decode.stub.Generate(
                decode_pb2.GenerateRequest(request_id=request_id,
                                           reservation_id=reserved.reservation_id),
                timeout=max(0.001, request.deadline - time.time()), metadata=metadata)
            prefill_done = prefill is None
            if prefill is not None:
                prefill_request = prefill_pb2.PrefillRequest(
                    request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
                    decode_target=decode.address,
                    deadline=_timestamp(time.time() + self.transfer_timeout_s),
                    reservation_id=reserved.reservation_id,
                    decode_cached_tokens=reserved.cached_tokens,
                    num_output_tokens=len(emitted),
                    snapshot_points=request.snapshot_points)
                prefill_task = asyncio.create_task(
                    self._prefill(prefill, prefill_request, metadata))
                prefill_task.add_done_callback(_retrieve)

            def on_stall(failure: AttemptFailed) -> None:
                # Wakes the wait below, which then fails the attempt with this reason.
                stalled.append(failure)
                if read is not None:
                    read.cancel()
                if not prefill_done:
                    prefill_task.cancel()

            # Off the per-token path: one watcher per attempt, not a timed wait per message.
            watch = asyncio.create_task(self._watch_stall(
                lambda: (decode,) if prefill_done else (decode, prefill), on_stall))
            want_logprobs = request.sampling.logprobs is not None
            got = 0
            generated: list[int] = []
            while True:
                if stalled:
                    raise stalled[0]
                if read is None:
                    read = asyncio.ensure_future(call.read())
                if not prefill_done:
                    if not prefill_task.done():
                        await asyncio.wait({read, prefill_task},
                                           return_when=asyncio.FIRST_COMPLETED)
                    if stalled:
                        raise stalled[0]
                    if prefill_task.done():
                        exc = prefill_task.exception()
                        if exc is not None:
                            raise self._prefill_failure(prefill, decode, exc)
                        prefill_done = True
                        answer = prefill_task.result()
                        self.balancer.held(prefill, prompt, answer.cached_tokens)
                        self.balancer.computed(prefill, prompt, answer.cached_tokens,
                                               request.snapshot_points)
                    if not read.done():
                        continue
                try:
                    message = await read
                except asyncio.CancelledError:
                    if stalled and not _cancelling():
                        raise stalled[0] from None
                    raise
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED and (
                            time.time() >= request.deadline):
                        raise asyncio.TimeoutError from None
                    if code == grpc.StatusCode.UNAVAILABLE:
                        decode.mark_failed()
                    raise AttemptFailed(f"decode worker {decode.address} failed after {got} "
                                        f"tokens: {_describe(exc)}",
                                        code not in _NOT_RETRIED) from None
                read = None
                if message is grpc.aio.EOF:
                    raise AttemptFailed(f"decode worker {decode.address} ended the stream "
                                        f"without a finish reason after {got} tokens")
                reason = message.finish_reason
                if reason == decode_pb2.FINISH_REASON_ABORT:
                    raise AttemptFailed(f"decode worker {decode.address} aborted the request")
                finish = _FINISH.get(reason)
                tokens = list(message.tokens)
                if got == 0 and tokens:
                    # D holds the whole prompt now (and computed it, for a local prefill).
                    if reserved.local_prefill:
                        self.balancer.computed(decode, prompt, reserved.cached_tokens,
                                               request.snapshot_points)
                    else:
                        self.balancer.received(decode, prompt)
                generated.extend(t.token_id for t in tokens)
                if finish is not None:
                    self.balancer.finished(decode, prompt + generated)
                for i, token in enumerate(tokens):
                    got += 1
                    yield TokenOutput(
                        token_id=token.token_id,
                        logprob=token.logprob if want_logprobs else None,
                        top_logprobs=tuple((t.token_id, t.logprob) for t in token.top_logprobs),
                        finish_reason=finish if i + 1 == len(tokens) else None,
                        cached_tokens=message.num_cached_tokens if got == 1 else None)
                if finish is not None:
                    if not tokens:  # the finish came in a message of its own
                        yield TokenOutput(token_id=None, finish_reason=finish)
                    return
        finally:
            if watch is not None:
                watch.cancel()
            decode.inflight -= 1
            if read is not None:
                if read.done():
                    _retrieve(read)  # failed beside a prefill failure that was reported
                else:
                    read.cancel()
            if call is None:
                # Given up between Reserve and Generate (no prefill worker, cancelled).
                self._release(decode, reserved.reservation_id, metadata)
            else:
                # Cancelling D's call releases its reservation; cancelling P's stops its
                # transfer.
                call.cancel()
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()

    @staticmethod
    async def _watch_stall(waited_on, on_stall) -> None:
        """Calls on_stall(AttemptFailed) once a worker in waited_on() stops answering health
        checks (the discovery loop counts them)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for worker in waited_on():
                if worker.failures >= STALLED_AFTER_FAILED_CHECKS:
                    on_stall(AttemptFailed(
                        f"{worker.role} worker {worker.address} stopped answering "
                        f"({worker.failures} health checks failed in a row)"))
                    return

    @staticmethod
    def _prefill_failure(prefill: Worker, decode: Worker, exc: BaseException) -> AttemptFailed:
        if not isinstance(exc, grpc.aio.AioRpcError):
            return AttemptFailed(f"prefill worker {prefill.address} failed: {exc!r}")
        retryable = exc.code() not in _NOT_RETRIED
        if _failed_peer(exc) == "decode":
            # P is fine: its transfer to D failed (D died, refused the handshake, ...).
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                decode.mark_failed()
            return AttemptFailed(f"the transfer from prefill worker {prefill.address} to "
                                 f"decode worker {decode.address} failed: {_describe(exc)}",
                                 retryable)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            prefill.mark_failed()  # P is unreachable or draining
        return AttemptFailed(f"prefill worker {prefill.address} failed: {_describe(exc)}",
                             retryable)


def _failed_peer(exc: grpc.aio.AioRpcError) -> str | None:
    """Which peer a worker's failure was about (its trailing metadata), if it says."""
    for key, value in exc.trailing_metadata() or ():
        if key == headers.FAILED_PEER:
            return value
    return None


def _cancelling() -> bool:
    """Whether this task itself is being cancelled (Python 3.11+ can tell; before, assume no)."""
    task = asyncio.current_task()
    return bool(task is not None and getattr(task, "cancelling", lambda: 0)())


def _retrieve(task: asyncio.Future) -> None:
    """Marks a finished task's exception as seen (the attempt reports what matters)."""
    if not task.cancelled():
        task.exception()
