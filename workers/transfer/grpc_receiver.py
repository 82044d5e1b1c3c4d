"""The decode side of the gRPC transport: the DecodeService.TransferState handler.

The handler reads the client stream (handshake, chunks, completion) and hands each message to
the request's IncomingTransfer, which does every check. A failure ends the call with the
matching status (DATA_LOSS, FAILED_PRECONDITION, NOT_FOUND, DEADLINE_EXCEEDED, ...) after the
reservation was released; a transfer failed from elsewhere (deadline timer, Generate
cancelled, drain) cancels the call so the sender learns at once.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from baton.proto.baton.decode.v1 import decode_pb2
from baton.workers.transfer import wire
from baton.workers.transfer.base import FailureReason, TransferError
from baton.workers.transfer.receiver import IncomingTransfer, StateReceiver

log = logging.getLogger(__name__)

REASON_TO_STATUS = {
    FailureReason.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    FailureReason.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailureReason.REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    FailureReason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    FailureReason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    FailureReason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    FailureReason.CANCELLED: grpc.StatusCode.CANCELLED,
}


class TransferStateHandler:
    """Serves TransferState calls into a StateReceiver."""

    def __init__(self, receiver: StateReceiver):
        self.receiver = receiver

    def method_handler(self) -> grpc.RpcMethodHandler:
        """The handler to register under DecodeService/TransferState (custom deserializer)."""
        return grpc.stream_unary_rpc_method_handler(
            self, request_deserializer=wire.read_message,
            response_serializer=decode_pb2.TransferStateResponse.SerializeToString)

    def __call__(self, request_iterator, context: grpc.ServicerContext):
        incoming: IncomingTransfer | None = None
        try:
            first = next(request_iterator, None)
            if first is None:
                # Closed before its handshake: the sender stopped at once (its prefill was
                # aborted as it began).
                raise TransferError(FailureReason.CANCELLED,
                                    "the sender ended the stream before its handshake")
            if isinstance(first, wire.Malformed):
                raise first.error
            if not isinstance(first, wire.Handshake):
                raise TransferError(FailureReason.INVALID,
                                    "a transfer must start with a handshake")
            incoming = self.receiver.incoming(first.reservation_id)
            # A failure from elsewhere (deadline, Generate cancelled) ends this call too; one
            # raised on this thread ends it below with its own status. The client's
            # disconnect fails the transfer.
            this_thread = threading.get_ident()
            incoming.add_fail_callback(
                lambda: threading.get_ident() != this_thread and context.cancel())
            if not context.add_callback(lambda: incoming.fail(_ended_early(
                    incoming, "the sender went away before completing the transfer"))):
                raise _ended_early(incoming, "the sender went away before the transfer began")
            incoming.accept_handshake(first.protocol_version, first.fingerprint,
                                      first.request_id, first.num_prompt_tokens,
                                      first.token_start, first.binding)
            for message in request_iterator:
                if isinstance(message, wire.Chunk):
                    incoming.accept_chunk(message.description, message.data)
                elif isinstance(message, wire.Complete):
                    incoming.accept_complete(message.first_token, message.num_states,
                                             message.total_bytes, message.cached_tokens)
                    return decode_pb2.TransferStateResponse(
                        received_bytes=incoming.bytes_received,
                        received_states=incoming.states_received)
                elif isinstance(message, wire.Malformed):
                    raise message.error
                else:
                    raise TransferError(FailureReason.INVALID, "a second handshake")
            # A stream closed cleanly without its completion: the sender chose to stop (its
            # prefill was aborted); a crashed sender breaks the stream instead (RpcError).
            raise _ended_early(incoming, "the sender ended the stream before the transfer "
                               "completed", FailureReason.CANCELLED)
        except TransferError as e:
            if incoming is not None:
                incoming.fail(e)
                if incoming.error is not None:
                    e = incoming.error
            # A cancelled request (the router gave up: its client left) ends transfers on
            # both sides, the sender's or the reservation's first: an ordinary end, not a
            # fault worth a warning.
            ordinary = e.reason is FailureReason.CANCELLED or not context.is_active()
            log.log(logging.DEBUG if ordinary else logging.WARNING,
                    "state transfer failed: %s", e)
            context.abort(REASON_TO_STATUS[e.reason], e.message)
        except grpc.RpcError:
            # The client went away mid-stream; the done-callback above released everything.
            if incoming is not None:
                incoming.fail(_ended_early(incoming, "the stream broke"))
            raise


def _ended_early(incoming: IncomingTransfer, what: str,
                 reason: FailureReason = FailureReason.UNAVAILABLE) -> TransferError:
    """Why a stream ended before its completion: the deadline if it passed (the sender's
    gRPC deadline may fire a moment before the receiver's own timer), else `reason`."""
    if time.time() >= incoming.deadline:
        return TransferError(FailureReason.DEADLINE_EXCEEDED,
                             f"request {incoming.request_id}: {what} at the deadline")
    return TransferError(reason, f"request {incoming.request_id}: {what}")
