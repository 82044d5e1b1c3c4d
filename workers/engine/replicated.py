"""One engine replicated over the expert-parallel ranks of a replica: the followers' side.

Inside a replica all ranks run the same batch (DESIGN.md, Seams: expert parallelism): the
MoE layers exchange tokens between ranks with collectives, so every rank must step the same
sequences in the same order. The engine is deterministic given the same sequence of calls
(the schedule depends only on its inputs, seeded sampling is counter-based, and the
expert-parallel combine gives every rank the same bits), so it is enough that every rank sees
the same calls:

    rank 0:     EngineLoop(engine, channel=...)     every call that changes the engine is
                                                     first sent to the followers (an Op), then
                                                     run locally, under one lock (loop.py)
    rank 1..n:  follow(engine, channel)              replays each call on its own engine

Only rank 0 talks to the outside: followers replay prefills with a sink that drops the state
(rank 0 sends it) and drop their token events. Reservations are named by a serial that every
rank counts alike (one per successful reserve); a follower binds its own copy without a token
check (rank 0 checked the handshake before sending the bind).

At shutdown each follower reports a digest of every token it sampled (ids and logprobs);
rank 0 compares them with its own, which checks the lockstep claim on live traffic.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

from baton.workers.engine.handoff import LayerState, PrefillResult, PrefillSink
from baton.workers.engine.request import Request
from baton.workers.engine.reservation import DecodeReservation, ReservationState

if TYPE_CHECKING:
    from baton.workers.engine.engine import Engine

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


class GuardedSink:
    """Rank 0's prefill sink: the first error is kept, not raised (see loop.py)."""

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


class DroppedSink:
    """A follower's prefill sink: rank 0 sends the state."""

    def on_layer(self, state: LayerState) -> None:
        pass


class Op:
    """The calls rank 0 sends (first element of each message)."""

    ADD_REQUEST = "add_request"
    ABORT = "abort"
    ADD_PREFILL = "add_prefill"
    RESERVE = "reserve"
    BIND = "bind"
    WRITE = "write"
    COMMIT = "commit"
    RELEASE = "release"
    STEP = "step"
    SHUTDOWN = "shutdown"


def parted_ranks(digests: list[tuple[int, int, str]]) -> list[int]:
    """The ranks whose (steps, tokens, digest) differ from rank 0's."""
    return [rank for rank, d in enumerate(digests) if d != digests[0]]


def follow(engine: Engine, channel: Channel) -> TokenDigest:
    """A follower's loop: replays rank 0's calls on engine until the shutdown message."""
    digest = TokenDigest()
    reservations: dict[int, DecodeReservation] = {}
    serial = 0
    while True:
        op, *args = channel.recv()
        if op == Op.SHUTDOWN:
            channel.gather(digest.summary())
            return digest
        if op == Op.STEP:
            # A step that fails here failed on rank 0 too: the replica stops.
            digest.steps += 1
            for event in engine.step():
                digest.add(event.request_id, event.token_id, event.logprob)
            continue
        try:
            if op == Op.ADD_REQUEST:
                engine.add_request(args[0])
            elif op == Op.ABORT:
                engine.abort(args[0])
                _forget_ended(reservations)
            elif op == Op.ADD_PREFILL:
                request, sink_from = args
                engine.add_prefill(request, DroppedSink(), _prefill_recorder(digest, request),
                                   sink_from)
            elif op == Op.RESERVE:
                reservation = engine.reserve(args[0], args[1])
                # Rank 0 counts a reservation only when reserve succeeded, and so does this.
                serial += 1
                if not reservation.local_prefill:
                    reservations[serial] = reservation
            elif op == Op.BIND:
                res = reservations[args[0]]
                res.bind(res.token, res.chain_hash)  # rank 0 checked the sender's
            elif op == Op.WRITE:
                reservations[args[0]].write(args[1])
            elif op == Op.COMMIT:
                reservations.pop(args[0]).commit(*args[1:])
            elif op == Op.RELEASE:
                reservations.pop(args[0]).release()
            else:
                raise ValueError(f"unknown replicated engine call {op!r}")
        except Exception as exc:
            # Rank 0 got the same error from the same call (CacheFull, a state write that
            # does not fit): the failure left its engine as it was, and this one too.
            if op not in _REPLAYED:
                raise
            log.debug("replayed %s failed as it did on rank 0: %s", op, exc)


_REPLAYED = frozenset({Op.ADD_REQUEST, Op.ABORT, Op.ADD_PREFILL, Op.RESERVE, Op.BIND,
                       Op.WRITE, Op.COMMIT, Op.RELEASE})


def _forget_ended(reservations: dict[int, DecodeReservation]) -> None:
    """Drops reservations an abort released (rank 0 sends nothing more for them)."""
    for serial in [s for s, r in reservations.items()
                   if r.state is ReservationState.ENDED]:
        del reservations[serial]


def _prefill_recorder(digest: TokenDigest, request: Request):
    def done(outcome: PrefillResult | BaseException) -> None:
        if isinstance(outcome, PrefillResult):
            digest.add(request.request_id, outcome.first_token, outcome.logprob)

    return done
