"""The decode worker's gRPC services: Reserve, Generate, Release, TransferState (Load and Drain
are WorkerService's).

A request in explicit steps (DESIGN.md, Round 2 seams: P/D with caches):
- Reserve takes cache room at once, pinning the longest prefix of the prompt this worker's
  prefix cache holds (KV and a Mamba snapshot), and answers with a reservation id, how many
  tokens it holds, and whether it prefills the rest itself (at most the router's
  localPrefillMaxTokens are missing): then the request is already running. Otherwise the
  reservation waits for the rest of the state over TransferState, from the prefill worker
  the router chose.
- Generate(reservation_id) waits until the state is complete (a remote prefill), then streams
  every token the engine's continuous batch produces, the first one included; its first
  message says how many prompt tokens a prefix cache served.
- Release frees a reservation no Generate attached to; one nobody attaches to expires.
Whatever ends a Generate call early (the router cancelling, a failed or late transfer, a drain
past its bound) releases the reservation or aborts the running request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import grpc

from baton.proto.baton.decode.v1 import decode_pb2
from baton.workers.engine import CacheFull, EngineDraining
from baton.workers.server.reservations import Held, HeldReservations, ReservationTarget
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
    TransferState,
    TransferStateHandler,
)

log = logging.getLogger(__name__)

SERVICE = "baton.decode.v1.DecodeService"
# A router calls Generate as soon as Reserve answered; a reservation no Generate attached to
# in this long (a router that went away, or cancelled its Reserve too late to be told) is
# released. (The transfer deadline bounds it too.)
ATTACH_TIMEOUT_S = 10.0

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

    def __init__(self, runtime: WorkerRuntime):
        self.runtime = runtime
        self.receiver = StateReceiver("", metrics=runtime.metrics)
        self.transfer_handler = TransferStateHandler(self.receiver)
        self.held = HeldReservations(self.receiver.cancel, runtime.count_held)

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

    # ---- Reserve -------------------------------------------------------------------------

    def Reserve(self, request: decode_pb2.ReserveRequest, context: grpc.ServicerContext):
        rt = self.runtime
        arrival = time.monotonic()
        with rt.admit(context):
            try:
                response = self._reserve(request)
                if not context.is_active():
                    # The router gave up while this Reserve waited for the engine: nobody
                    # will learn of the reservation, so it goes now.
                    self.held.end(response.reservation_id, "the Reserve call was cancelled")
                    raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                                    f"request {request.request_id}: Reserve was cancelled")
                return response
            except CallEnded as ended:
                # A refused reservation is the request's outcome on this worker; a granted one
                # is counted when its Generate call ends.
                rt.call_finished(ended.outcome, context, arrival)
                context.abort(ended.code, ended.message)

    def _reserve(self, request: decode_pb2.ReserveRequest) -> decode_pb2.ReserveResponse:
        rt = self.runtime
        req = admitted_request(request)
        deadline = rt.deadline_of(request, None)
        try:
            reservation = rt.loop.reserve(req, int(request.local_prefill_max_tokens))
        except CacheFull as e:
            raise CallEnded("rejected", grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except EngineDraining as e:
            raise CallEnded("rejected", grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ValueError as e:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        reservation_id = uuid.uuid4().hex
        n, cached = len(req.prompt_ids), reservation.cached_tokens
        target = ReservationTarget(reservation, req.sampling)
        # The state must arrive within the transfer deadline, a Generate attach sooner.
        transfer_by = min(deadline, time.time() + rt.config.router.transfer_timeout_seconds)
        incoming = None
        if not reservation.local_prefill:
            incoming = self.receiver.expect(reservation_id, req.request_id, n, cached, target,
                                            transfer_by)
        self.held.hold(Held(reservation_id, req.request_id, target, incoming, deadline),
                       min(transfer_by, time.time() + ATTACH_TIMEOUT_S))
        rt.count_saved_transfer(n, cached, reservation.local_prefill)
        log.debug("reserved %s for request %s: %d of %d prompt tokens cached%s",
                  reservation_id, req.request_id, cached, n,
                  ", prefilling the rest here" if reservation.local_prefill else "")
        return decode_pb2.ReserveResponse(reservation_id=reservation_id, cached_tokens=cached,
                                          local_prefill=reservation.local_prefill)

    # ---- Release -------------------------------------------------------------------------

    def Release(self, request: decode_pb2.ReleaseRequest, context: grpc.ServicerContext):
        released = self.held.end(request.reservation_id, "released by the router")
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

    def _generate(self, request, context):
        rt = self.runtime
        rid = request.reservation_id
        if not rid:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT,
                            "reservation_id is required: call Reserve first")
        held = self.held.attach(rid)
        if held is None:
            raise CallEnded("rejected", grpc.StatusCode.NOT_FOUND,
                            f"no reservation {rid!r} to stream (unknown, released, expired or "
                            "already streaming)")
        ended = threading.Event()

        def on_call_done() -> None:
            # The router cancelled (client gone, prefill failed) or the call finished: free
            # whatever this request still holds. A no-op once it is done.
            ended.set()
            self.held.end(rid, "the Generate call ended")

        if not context.add_callback(on_call_done):
            # The call ended (the router gave up) before this handler got here: the callback
            # will never run, so free the reservation now rather than at its deadline.
            on_call_done()
            raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                            f"request {held.request_id}: the call ended before it started")
        incoming = held.incoming
        if incoming is not None:
            while not incoming.wait(timeout=0.5):
                if ended.is_set():
                    raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                                    f"request {held.request_id}: the call ended before its "
                                    "state came")
            if incoming.state is TransferState.FAILED:
                error = incoming.error
                outcome = {FailureReason.DEADLINE_EXCEEDED: "timeout",
                           FailureReason.CANCELLED: "cancelled"}.get(error.reason, "error")
                raise CallEnded(outcome, REASON_TO_STATUS[error.reason], error.message)
        stream = held.target.stream
        last = None
        first = True
        while True:
            left = held.deadline - time.time()
            try:
                event = stream.get(timeout=max(left, 0.0))
            except StopIteration:
                return
            except queue.Empty:
                stream.close()
                raise CallEnded("timeout", grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {held.request_id} passed its deadline") from None
            except EngineDraining as e:
                raise CallEnded("error", grpc.StatusCode.UNAVAILABLE, str(e)) from None
            now = time.monotonic()
            if event.token_id is not None:
                if last is None:
                    rt.metrics.time_to_first_token.observe(now - held.reserved_at)
                else:
                    rt.metrics.inter_token_latency.observe(now - last)
                last = now
            yield decode_pb2.GenerateResponse(
                tokens=[event_token(event)] if event.token_id is not None else [],
                finish_reason=_FINISH[event.finish_reason],
                num_prompt_tokens=event.num_prompt_tokens,
                num_generated_tokens=event.num_generated,
                num_cached_tokens=held.cached_tokens if first else 0)
            first = False
            if event.finished:
                return
