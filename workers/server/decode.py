"""The decode worker's gRPC services: Generate, TransferState, Load and Drain.

Generate reserves cache room at once, waits for the request's state to arrive over
TransferState (from the prefill worker the router chose), commits the reservation and streams
every token the engine's continuous batch produces, the prefill's first token included.
Whatever ends the call early (the router cancelling, a failed or late transfer, a drain past
its bound) releases the reservation or aborts the running request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from baton.proto.baton.decode.v1 import decode_pb2
from baton.workers import headers
from baton.workers.engine import CacheFull, EngineDraining, LoopReservation, RequestStream
from baton.workers.engine import SamplingParams as EngineSampling
from baton.workers.server.runtime import (
    CallEnded,
    WorkerRuntime,
    admitted_request,
    event_token,
)
from baton.workers.transfer import (
    REASON_TO_STATUS,
    FailureReason,
    FirstToken,
    StateReceiver,
    TransferError,
    TransferState,
    TransferStateHandler,
)

log = logging.getLogger(__name__)

SERVICE = "baton.decode.v1.DecodeService"

_FINISH = {
    None: decode_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": decode_pb2.FINISH_REASON_STOP,
    "length": decode_pb2.FINISH_REASON_LENGTH,
    "abort": decode_pb2.FINISH_REASON_ABORT,
}


class ReservationTarget:
    """Delivers a transfer into an engine reservation (a ReceiveTarget)."""

    def __init__(self, reservation: LoopReservation, sampling: EngineSampling):
        self.reservation = reservation
        self.sampling = sampling
        self.stream: RequestStream | None = None

    def write(self, state) -> None:
        self.reservation.write(state)

    def complete(self, first_token: FirstToken) -> None:
        wants_logprobs = self.sampling.wants_logprobs
        self.stream = self.reservation.commit(
            first_token.token_id, self.sampling,
            logprob=first_token.logprob if wants_logprobs else None,
            top_logprobs=list(first_token.top_logprobs))

    def fail(self, error: TransferError) -> None:
        self.reservation.release()


class DecodeServicer:
    """Generate and TransferState over one WorkerRuntime."""

    def __init__(self, runtime: WorkerRuntime):
        self.runtime = runtime
        self.receiver = StateReceiver("", metrics=runtime.metrics)
        self.transfer_handler = TransferStateHandler(self.receiver)

    def on_loaded(self) -> None:
        self.receiver.fingerprint = self.runtime.fingerprint

    def generic_handler(self, transfers: bool = True) -> grpc.GenericRpcHandler:
        """The service's handlers; transfers=False leaves TransferState to a TLS listener."""
        methods = {"Generate": grpc.unary_stream_rpc_method_handler(
            self.Generate, request_deserializer=decode_pb2.GenerateRequest.FromString,
            response_serializer=decode_pb2.GenerateResponse.SerializeToString)}
        if transfers:
            methods["TransferState"] = self.transfer_handler.method_handler()
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def transfer_only_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE, {"TransferState": self.transfer_handler.method_handler()})

    def Generate(self, request: decode_pb2.GenerateRequest, context: grpc.ServicerContext):
        rt = self.runtime
        arrival = time.monotonic()
        with rt.admit(context):
            outcome = "error"
            try:
                yield from self._generate(request, context, arrival)
                outcome = "success"
            except CallEnded as ended:
                outcome = ended.outcome
                context.abort(ended.code, ended.message)
            finally:
                rt.call_finished(outcome, context, arrival)

    def _generate(self, request, context, arrival: float):
        rt = self.runtime
        req = admitted_request(request)
        deadline = rt.deadline_of(request, context)
        transfer_deadline = min(deadline,
                                time.time() + rt.config.router.transfer_timeout_seconds)
        n = len(req.prompt_ids)
        try:
            reservation = rt.loop.reserve(req)
        except CacheFull as e:
            raise CallEnded("rejected", grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except EngineDraining as e:
            raise CallEnded("rejected", grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ValueError as e:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        target = ReservationTarget(reservation, req.sampling)
        try:
            incoming = self.receiver.expect(req.request_id, n, target, transfer_deadline)
        except ValueError as e:
            reservation.release()
            raise CallEnded("rejected", grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        ended = threading.Event()

        def on_call_done() -> None:
            # The router cancelled (client gone, prefill failed) or the call finished: free
            # whatever this request still holds. Both calls are no-ops once it is done.
            ended.set()
            self.receiver.cancel(req.request_id, "the Generate call ended")
            if target.stream is not None:
                target.stream.close()

        if not context.add_callback(on_call_done):
            # The call ended (the router gave up) before this handler got here: the callback
            # will never run, so free the reservation now rather than at the transfer deadline.
            on_call_done()
        # Tells the router the room is reserved: it starts the Prefill now.
        context.send_initial_metadata(((headers.RESERVED, "true"),))
        while not incoming.wait(timeout=0.5):
            if ended.is_set():
                raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                             f"request {req.request_id}: the call ended before its state came")
        if incoming.state is TransferState.FAILED:
            error = incoming.error
            outcome = {FailureReason.DEADLINE_EXCEEDED: "timeout",
                       FailureReason.CANCELLED: "cancelled"}.get(error.reason, "error")
            raise CallEnded(outcome, REASON_TO_STATUS[error.reason], error.message)
        stream = target.stream
        last = None
        while True:
            left = deadline - time.time()
            try:
                event = stream.get(timeout=max(left, 0.0))
            except StopIteration:
                return
            except queue.Empty:
                stream.close()
                raise CallEnded("timeout", grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"request {req.request_id} passed its deadline") from None
            except EngineDraining as e:
                raise CallEnded("error", grpc.StatusCode.UNAVAILABLE, str(e)) from None
            now = time.monotonic()
            if event.token_id is not None:
                if last is None:
                    rt.metrics.time_to_first_token.observe(now - arrival)
                else:
                    rt.metrics.inter_token_latency.observe(now - last)
                last = now
            yield decode_pb2.GenerateResponse(
                tokens=[event_token(event)] if event.token_id is not None else [],
                finish_reason=_FINISH[event.finish_reason],
                num_prompt_tokens=event.num_prompt_tokens,
                num_generated_tokens=event.num_generated)
            if event.finished:
                return


