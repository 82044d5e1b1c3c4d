"""The production backend: one request through a decode worker and, unless the decode worker
prefills it itself, a prefill worker, in explicit steps (DESIGN.md, Round 2 seams: P/D with
caches).

One attempt (Attempt: an explicit state machine, RESERVED -> GENERATING -> PREFILLED ->
STREAMING -> ENDED), as the router drives it:
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

import grpc

from baton.proto.baton.decode.v1 import decode_pb2
from baton.proto.baton.prefill.v1 import prefill_pb2
from baton.workers.router.attempt import (
    NOT_RETRIED,
    Attempt,
    AttemptFailed,
    describe,
    retrieve,
    watch_stall,
)
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
        reply.add_done_callback(retrieve)
        stalled = asyncio.create_task(watch_stall(lambda: (worker,)))
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
                            f"{describe(exc)}", code not in NOT_RETRIED)

    def _release(self, worker: Worker, reservation_id: str, metadata: tuple) -> None:
        """Frees a reservation no Generate call holds (in the background)."""

        async def release() -> None:
            try:
                await worker.stub.Release(decode_pb2.ReleaseRequest(
                    reservation_id=reservation_id), timeout=RELEASE_TIMEOUT_S,
                    metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                # The reservation expires on the worker anyway.
                log.debug("releasing %s on %s failed: %s", reservation_id, worker.address,
                          describe(exc))

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

    def _attempt(self, request: GenerationRequest, emitted: list[int], attempt: int,
                 avoid: set[str]) -> AsyncIterator[TokenOutput]:
        return Attempt(self, request, emitted, attempt, avoid).run()
