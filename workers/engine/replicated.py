"""One engine replicated over the expert-parallel ranks of a replica.

Inside a replica all ranks run the same batch (DESIGN.md, Seams: expert parallelism): the
MoE layers exchange tokens between ranks with collectives, so every rank must step the same
sequences in the same order. The engine is deterministic given the same sequence of calls
(the schedule depends only on its inputs, seeded sampling is counter-based, and the
expert-parallel combine gives every rank the same bits), so it is enough that every rank sees
the same calls:

    rank 0:     ReplicatedEngine(engine, channel)   every state-changing call is first sent
                                                     to the followers, then run locally,
                                                     both under one lock
    rank 1..n:  follow(engine, channel)              replays each call on its own engine

Only rank 0 talks to the outside: followers replay prefills with a sink that drops the state
(rank 0 sends it) and drop their token events. A prefill sink that fails on rank 0 (the
transfer broke) must not change rank 0's schedule alone, so rank 0 swallows the error, and
after the step aborts the request on every rank and hands the error to the prefill's caller.

Reservation writes from transfer threads take the same lock, so on an expert-parallel
replica a write waits for a running step (a single-rank engine copies while it steps).

At shutdown each follower reports a digest of every token it sampled (ids and logprobs);
rank 0 compares them with its own, which checks the lockstep claim on live traffic.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from baton.workers.engine.engine import Engine
from baton.workers.engine.handoff import LayerState, PrefillResult, PrefillSink
from baton.workers.engine.request import Request, TokenEvent
from baton.workers.engine.reservation import Reservation
from baton.workers.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class Channel(Protocol):
    """Rank 0 -> followers, in order (a torch.distributed broadcast, or a queue in tests)."""

    def send(self, message: tuple) -> None: ...

    def recv(self) -> tuple: ...

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, rank 0's first (rank 0's list; followers get [])."""
        ...


class DistributedChannel:
    """A Channel over a torch.distributed group (gloo: control messages are CPU objects)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def send(self, message: tuple) -> None:
        self._dist.broadcast_object_list([message], src=0, group=self.group)

    def recv(self) -> tuple:
        box: list = [None]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        out: list | None = [None] * self.size if self.rank == 0 else None
        self._dist.gather_object(value, out, dst=0, group=self.group)
        return out or []


class TokenDigest:
    """A running digest of every token an engine sampled, in order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.tokens = 0
        self.steps = 0

    def add(self, request_id: str, token: int | None, logprob: float | None) -> None:
        if token is None:
            return
        self._hash.update(f"{request_id}\0{token}\0{logprob!r}\n".encode())
        self.tokens += 1

    def summary(self) -> tuple[int, int, str]:
        """(steps, tokens, hex digest)."""
        return self.steps, self.tokens, self._hash.hexdigest()


class _GuardedSink:
    """Rank 0's prefill sink: the first error is kept, not raised (see the module docstring)."""

    def __init__(self, sink: PrefillSink):
        self.sink = sink
        self.error: BaseException | None = None

    def on_layer(self, state: LayerState) -> None:
        if self.error is not None:
            return
        try:
            self.sink.on_layer(state)
        except Exception as exc:
            self.error = exc


class _DroppingSink:
    """A follower's prefill sink: rank 0 sends the state."""

    def on_layer(self, state: LayerState) -> None:
        pass


class _Ops:
    """The calls rank 0 sends (first element of each message)."""

    ADD_REQUEST = "add_request"
    ABORT = "abort"
    ADD_PREFILL = "add_prefill"
    PREFILL = "prefill"
    RESERVE = "reserve"
    WRITE = "write"
    COMMIT = "commit"
    RELEASE = "release"
    STEP = "step"
    SHUTDOWN = "shutdown"


