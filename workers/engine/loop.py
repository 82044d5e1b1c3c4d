"""EngineLoop: the engine on a background thread, with a thread-safe (and asyncio-friendly) API.

The engine itself is single-threaded. The loop thread owns it: it runs queued commands
(submit, abort, prefill, reserve, commit, release) between steps, then `engine.step()`, then
hands each TokenEvent to its request's RequestStream. Callers on other threads (gRPC handlers,
an asyncio server) never touch the engine directly, with two exceptions: a DecodeReservation's
bind and write run on the transfer's thread, as they touch only that reservation's own pages
and slot, so transfers do not wait for steps.

Expert parallelism (DESIGN.md, Seams: expert parallelism inside a replica) lives here too:
given a Channel to the follower ranks, the loop sends every call that changes the engine
(add_request, abort, add_prefill, reserve, bind, write, commit, release, step) to the
followers before it runs it, so that every rank steps the same sequences in the same order
(replicated.py: the followers' side, and why that is enough). One lock orders the calls: the
loop thread holds it through a step, so a reservation write from a transfer thread waits for
the step to end on an expert-parallel replica (a single-rank engine copies while it steps).
A prefill sink that fails on rank 0 (the transfer broke) must not change rank 0's schedule
alone: its error is kept, not raised, and after the step the request is aborted on every rank.
An abort asked for inside a step waits for the step's end, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from baton.workers.engine.config import EngineStats
from baton.workers.engine.engine import Engine
from baton.workers.engine.handoff import PrefillResult, PrefillSink
from baton.workers.engine.replicated import (
    Channel,
    GuardedSink,
    Op,
    TokenDigest,
    parted_ranks,
)
from baton.workers.engine.request import Request, TokenEvent
from baton.workers.engine.reservation import DecodeReservation, EndReason, ReservationState
from baton.workers.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDraining(RuntimeError):
    """The loop is draining or stopped and takes no new work."""


class RequestStream:
    """The TokenEvents of one request, for a thread (iterate) or asyncio (async iterate).

    Iteration ends after the event with a finish reason. `close()` aborts the request if it
    is still running (a client that went away frees its cache).
    """

    def __init__(self, loop: EngineLoop, request_id: str) -> None:
        self.request_id = request_id
        self._loop = loop
        self._lock = threading.Lock()
        self._buffer: queue.SimpleQueue = queue.SimpleQueue()
        self._aio: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self.finished = False
        self._done = False  # the consumer saw the last item

    # called on the loop thread
    def _push(self, item: TokenEvent | BaseException) -> None:
        with self._lock:
            if isinstance(item, BaseException) or item.finished:
                self.finished = True
            if self._aio is None:
                self._buffer.put(item)
                return
            aio_loop, aio_queue = self._aio
        try:
            aio_loop.call_soon_threadsafe(aio_queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
            self._loop.abort(self.request_id)

    def _next_item(self, item) -> TokenEvent:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> TokenEvent:
        return self.get()

    def get(self, timeout: float | None = None) -> TokenEvent:
        """The next event (blocking); StopIteration after the last one; queue.Empty on timeout."""
        if self._done:
            raise StopIteration
        return self._next_item(self._buffer.get(timeout=timeout))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        with self._lock:
            if self._aio is None:
                aio_queue: asyncio.Queue = asyncio.Queue()
                while not self._buffer.empty():
                    aio_queue.put_nowait(self._buffer.get())
                self._aio = (asyncio.get_running_loop(), aio_queue)
        return self._next_item(await self._aio[1].get())

    def close(self) -> None:
        """Abort the request unless it already finished."""
        if not self.finished:
            self._loop.abort(self.request_id)

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        # Also on asyncio.CancelledError: a cancelled consumer must not leave work running.
        self.close()


class EngineLoop:
    """Runs `engine.step()` on a background thread; every public method is thread-safe.

    channel: the follower ranks of an expert-parallel replica (see the module docstring);
    None for a single-rank engine.
    """

    def __init__(self, engine: Engine, idle_wait: float = 0.05, name: str = "baton-engine",
                 channel: Channel | None = None):
        self.engine = engine
        self._idle_wait = idle_wait
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._prefills: dict[str, Future] = {}
        self._stats = engine.stats()
        self._draining = False
        self._stopping = False
        self._call_lock = threading.Lock()
        self._channel = channel
        self.replica_lock = threading.RLock()
        """Expert parallelism: orders every call on every rank (the loop thread's calls and
        steps, and the transfer threads' reservation binds and writes)."""
        self._in_step = False
        self._after_step: list[str] = []  # request ids to abort once the step ended
        self._guards: dict[str, GuardedSink] = {}
        self._serials: dict[int, int] = {}  # id(reservation) -> its serial on every rank
        self._serial = 0
        self._followers_closed = False
        self.digest = TokenDigest()
        """Every token sampled, in order (expert parallel: compared with the followers')."""
        self.error: BaseException | None = None
        """Set when a step raised: the loop then stops and fails every open request."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- the loop thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._run_commands()
                if self.engine.has_work():
                    self._dispatch(self._step())
                    self._stats = self.engine.stats()
                else:
                    self._stats = self.engine.stats()
                    self._wake.wait(self._idle_wait)
                    self._wake.clear()
        except BaseException as exc:
            log.exception("engine loop failed; failing every open request")
            self.error = exc
        finally:
            self._shutdown(self.error or EngineDraining("the engine loop stopped"))

    def _run_commands(self) -> None:
        # Only the commands queued so far: a command may queue a follow-up for the next pass.
        for _ in range(self._commands.qsize()):
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            stream._push(event)
            if event.finished:
                del self._streams[event.request_id]

    def _shutdown(self, error: BaseException) -> None:
        with self._call_lock:
            self._stopping = True  # from here on _call queues nothing
        self._run_commands_failing(error)
        try:
            if self.error is None:
                # An orderly stop: open requests end with finish_reason "abort".
                self._abort_everything()
                self._dispatch(self._step())
        except Exception:
            log.exception("engine loop: aborting open requests failed")
        for rid in list(self._streams):
            self._streams.pop(rid)._push(error)
        for rid in list(self._prefills):
            future = self._prefills.pop(rid)
            if not future.done():
                future.set_exception(error)
        try:
            self._abort_everything()
            self._stats = self.engine.stats()
        except Exception:
            log.exception("engine loop: freeing the caches failed")

    def _abort_everything(self) -> None:
        for res in list(self.engine.reservations.values()):
            self._release_now(res, EndReason.SHUTDOWN, "the engine stopped")
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self._abort_now(seq.request_id)

    def _run_commands_failing(self, error: BaseException) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the loop thread between steps."""
        future: Future = Future()
        if threading.current_thread() is self._thread and not self._in_step:
            # Called from the loop thread between steps (a command, a stream's dispatch): run
            # it now, as queueing it and waiting would wait on this very thread.
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
            return future
        with self._call_lock:
            if self._stopping or not self._thread.is_alive():
                future.set_exception(self.error or EngineDraining("the engine loop is stopped"))
                return future
            self._commands.put((fn, future))
        self._wake.set()
        return future

    def _run_call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread between steps and wait for its result."""
        if threading.current_thread() is self._thread and self._in_step:
            # A callback inside a step (a sink, a prefill result): waiting for the loop would
            # wait on this very thread, and on an expert-parallel replica the followers are
            # inside the same step and cannot take the call.
            raise RuntimeError("a call that waits for the engine was made inside an engine "
                               "step")
        return self._call(fn).result()

    def _admit_check(self) -> None:
        if self.error is not None:
            raise EngineDraining(f"the engine loop failed: {self.error!r}") from self.error
        if self._draining or self._stopping:
            raise EngineDraining("the engine is draining and takes no new requests")

    # ---- engine calls, replayed on the follower ranks (the loop thread) ---------------------

    def _send(self, message: tuple) -> None:
        if self._channel is None:
            return
        if self._followers_closed:
            raise RuntimeError("the follower ranks were shut down")
        self._channel.send(message)

    def _step(self) -> list[TokenEvent]:
        with self.replica_lock:
            self._send((Op.STEP,))
            self._in_step = True
            try:
                events = self.engine.step()
            finally:
                self._in_step = False
            self.digest.steps += 1
            for event in events:
                self.digest.add(event.request_id, event.token_id, event.logprob)
            failed = [rid for rid, guard in self._guards.items() if guard.error is not None]
            aborts, self._after_step = self._after_step + failed, []
            for rid in aborts:
                self._abort_now(rid)
            return events

    def _abort_now(self, request_id: str) -> bool:
        with self.replica_lock:
            if self._in_step:
                # Followers are inside the same step, running collectives: the abort waits.
                self._after_step.append(request_id)
                return False
            self._send((Op.ABORT, request_id))
            return self.engine.abort(request_id)

    def _release_now(self, res: DecodeReservation, reason: EndReason, message: str) -> None:
        if res.stream is not None and res.stream.finished:
            res.end(EndReason.FINISHED)  # its request ended in the engine: nothing to free
            return
        with self.replica_lock:
            serial = self._serials.pop(id(res), None)
            if serial is not None and res.state in (ReservationState.OPEN,
                                                    ReservationState.RECEIVING):
                self._send((Op.RELEASE, serial))
            elif res.state in (ReservationState.COMMITTED, ReservationState.STREAMING):
                # What release does after commit; followers forgot the serial.
                self._send((Op.ABORT, res.request_id))
            res.release(reason, message)

    def replay_reservation(self, res: DecodeReservation, op: str, args: tuple) -> None:
        """Replays a reservation's bind or write on the followers (its Mirror: on the
        transfer's thread, under replica_lock, before the local change)."""
        serial = self._serials.get(id(res))
        if serial is None:
            return
        if op == "write":
            # Followers get a CPU copy: the control channel carries CPU objects only.
            (state,) = args
            args = (replace(state, tensor=state.tensor.detach().cpu()),)
        self._send((Op.BIND if op == "bind" else Op.WRITE, serial, *args))

    # ---- public API ----------------------------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; its TokenEvents arrive on the returned stream.

        Bad requests raise ValueError here (validated on the loop thread).
        """
        self._admit_check()
        self.engine.prepare(request)
        stream = RequestStream(self, request.request_id)

        def add() -> None:
            with self.replica_lock:
                self._send((Op.ADD_REQUEST, request))
                self.engine.add_request(request)
            self._streams[request.request_id] = stream

        self._run_call(add)
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (queued, running, prefilling or reserved); no-op if unknown."""
        self._call(lambda: self._abort_now(request_id))

    def run_prefill(self, request: Request, sink: PrefillSink, sink_from: int = 0) -> Future:
        """Prefill for another engine (which holds tokens [0, sink_from) already);
        Future[PrefillResult]. Batched with the other work."""
        self._admit_check()
        self.engine.prepare(request)
        result: Future = Future()
        rid = request.request_id
        guard = GuardedSink(sink) if self._channel is not None else None

        def done(outcome: PrefillResult | BaseException) -> None:
            self._prefills.pop(rid, None)
            self._guards.pop(rid, None)
            if guard is not None and guard.error is not None:
                outcome = guard.error
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                self.digest.add(rid, outcome.first_token, outcome.logprob)
                result.set_result(outcome)

        def add() -> None:
            with self.replica_lock:
                self._send((Op.ADD_PREFILL, request, sink_from))
                self.engine.add_prefill(request, guard or sink, done, sink_from)
            if guard is not None:
                self._guards[rid] = guard
            self._prefills[rid] = result

        self._run_call(add)
        return result

    def reserve(self, request: Request, local_prefill_max_tokens: int = 0) -> DecodeReservation:
        """Room for a request prefilled elsewhere, or here when the prefix cache holds all but
        local_prefill_max_tokens of it (see Engine.reserve); raises CacheFull when there is
        none. A local prefill's tokens arrive on `reservation.stream` at once; otherwise
        commit() sets it."""
        self._admit_check()
        self.engine.prepare(request)

        def reserve() -> DecodeReservation:
            with self.replica_lock:
                self._send((Op.RESERVE, request, local_prefill_max_tokens))
                reservation = self.engine.reserve(request, local_prefill_max_tokens)
                reservation.driver = self
                if self._channel is not None and not reservation.local_prefill:
                    # Rank 0 counts a reservation only when reserve succeeded, as followers do.
                    self._serial += 1
                    self._serials[id(reservation)] = self._serial
                    reservation.mirror = self
                elif self._channel is not None:
                    self._serial += 1  # followers count local prefills too
            if reservation.local_prefill:
                reservation.stream = self._streams[request.request_id] = RequestStream(
                    self, request.request_id)
            return reservation

        return self._run_call(reserve)

    def commit(self, reservation: DecodeReservation, first_token: int,
               sampling: SamplingParams | None = None, logprob: float | None = None,
               top_logprobs: list[tuple[int, float]] | None = None) -> RequestStream:
        """Moves a complete reservation into the running batch (DecodeReservation.commit);
        its stream yields every token, the first one included."""
        rid = reservation.request_id
        stream = RequestStream(self, rid)

        def commit() -> None:
            self._streams[rid] = stream
            try:
                with self.replica_lock:
                    serial = self._serials.get(id(reservation))
                    if serial is not None:
                        self._send((Op.COMMIT, serial, first_token, sampling, logprob,
                                    top_logprobs))
                    reservation.commit(first_token, sampling, logprob, top_logprobs)
                    self._serials.pop(id(reservation), None)
            except BaseException:
                self._streams.pop(rid, None)
                raise
            reservation.stream = stream
            reservation.mark_started()

        self._run_call(commit)
        return stream

    def release(self, reservation: DecodeReservation, reason: EndReason = EndReason.RELEASED,
                message: str = "") -> Future:
        """Ends a reservation and frees what it holds (idempotent; after commit it aborts the
        request). Returns at once; the Future resolves once the engine let go."""
        return self._call(lambda: self._release_now(reservation, reason, message))

    def stats(self) -> EngineStats:
        """The stats after the latest step (never waits for the loop)."""
        return self._stats

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting work and wait until running requests, prefills and reservations
        finished. True when drained, False on timeout."""
        self._draining = True
        done = threading.Event()

        def check() -> None:
            if not self.engine.has_work() and not self.engine.reservations:
                done.set()
            else:
                self._commands.put((check, Future()))

        future = self._call(check)
        if future.done() and future.exception() is not None:
            return True  # the loop is stopped: stopping aborted everything in flight
        return done.wait(timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Abort everything still open and stop the thread."""
        self._draining = True
        with self._call_lock:
            self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def shutdown_followers(self) -> bool:
        """Tells the follower ranks to exit (after stop()); True when every rank sampled the
        same tokens (checks the lockstep claim on live traffic)."""
        if self._channel is None:
            return True
        with self.replica_lock:
            if self._followers_closed:
                return True
            self._send((Op.SHUTDOWN,))
            self._followers_closed = True
            digests = self._channel.gather(self.digest.summary())
        parted = parted_ranks(digests)
        if parted:
            log.error("expert-parallel ranks %s parted from rank 0: (steps, tokens, digest) "
                      "%s vs %s", parted, [digests[r] for r in parted], digests[0])
            return False
        mine = digests[0]
        log.info("expert-parallel ranks agree: %d ranks, %d steps, %d tokens, digest %s",
                 len(digests), mine[0], mine[1], mine[2][:16])
        return True

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
