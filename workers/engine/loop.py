"""EngineLoop: the engine on a background thread, with a thread-safe (and asyncio-friendly) API.

The engine itself is single-threaded. The loop thread owns it: it runs queued commands
(submit, abort, prefill, reserve, commit, release) between steps, then `engine.step()`, then
hands each TokenEvent to its request's RequestStream. Callers on other threads (gRPC handlers,
an asyncio server) never touch the engine directly, with one exception: Reservation.write
copies received state into pages only that reservation owns, so transfers do not wait for
steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from baton.workers.engine.config import EngineStats
from baton.workers.engine.engine import Engine
from baton.workers.engine.handoff import LayerState, PrefillResult, PrefillSink
from baton.workers.engine.request import Request, TokenEvent
from baton.workers.engine.reservation import Reservation
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


class LoopReservation:
    """A Reservation used from outside the loop thread.

    A local prefill's tokens arrive on `stream` (set at reserve time, as the request runs
    at once); otherwise commit() returns the stream."""

    def __init__(self, loop: EngineLoop, reservation: Reservation,
                 stream: RequestStream | None = None) -> None:
        self._loop = loop
        self._reservation = reservation
        self.request_id = reservation.request_id
        self.n_tokens = reservation.n_tokens
        self.cached_tokens = reservation.cached_tokens
        self.local_prefill = reservation.local_prefill
        self.stream = stream

    def write(self, state: LayerState) -> None:
        """Copy one piece of state in (on the caller's thread; see the module docstring)."""
        self._reservation.write(state)

    def missing(self) -> list[str]:
        return self._reservation.missing()

    def commit(
        self,
        first_token: int,
        sampling: SamplingParams | None = None,
        logprob: float | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
    ) -> RequestStream:
        """Join the running batch; the stream yields every token, the first one included."""
        stream = RequestStream(self._loop, self.request_id)

        def commit() -> None:
            self._loop._streams[self.request_id] = stream
            try:
                self._reservation.commit(first_token, sampling, logprob, top_logprobs)
            except BaseException:
                self._loop._streams.pop(self.request_id, None)
                raise

        self._loop._call(commit).result()
        return stream

    def release(self) -> None:
        """Free everything (idempotent; after commit it aborts the request)."""
        self._loop._call(self._reservation.release).result()


class EngineLoop:
    """Runs `engine.step()` on a background thread; every public method is thread-safe."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05, name: str = "baton-engine"):
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
                    self._dispatch(self.engine.step())
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
                self._dispatch(self.engine.step())
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
        for rid in list(self.engine.reservations):
            self.engine.reservations[rid].release()
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq.request_id)

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
        if threading.current_thread() is self._thread:
            # Called from a callback inside a step (a sink, a prefill result): run it now, as
            # queueing it and waiting would wait on this very thread.
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

    def _admit_check(self) -> None:
        if self.error is not None:
            raise EngineDraining(f"the engine loop failed: {self.error!r}") from self.error
        if self._draining or self._stopping:
            raise EngineDraining("the engine is draining and takes no new requests")

    # ---- public API ----------------------------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; its TokenEvents arrive on the returned stream.

        Bad requests raise ValueError here (validated on the loop thread).
        """
        self._admit_check()
        self.engine.prepare(request)
        stream = RequestStream(self, request.request_id)

        def add() -> None:
            self.engine.add_request(request)
            self._streams[request.request_id] = stream

        self._call(add).result()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (queued, running, prefilling or reserved); no-op if unknown."""
        self._call(lambda: self.engine.abort(request_id))

    def run_prefill(self, request: Request, sink: PrefillSink, sink_from: int = 0) -> Future:
        """Prefill for another engine (which holds tokens [0, sink_from) already);
        Future[PrefillResult]. Batched with the other work."""
        self._admit_check()
        self.engine.prepare(request)
        result: Future = Future()

        def done(outcome: PrefillResult | BaseException) -> None:
            self._prefills.pop(request.request_id, None)
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        def add() -> None:
            self.engine.add_prefill(request, sink, done, sink_from)
            self._prefills[request.request_id] = result

        self._call(add).result()
        return result

    def reserve(self, request: Request, local_prefill_max_tokens: int = 0) -> LoopReservation:
        """Room for a request prefilled elsewhere, or here when the prefix cache holds all but
        local_prefill_max_tokens of it (see Engine.reserve); raises CacheFull when there is
        none."""
        self._admit_check()
        self.engine.prepare(request)

        def reserve() -> LoopReservation:
            reservation = self.engine.reserve(request, local_prefill_max_tokens)
            stream = None
            if reservation.local_prefill:
                stream = self._streams[request.request_id] = RequestStream(
                    self, request.request_id)
            return LoopReservation(self, reservation, stream)

        return self._call(reserve).result()

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

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