class ReplicatedReservation:
    """Rank 0's view of a reservation: write, commit and release reach every rank."""

    def __init__(self, owner: ReplicatedEngine, reservation: Reservation, serial: int):
        self._owner = owner
        self._reservation = reservation
        self._serial = serial
        self.request_id = reservation.request_id
        self.n_tokens = reservation.n_tokens
        self.cached_tokens = reservation.cached_tokens
        self.local_prefill = reservation.local_prefill

    @property
    def state(self) -> str:
        return self._reservation.state

    def missing(self) -> list[str]:
        return self._reservation.missing()

    def write(self, state: LayerState) -> None:
        # Followers get a CPU copy: the control channel carries CPU objects only.
        message = replace(state, tensor=state.tensor.detach().cpu())
        with self._owner._lock:
            self._owner._send((_Ops.WRITE, self._serial, message))
            self._reservation.write(state)

    def commit(self, first_token: int, sampling: SamplingParams | None = None,
               logprob: float | None = None,
               top_logprobs: list[tuple[int, float]] | None = None) -> str:
        owner = self._owner
        with owner._lock:
            owner._refuse_inside_step("commit")
            owner._send((_Ops.COMMIT, self._serial, first_token, sampling, logprob,
                         top_logprobs))
            result = self._reservation.commit(first_token, sampling, logprob, top_logprobs)
            owner._reservations.pop(self.request_id, None)
            return result

    def release(self) -> None:
        owner = self._owner
        with owner._lock:
            owner._refuse_inside_step("release")
            state = self._reservation.state
            if state == "open":
                owner._send((_Ops.RELEASE, self._serial))
            elif state == "committed":
                # What Reservation.release does after commit; followers forgot the serial.
                owner._send((_Ops.ABORT, self.request_id))
            self._reservation.release()
            if owner._reservations.get(self.request_id) is self:
                del owner._reservations[self.request_id]


class ReplicatedEngine:
    """Rank 0's engine: the Engine API, with every state-changing call replayed on the
    followers first. Reads (stats, has_work, scheduler, ...) go to the local engine."""

    def __init__(self, engine: Engine, channel: Channel):
        self.engine = engine
        self.channel = channel
        # One lock orders every call on every rank: the loop thread's calls and steps, and
        # the transfer threads' reservation writes.
        self._lock = threading.RLock()
        self._in_step = False
        self._deferred_aborts: list[str] = []
        self._guards: dict[str, _GuardedSink] = {}
        self._reservations: dict[str, ReplicatedReservation] = {}
        self._serial = 0
        self._closed = False
        self.digest = TokenDigest()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise RuntimeError("the replicated engine is shut down")
        self.channel.send(message)

    def _refuse_inside_step(self, what: str) -> None:
        if self._in_step:
            # Followers are inside the same step, running collectives: they cannot take the
            # call until it ends, so running it now on rank 0 alone would part the ranks.
            raise RuntimeError(f"{what} was called inside an engine step")

    @property
    def reservations(self) -> dict[str, ReplicatedReservation]:
        """Open reservations by request id (what EngineLoop releases when it stops)."""
        with self._lock:
            return {rid: r for rid, r in self._reservations.items() if r.state == "open"}

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        with self._lock:
            self._refuse_inside_step("add_request")
            self._send((_Ops.ADD_REQUEST, request))
            self.engine.add_request(request)

    def abort(self, request_id: str) -> bool | None:
        """As Engine.abort; inside a step (a callback) the abort runs right after the step."""
        with self._lock:
            if self._in_step:
                self._deferred_aborts.append(request_id)
                return None
            self._send((_Ops.ABORT, request_id))
            aborted = self.engine.abort(request_id)
            for rid in [r for r, res in self._reservations.items() if res.state != "open"]:
                del self._reservations[rid]
            return aborted

    def add_prefill(self, request: Request, sink: PrefillSink,
                    on_done: Callable[[PrefillResult | BaseException], None],
                    sink_from: int = 0) -> None:
        guard = _GuardedSink(sink)
        rid = request.request_id

        def done(outcome: PrefillResult | BaseException) -> None:
            self._guards.pop(rid, None)
            if isinstance(outcome, PrefillResult):
                self.digest.add(rid, outcome.first_token, outcome.logprob)
            on_done(guard.error if guard.error is not None else outcome)

        with self._lock:
            self._refuse_inside_step("add_prefill")
            self._send((_Ops.ADD_PREFILL, request, sink_from))
            self.engine.add_prefill(request, guard, done, sink_from)
            self._guards[rid] = guard

    def prefill(self, request: Request, sink: PrefillSink, sink_from: int = 0) -> PrefillResult:
        guard = _GuardedSink(sink)
        with self._lock:
            self._refuse_inside_step("prefill")
            self._send((_Ops.PREFILL, request, sink_from))
            self._in_step = True
            try:
                result = self.engine.prefill(request, guard, sink_from)
            finally:
                self._in_step = False
            self.digest.add(request.request_id, result.first_token, result.logprob)
            self._after_step()
        if guard.error is not None:
            raise guard.error
        return result

    def reserve(self, request: Request, local_prefill_max_tokens: int = 0
                ) -> ReplicatedReservation:
        with self._lock:
            self._refuse_inside_step("reserve")
            self._send((_Ops.RESERVE, request, local_prefill_max_tokens))
            reservation = self.engine.reserve(request, local_prefill_max_tokens)
            self._serial += 1
            wrapped = ReplicatedReservation(self, reservation, self._serial)
            self._reservations[request.request_id] = wrapped
            return wrapped

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        with self._lock:
            self._refuse_inside_step("step")
            self._send((_Ops.STEP,))
            self._in_step = True
            try:
                events = self.engine.step()
            finally:
                self._in_step = False
            self.digest.steps += 1
            for event in events:
                self.digest.add(event.request_id, event.token_id, event.logprob)
            self._after_step()
            return events

    def _after_step(self) -> None:
        failed = [rid for rid, guard in self._guards.items() if guard.error is not None]
        for rid in self._deferred_aborts + failed:
            self.abort(rid)
        self._deferred_aborts = []

    # ---- shutdown ------------------------------------------------------------------------

    def shutdown(self) -> bool:
        """Tells the followers to exit; True when every rank sampled the same tokens."""
        with self._lock:
            if self._closed:
                return True
            self._send((_Ops.SHUTDOWN,))
            self._closed = True
            digests = self.channel.gather(self.digest.summary())
        mine = digests[0]
        parted = [rank for rank, d in enumerate(digests) if d != mine]
        if parted:
            log.error("expert-parallel ranks %s parted from rank 0: (steps, tokens, digest) "
                      "%s vs %s", parted, [digests[r] for r in parted], mine)
            return False
        log.info("expert-parallel ranks agree: %d ranks, %d steps, %d tokens, digest %s",
                 len(digests), mine[0], mine[1], mine[2][:16])
        return True


