"""The decode worker's reservations between Reserve and the Generate call that streams them.

Reserve (DecodeService) takes cache room and answers at once; the router then starts the
prefill (unless the decode worker prefills locally) and calls Generate with the reservation id.
A reservation lives here from Reserve until its Generate call ends, Release frees it, or no
Generate attached to it by its attach deadline (a router that went away between the two
calls): then it is released, so nothing is held for a caller that will never come.

Each held reservation counts as work in flight for the worker's drain: a drain waits for it to
be attached and streamed, or to expire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from baton.workers.engine import LoopReservation, RequestStream
from baton.workers.sampling_params import SamplingParams
from baton.workers.transfer import FirstToken, IncomingTransfer, TransferError

log = logging.getLogger(__name__)


class ReservationTarget:
    """Delivers a transfer into an engine reservation (a ReceiveTarget)."""

    def __init__(self, reservation: LoopReservation, sampling: SamplingParams):
        self.reservation = reservation
        self.sampling = sampling
        self.stream: RequestStream | None = reservation.stream
        self.sender_cached_tokens = 0
        """Prompt tokens the prefill worker's prefix cache served (from its completion)."""

    def write(self, state) -> None:
        self.reservation.write(state)

    def complete(self, first_token: FirstToken, cached_tokens: int) -> None:
        wants_logprobs = self.sampling.wants_logprobs
        self.sender_cached_tokens = cached_tokens
        self.stream = self.reservation.commit(
            first_token.token_id, self.sampling,
            logprob=first_token.logprob if wants_logprobs else None,
            top_logprobs=list(first_token.top_logprobs))

    def fail(self, error: TransferError) -> None:
        self.reservation.release()


@dataclass
class Held:
    """One reservation between Reserve and the end of its Generate call."""

    reservation_id: str
    request_id: str
    target: ReservationTarget
    incoming: IncomingTransfer | None
    """The transfer it waits for; None for a local prefill."""
    deadline: float
    """The request's deadline (time.time())."""
    reserved_at: float = field(default_factory=time.monotonic)
    attached: bool = False
    ended: bool = False

    @property
    def local_prefill(self) -> bool:
        return self.incoming is None

    @property
    def cached_tokens(self) -> int:
        """What the client is told came from a prefix cache: this worker's hit for a local
        prefill, the prefill worker's for a transferred prompt."""
        if self.local_prefill:
            return self.target.reservation.cached_tokens
        return self.target.sender_cached_tokens


class HeldReservations:
    """Reservations by id, with their attach deadlines (see the module docstring)."""

    def __init__(self, cancel_transfer: Callable[[str, str], object],
                 on_hold: Callable[[int], None]):
        self._cancel_transfer = cancel_transfer
        self._on_hold = on_hold  # +1 / -1: in-flight accounting for drains
        self._held: dict[str, Held] = {}
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def hold(self, held: Held, attach_by: float) -> None:
        """Registers a reservation that a Generate call must attach to by attach_by."""
        timer = threading.Timer(max(0.0, attach_by - time.time()), self._expire,
                                args=(held.reservation_id,))
        timer.daemon = True
        with self._lock:
            self._held[held.reservation_id] = held
            self._timers[held.reservation_id] = timer
        self._on_hold(1)
        timer.start()

    def attach(self, reservation_id: str) -> Held | None:
        """The reservation for a Generate call; None if unknown, released, expired or already
        attached (one stream per reservation)."""
        with self._lock:
            held = self._held.get(reservation_id)
            if held is None or held.attached or held.ended:
                return None
            held.attached = True
            timer = self._timers.pop(reservation_id, None)
        if timer is not None:
            timer.cancel()
        return held

    def end(self, reservation_id: str, why: str) -> bool:
        """Frees whatever the reservation still holds and forgets it; idempotent. Returns
        whether this call ended it."""
        with self._lock:
            held = self._held.pop(reservation_id, None)
            timer = self._timers.pop(reservation_id, None)
            if held is None or held.ended:
                return False
            held.ended = True
        if timer is not None:
            timer.cancel()
        try:
            # A transfer still under way fails, and its failure releases the reservation.
            if held.incoming is None or not self._cancel_transfer(reservation_id, why):
                if held.target.stream is not None:
                    held.target.stream.close()  # aborts the request unless it finished
                else:
                    held.target.reservation.release()
        finally:
            self._on_hold(-1)
        return True

    def _expire(self, reservation_id: str) -> None:
        with self._lock:
            held = self._held.get(reservation_id)
            if held is None or held.attached:
                return
        if self.end(reservation_id, "no Generate call attached to the reservation in time"):
            log.info("reservation %s of request %s expired: no Generate call attached",
                     reservation_id, held.request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
