"""The decode worker's gRPC services: Reserve, Generate, Release, TransferState (Load and Drain
are WorkerService's).

A request in explicit steps (DESIGN.md, Round 2 seams: P/D with caches):
- Reserve takes cache room at once, pinning the longest prefix of the prompt this worker's
  prefix cache holds (KV and a Mamba snapshot), and answers with a reservation id, its token,
  the prompt's chain hash, how many tokens it holds, and whether it prefills the rest itself
  (at most the router's localPrefillMaxTokens are missing): then the request is already
  running. Otherwise the reservation waits for the rest of the state over TransferState, from
  the prefill worker the router chose and gave the token to.
- Generate(reservation_id) waits (on the reservation's event, no polling) until the state is
  complete, then streams every token the engine's continuous batch produces, the first one
  included; its first message says how many prompt tokens a prefix cache served.
- Release frees a reservation no Generate attached to.
Whatever ends a Generate call early (the router cancelling, a failed or late transfer, a drain
past its bound) releases the reservation or aborts the running request.

This servicer owns every reservation (a DecodeReservation: one state machine, see
engine/reservation.py) from Reserve to its end. Their deadlines (attach, transfer) are entries
on one heap serviced by one thread (baton.workers.deadlines), shared with the transfers'.

Reservations no Generate attached to (un-attached) are what a caller that reserves and never
comes back holds: a Reserve flood. They cannot hold the worker's slots for long: the attach
deadline (--attach-timeout-seconds, 2 s by default: a router calls Generate as soon as Reserve
answered) releases them, and before that a Reserve that finds no room takes back the oldest
un-attached reservation once it has waited reclaim_after_s (1 s; a router's Generate comes
within milliseconds, so a younger one is a real request on its way, and the new Reserve is
refused as full instead: the router queues it and tries again). --max-open-reservations caps
how many may be un-attached at once (default: every slot, so the cap alone never refuses a
burst of real requests); a Reserve at the cap reclaims the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict

import grpc

from baton.proto.baton.decode.v1 import decode_pb2
from baton.workers.deadlines import Deadline, Deadlines
from baton.workers.engine import (
    CacheFull,
    DecodeReservation,
    EndReason,
    EngineDraining,
    ReservationState,
)
from baton.workers.server.runtime import (
    CallEnded,
    WorkerRuntime,
    admitted_request,
    event_token,
)
from baton.workers.transfer import (
    REASON_TO_STATUS,
    FailureReason,
    StateReceiver,
    TransferError,
    TransferStateHandler,
)

log = logging.getLogger(__name__)

SERVICE = "baton.decode.v1.DecodeService"
# A router calls Generate as soon as Reserve answered; a reservation no Generate attached to
# in this long is released (a router that went away, or a Reserve flood).
ATTACH_TIMEOUT_S = 2.0
# An un-attached reservation this old may be taken back for a new Reserve that finds no room.
RECLAIM_AFTER_S = 1.0

_FINISH = {
    None: decode_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": decode_pb2.FINISH_REASON_STOP,
    "length": decode_pb2.FINISH_REASON_LENGTH,
    "abort": decode_pb2.FINISH_REASON_ABORT,
    "grammar_error": decode_pb2.FINISH_REASON_GRAMMAR_ERROR,
}
# Finish reasons of a whole answer (an abort is not one).
_ANSWERED = frozenset({decode_pb2.FINISH_REASON_STOP, decode_pb2.FINISH_REASON_LENGTH,
                       decode_pb2.FINISH_REASON_GRAMMAR_ERROR})


class DecodeServicer:
    """Reserve, Generate, Release and TransferState over one WorkerRuntime."""

    def __init__(self, runtime: WorkerRuntime, attach_timeout_s: float = ATTACH_TIMEOUT_S,
                 max_open: int | None = None, reclaim_after_s: float = RECLAIM_AFTER_S,
                 deadlines: Deadlines | None = None):
        if attach_timeout_s <= 0:
            raise ValueError(f"attach_timeout_s={attach_timeout_s} must be > 0")
        if max_open is not None and max_open < 1:
            raise ValueError(f"max_open={max_open} must be >= 1")
        self.runtime = runtime
        self.attach_timeout_s = attach_timeout_s
        self.max_open = (max_open if max_open is not None
                         else max(1, runtime.config.decode.max_concurrency))
        self.reclaim_after_s = reclaim_after_s
        self.deadlines = Deadlines("baton-decode-deadlines") if deadlines is None else deadlines
        self.receiver = StateReceiver("", metrics=runtime.metrics, deadlines=self.deadlines)
        self.transfer_handler = TransferStateHandler(self.receiver)
        self._lock = threading.Lock()
        self._reservations: dict[str, DecodeReservation] = {}
        # Un-attached reservations, oldest first: (reserved at, time.monotonic(); attach
        # deadline entry).
        self._unattached: OrderedDict[str, tuple[float, Deadline]] = OrderedDict()

    def on_loaded(self) -> None:
        self.receiver.fingerprint = self.runtime.fingerprint

    def generic_handler(self, transfers: bool = True) -> grpc.GenericRpcHandler:
        """The service's handlers; transfers=False leaves TransferState to a TLS listener."""
        methods = {
            "Reserve": grpc.unary_unary_rpc_method_handler(
                self.Reserve, request_deserializer=decode_pb2.ReserveRequest.FromString,
                response_serializer=decode_pb2.ReserveResponse.SerializeToString),
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=decode_pb2.GenerateRequest.FromString,
                response_serializer=decode_pb2.GenerateResponse.SerializeToString),
            "Release": grpc.unary_unary_rpc_method_handler(
                self.Release, request_deserializer=decode_pb2.ReleaseRequest.FromString,
                response_serializer=decode_pb2.ReleaseResponse.SerializeToString)}
        if transfers:
            methods["TransferState"] = self.transfer_handler.method_handler()
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def transfer_only_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE, {"TransferState": self.transfer_handler.method_handler()})

    # ---- the reservations this worker holds ------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._reservations)

    def unattached(self) -> int:
        """Reservations no Generate call attached to yet."""
        with self._lock:
            return len(self._unattached)

    def _hold(self, res: DecodeReservation, attach_by: float) -> None:
        res.on_end = self._forget
        expiry = self.deadlines.at(attach_by, lambda: self._expire(res))
        with self._lock:
            self._reservations[res.reservation_id] = res
            self._unattached[res.reservation_id] = (time.monotonic(), expiry)
        self.runtime.count_held(1)
        if res.state is ReservationState.ENDED:  # ended before it was held (a failed commit)
            self._forget(res)

    def _forget(self, res: DecodeReservation) -> None:
        """The reservation ended (its on_end): it holds nothing more here."""
        with self._lock:
            held = self._reservations.pop(res.reservation_id, None) is res
            entry = self._unattached.pop(res.reservation_id, None)
        if entry is not None:
            entry[1].cancel()
        if held:
            self.runtime.count_held(-1)

    def end(self, res: DecodeReservation, reason: EndReason, message: str) -> None:
        """Ends a reservation whatever its state: the loop releases its room (or aborts its
        running request), and a transfer under way fails (its sender hears why)."""
        self.runtime.loop.release(res, reason, message)
        self.receiver.cancel(res.reservation_id, message)

    def _expire(self, res: DecodeReservation) -> None:
        # On the deadline thread: ending only queues work for the loop.
        with self._lock:
            if res.reservation_id not in self._unattached:
                return
        log.info("reservation %s of request %s expired: no Generate call attached in %.1f s",
                 res.reservation_id, res.request_id, self.attach_timeout_s)
        self.end(res, EndReason.ATTACH_EXPIRED, "no Generate call attached to the reservation "
                 "in time")

    def _reclaim(self, why: str) -> bool:
        """Takes back the oldest un-attached reservation if it waited reclaim_after_s (see the
        module docstring); whether one was."""
        with self._lock:
            if not self._unattached:
                return False
            rid, (reserved_at, _) = next(iter(self._unattached.items()))
            if time.monotonic() - reserved_at < self.reclaim_after_s:
                return False
            victim = self._reservations[rid]
            del self._unattached[rid]
        log.info("reservation %s of request %s reclaimed: no Generate call attached, and %s",
                 victim.reservation_id, victim.request_id, why)
        released = self.runtime.loop.release(victim, EndReason.RECLAIMED,
                                             "no Generate call attached")
        self.receiver.cancel(rid, "reclaimed: no Generate call attached")
        released.result()  # the room is free before the new Reserve takes some
        return True

    def _reserve_room(self, req, local_prefill_max_tokens: int) -> DecodeReservation:
        """The engine's reservation, reclaiming an un-attached one at the cap or when the
        engine is full."""
        if self.unattached() >= self.max_open and not self._reclaim(
                f"{self.max_open} reservations wait for their Generate call"):
            raise CallEnded("rejected", grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{self.max_open} reservations wait for their Generate call (the "
                            "most this worker holds)")
        try:
            return self.runtime.loop.reserve(req, local_prefill_max_tokens)
        except CacheFull:
            if not self._reclaim("the engine is full"):
                raise
        return self.runtime.loop.reserve(req, local_prefill_max_tokens)

    # ---- Reserve -------------------------------------------------------------------------

    def Reserve(self, request: decode_pb2.ReserveRequest, context: grpc.ServicerContext):
        rt = self.runtime
        arrival = time.monotonic()
        with rt.admit(context):
            try:
                res, response = self._reserve(request)
                if not context.is_active():
                    # The router gave up while this Reserve waited for the engine: nobody
                    # will learn of the reservation, so it goes now.
                    self.end(res, EndReason.RELEASED, "the Reserve call was cancelled")
                    raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                                    f"request {request.request_id}: Reserve was cancelled")
                return response
            except CallEnded as ended:
                # A refused reservation is the request's outcome on this worker; a granted one
                # is counted when its Generate call ends.
                rt.call_finished(ended.outcome, context, arrival)
                context.abort(ended.code, ended.message)

    def _reserve(self, request: decode_pb2.ReserveRequest
                 ) -> tuple[DecodeReservation, decode_pb2.ReserveResponse]:
        rt = self.runtime
        req = admitted_request(request)
        deadline = rt.deadline_of(request, None)
        try:
            res = self._reserve_room(req, int(request.local_prefill_max_tokens))
        except CacheFull as e:
            raise CallEnded("rejected", grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except EngineDraining as e:
            raise CallEnded("rejected", grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ValueError as e:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        res.deadline = deadline
        n, cached = len(req.prompt_ids), res.cached_tokens
        # The state must arrive within the transfer deadline, a Generate attach sooner.
        transfer_by = min(deadline, time.time() + rt.config.router.transfer_timeout_seconds)
        if not res.local_prefill:
            self.receiver.expect(res.reservation_id, req.request_id, n, cached, res,
                                 transfer_by)
        self._hold(res, min(transfer_by, time.time() + self.attach_timeout_s))
        rt.count_saved_transfer(n, cached, res.local_prefill)
        log.debug("reserved %s for request %s: %d of %d prompt tokens cached%s",
                  res.reservation_id, req.request_id, cached, n,
                  ", prefilling the rest here" if res.local_prefill else "")
        return res, decode_pb2.ReserveResponse(
            reservation_id=res.reservation_id, cached_tokens=cached,
            local_prefill=res.local_prefill, reservation_token=res.token,
            prompt_chain_hash=res.chain_hash)

    # ---- Release -------------------------------------------------------------------------

    def Release(self, request: decode_pb2.ReleaseRequest, context: grpc.ServicerContext):
        with self._lock:
            res = self._reservations.get(request.reservation_id)
        released = res is not None and res.state is not ReservationState.ENDED
        if res is not None:
            self.end(res, EndReason.RELEASED, "released by the router")
        return decode_pb2.ReleaseResponse(released=released)

    # ---- Generate ------------------------------------------------------------------------

    def Generate(self, request: decode_pb2.GenerateRequest, context: grpc.ServicerContext):
        rt = self.runtime
        arrival = time.monotonic()
        # A reservation made before a drain began is still served: it is not new work.
        with rt.admit(context, draining_ok=True):
            outcome = "error"
            answered = False  # the answer's last message is with gRPC
            try:
                for response in self._generate(request, context):
                    answered = response.finish_reason in _ANSWERED
                    yield response
                outcome = "success"
            except CallEnded as ended:
                outcome = ended.outcome
                context.abort(ended.code, ended.message)
            finally:
                # A caller with the last message may end the call before gRPC resumes this
                # generator past it (the router cancels its call once it has the finish):
                # that request was served, not cancelled.
                if answered and outcome == "error":
                    outcome = "success"
                rt.call_finished(outcome, context, arrival)

    def _attach(self, rid: str) -> DecodeReservation | None:
        """The reservation for a Generate call; None if unknown, ended or already attached
        (one stream per reservation)."""
        with self._lock:
            res = self._reservations.get(rid)
            if res is None or not res.attach():
                return None
            entry = self._unattached.pop(rid, None)
        if entry is not None:
            entry[1].cancel()
        return res

    def _generate(self, request, context):
        rt = self.runtime
        rid = request.reservation_id
        if not rid:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT,
                            "reservation_id is required: call Reserve first")
        res = self._attach(rid)
        if res is None:
            raise CallEnded("rejected", grpc.StatusCode.NOT_FOUND,
                            f"no reservation {rid!r} to stream (unknown, released, expired or "
                            "already streaming)")

        def on_call_done() -> None:
            # The router cancelled (client gone, prefill failed) or the call finished: free
            # whatever this request still holds (wakes the wait below). A no-op once ended.
            self.end(res, EndReason.RELEASED, "the Generate call ended")

        if not context.add_callback(on_call_done):
            # The call ended (the router gave up) before this handler got here: the callback
            # will never run, so free the reservation now rather than at its deadline.
            on_call_done()
            raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                            f"request {res.request_id}: the call ended before it started")
        # Committed (the stream is in place) or ended, whichever comes first: the transfer's
        # deadline (on the deadline heap) bounds the wait, and the request's bounds it too.
        if not res.wait_started(timeout=max(res.deadline - time.time(), 0.0)):
            self.end(res, EndReason.DEADLINE, "the request passed its deadline")
            raise CallEnded("timeout", grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"request {res.request_id} passed its deadline before its state "
                            "came")
        stream = res.stream
        if stream is None:
            raise self._ended_before_start(res)
        last = None
        first = True
        while True:
            left = res.deadline - time.time()
            try:
                event = stream.get(timeout=max(left, 0.0))
            except StopIteration:
                return
            except queue.Empty:
                self.end(res, EndReason.DEADLINE, "the request passed its deadline")
                raise CallEnded("timeout", grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {res.request_id} passed its deadline") from None
            except EngineDraining as e:
                raise CallEnded("error", grpc.StatusCode.UNAVAILABLE, str(e)) from None
            now = time.monotonic()
            if event.token_id is not None:
                if last is None:
                    rt.metrics.time_to_first_token.observe(now - res.reserved_at)
                else:
                    rt.metrics.inter_token_latency.observe(now - last)
                last = now
            if event.finished:
                res.end(EndReason.FINISHED)
            yield decode_pb2.GenerateResponse(
                tokens=[event_token(event)] if event.token_id is not None else [],
                finish_reason=_FINISH[event.finish_reason],
                num_prompt_tokens=event.num_prompt_tokens,
                num_generated_tokens=event.num_generated,
                num_cached_tokens=_cached_tokens(res) if first else 0)
            first = False
            if event.finished:
                return

    @staticmethod
    def _ended_before_start(res: DecodeReservation) -> CallEnded:
        """Why a reservation ended before its request ran, as the Generate call's status."""
        error = res.transfer_error
        if res.ended is EndReason.TRANSFER_FAILED and isinstance(error, TransferError):
            outcome = {FailureReason.DEADLINE_EXCEEDED: "timeout",
                       FailureReason.CANCELLED: "cancelled"}.get(error.reason, "error")
            return CallEnded(outcome, REASON_TO_STATUS[error.reason], error.message)
        if res.ended is EndReason.RELEASED:
            return CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                             f"request {res.request_id}: {res.end_message}")
        if res.ended is EndReason.SHUTDOWN:
            return CallEnded("error", grpc.StatusCode.UNAVAILABLE,
                             f"request {res.request_id}: {res.end_message}")
        return CallEnded("error", grpc.StatusCode.ABORTED,
                         f"request {res.request_id}: the reservation ended "
                         f"({res.ended.value if res.ended else 'unknown'}): {res.end_message}")


def _cached_tokens(res: DecodeReservation) -> int:
    """What the client is told came from a prefix cache: this worker's hit for a local
    prefill, the prefill worker's for a transferred prompt."""
    return res.cached_tokens if res.local_prefill else res.sender_cached_tokens