def follow(engine: Engine, channel: Channel) -> TokenDigest:
    """A follower's loop: replays rank 0's calls on engine until the shutdown message."""
    digest = TokenDigest()
    reservations: dict[int, Reservation] = {}
    serial = 0
    while True:
        op, *args = channel.recv()
        if op == _Ops.SHUTDOWN:
            channel.gather(digest.summary())
            return digest
        if op == _Ops.STEP:
            # A step that fails here failed on rank 0 too: the replica stops.
            digest.steps += 1
            for event in engine.step():
                digest.add(event.request_id, event.token_id, event.logprob)
            continue
        try:
            if op == _Ops.ADD_REQUEST:
                engine.add_request(args[0])
            elif op == _Ops.ABORT:
                engine.abort(args[0])
                _forget_closed(reservations)
            elif op == _Ops.ADD_PREFILL:
                request, sink_from = args
                engine.add_prefill(request, _DroppingSink(), _prefill_recorder(digest, request),
                                   sink_from)
            elif op == _Ops.PREFILL:
                request, sink_from = args
                result = engine.prefill(request, _DroppingSink(), sink_from)
                digest.add(request.request_id, result.first_token, result.logprob)
            elif op == _Ops.RESERVE:
                reservation = engine.reserve(args[0], args[1])
                # Rank 0 counts a reservation only when reserve succeeded, and so does this.
                serial += 1
                reservations[serial] = reservation
            elif op == _Ops.WRITE:
                reservations[args[0]].write(args[1])
            elif op == _Ops.COMMIT:
                reservations.pop(args[0]).commit(*args[1:])
            elif op == _Ops.RELEASE:
                reservations.pop(args[0]).release()
            else:
                raise ValueError(f"unknown replicated engine call {op!r}")
        except Exception as exc:
            # Rank 0 got the same error from the same call (CacheFull, a state write that
            # does not fit): the failure left its engine as it was, and this one too.
            if op not in _REPLAYED:
                raise
            log.debug("replayed %s failed as it did on rank 0: %s", op, exc)


_REPLAYED = frozenset({_Ops.ADD_REQUEST, _Ops.ABORT, _Ops.ADD_PREFILL, _Ops.PREFILL,
                       _Ops.RESERVE, _Ops.WRITE, _Ops.COMMIT, _Ops.RELEASE})


def _forget_closed(reservations: dict[int, Reservation]) -> None:
    """Drops reservations an abort released (rank 0 sends nothing more for them)."""
    for serial in [s for s, r in reservations.items() if r.state != "open"]:
        del reservations[serial]


def _prefill_recorder(digest: TokenDigest, request: Request):
    def done(outcome: PrefillResult | BaseException) -> None:
        if isinstance(outcome, PrefillResult):
            digest.add(request.request_id, outcome.first_token, outcome.logprob)

    return done
