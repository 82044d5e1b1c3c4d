"""baton.workers.transfer: a request's prefill state, layer by layer, from prefill to decode.

One request's life (DESIGN.md, The request path):

1. The router calls Reserve on decode worker D. D reserves cache room, pinning the prefix d of
   the prompt it already holds (engine.reserve), and registers what will receive the rest of
   the state: `receiver.expect(reservation_id, request_id, n_prompt, d, target, deadline)` ->
   IncomingTransfer, state PENDING. If nothing arrives by the deadline, the transfer fails and
   the target releases the reservation.
2. The router calls Prefill on prefill worker P with D's address, the reservation id, its
   token and chain hash, and d. P opens the transfer: `transport.open(D, reservation_id,
   request_id, n_prompt, d, deadline, binding)` -> StateSender, which starts a TransferState
   call whose first message is a handshake (protocol version, fingerprint of weights + model
   config + state dtypes, the reservation, the request, the prompt length and the start
   position d). D checks it
   (IncomingTransfer.accept_handshake); a mismatched peer or a handshake that does not match
   the reservation is refused with FAILED_PRECONDITION and D releases. The handshake also
   carries the reservation's token (from D's Reserve answer, which the Prefill presented) and
   the chain hash of the prompt P is about to prefill (P computes it from the tokens it
   runs); D's reservation checks both before anything is written (a Prefill of another
   prompt into this reservation is refused here). State STREAMING.
3. P's engine runs the prompt (from its own best prefix-cache hit) with the sender as its
   PrefillSink. As each layer finishes, the engine calls `sender.on_layer(LayerState)` with
   the state D lacks (KV from d, the Mamba state at the prompt's end); the sender brings the
   tensor to host memory and queues it (bounded in bytes: backpressure). gRPC's thread cuts
   each state into chunks of at most chunk_bytes, each with a ChunkDescription (request,
   state index, layer, kind, token range, shape, dtype, offset, XXH3-64 checksum), and counts
   the bytes per kind.
4. D checks every chunk (checksum, order, sizes) and, when a layer state is whole, writes it
   into the reservation (ReceiveTarget.write). A bad chunk fails the transfer with DATA_LOSS:
   D releases and P's Prefill fails, so the router re-prefills elsewhere.
5. P samples the first token and calls `sender.finish(first_token, cached_tokens)`, which
   sends the completion (first token, P's cached prompt tokens, number of states and bytes)
   and waits for D's acknowledgement. D checks the totals and commits the reservation
   (ReceiveTarget.complete): state COMPLETE, the request joins D's batch and the first token
   goes out on the Generate stream the router opened for the reservation.
   Any failure on either side (deadline, a dead peer, a cancelled Generate) ends in FAILED
   with the reservation released exactly once.
"""

from baton.workers.transfer.base import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    ChunkDescription,
    FailureReason,
    FirstToken,
    ReceiveTarget,
    ReservationBinding,
    StateDescription,
    StateSender,
    StateTransport,
    TransferError,
    TransferResult,
    TransferState,
    checksum,
)
from baton.workers.transfer.fingerprint import model_fingerprint
from baton.workers.transfer.grpc_receiver import REASON_TO_STATUS, TransferStateHandler
from baton.workers.transfer.grpc_sender import CHANNEL_OPTIONS, GrpcStateSender, GrpcTransport
from baton.workers.transfer.receiver import ArrivalRecord, IncomingTransfer, StateReceiver

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_CHUNK_BYTES",
    "PROTOCOL_VERSION",
    "REASON_TO_STATUS",
    "ArrivalRecord",
    "ChunkDescription",
    "FailureReason",
    "FirstToken",
    "GrpcStateSender",
    "GrpcTransport",
    "IncomingTransfer",
    "ReceiveTarget",
    "ReservationBinding",
    "StateDescription",
    "StateReceiver",
    "StateSender",
    "StateTransport",
    "TransferError",
    "TransferResult",
    "TransferState",
    "TransferStateHandler",
    "checksum",
    "model_fingerprint",
]
