"""The prefill worker's gRPC service: Prefill.

Prefill runs the prompt in the engine's batch (with other prompts, up to maxBatchTokens per
step), from the longest prefix its own prefix cache holds, with a StateSender as its sink, so
every layer's state leaves for the decode worker as soon as the layer has finished the prompt.
Only what the decode worker's reservation lacks travels (KV from its decode_cached_tokens,
the Mamba state at the prompt's end). Then it sends the first token and returns once the
decode worker acknowledged the whole state.

What a Prefill may ask for (DESIGN.md, Round 3 seams: trust model): the decode worker's
reservation token and the prompt's chain hash come with it (from the decode worker's Reserve
answer); a prompt whose chain hash is not the reservation's is refused here, and the handshake
carries the token and the hash this worker computed from the tokens it runs, which the decode
worker checks before it writes anything. decode_target must name one of the decode workers
this worker was told about (--decode-target), and a failed transfer reports the decode
worker's status code, never its answer's text: a Prefill cannot make this worker talk to, or
relay the words of, anything else.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time

import grpc
from google.protobuf.duration_pb2 import Duration

from baton.proto.baton.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from baton.proto.baton.worker.v1 import worker_pb2, worker_pb2_grpc
from baton.workers import headers, security
from baton.workers.engine import EngineDraining, PrefillAborted, prompt_chain_hash
from baton.workers.server.runtime import (
    CallEnded,
    WorkerRuntime,
    admitted_request,
    token_to_proto,
)
from baton.workers.server.settings import TransferTls
from baton.workers.transfer import (
    REASON_TO_STATUS,
    FailureReason,
    FirstToken,
    GrpcTransport,
    ReservationBinding,
    TransferError,
)

log = logging.getLogger(__name__)

SERVICE = "baton.prefill.v1.PrefillService"


def _transfer_failed(e: TransferError, outcome: str | None = None) -> CallEnded:
    if outcome is None:
        outcome = "timeout" if e.reason is FailureReason.DEADLINE_EXCEEDED else "error"
    return CallEnded(outcome, REASON_TO_STATUS[e.reason], e.message,
                     trailing_metadata=((headers.FAILED_PEER, "decode"),))


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, runtime: WorkerRuntime, tls: TransferTls | None = None,
                 decode_targets: tuple[str, ...] = (),
                 identity: security.Identity | None = None):
        """identity: mutual TLS to the decode workers' gRPC port with this certificate (the
        prefill role's); tls: the --plaintext worker's separate transfer TLS."""
        self.runtime = runtime
        self.tls = tls
        self.identity = identity
        self.decode_targets = tuple(decode_targets)
        self._peers: set[str] | None = None
        self.transport: GrpcTransport | None = None
        self._sending = 0
        self._sending_lock = threading.Lock()
        # Read now, so unreadable files stop the worker before it loads a model.
        self._credentials = None if tls is None else grpc.ssl_channel_credentials(
            root_certificates=tls.read("ca"), private_key=tls.read("key"),
            certificate_chain=tls.read("cert"))

    def on_loaded(self) -> None:
        rt = self.runtime
        if self.identity is not None:
            self.transport = GrpcTransport(
                rt.fingerprint, metrics=rt.metrics,
                channel_credentials=self.identity.channel_credentials(),
                server_name=security.server_name("decode"))
            return
        if self.tls is None:
            self.transport = GrpcTransport(rt.fingerprint, metrics=rt.metrics)
            return
        self.transport = GrpcTransport(rt.fingerprint, metrics=rt.metrics,
                                       channel_credentials=self._credentials,
                                       server_name=self.tls.server_name,
                                       resolve=transfer_listener)

    def transfers_in_flight(self) -> int:
        return self._sending

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Prefill": grpc.unary_unary_rpc_method_handler(
                self.Prefill, request_deserializer=prefill_pb2.PrefillRequest.FromString,
                response_serializer=prefill_pb2.PrefillResponse.SerializeToString)})

    def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.ServicerContext):
        rt = self.runtime
        arrival = time.monotonic()
        with rt.admit(context):
            outcome, code, message = "error", grpc.StatusCode.INTERNAL, ""
            try:
                response = self._prefill(request, context, arrival)
                outcome = "success"
                return response
            except CallEnded as failed:
                outcome, code, message = failed.outcome, failed.code, failed.message
                if failed.trailing_metadata:
                    context.set_trailing_metadata(failed.trailing_metadata)
            finally:
                rt.call_finished(outcome, context, arrival)
            context.abort(code, message)

    def _prefill(self, request, context, arrival: float) -> prefill_pb2.PrefillResponse:
        rt = self.runtime
        req = admitted_request(request)
        deadline = rt.deadline_of(request, context)
        start = int(request.decode_cached_tokens)
        if start >= len(req.prompt_ids):
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT,
                            f"decode_cached_tokens={start}: the decode worker must lack at least "
                            f"the last of the prompt's {len(req.prompt_ids)} tokens")
        binding = self._binding(request, req.prompt_ids)
        self._check_target(request.decode_target)
        try:
            sender = self.transport.open(request.decode_target, request.reservation_id,
                                         req.request_id, len(req.prompt_ids), start, deadline,
                                         binding)
        except ValueError as e:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except TransferError as e:
            raise _transfer_failed(e) from None
        with self._sending_lock:
            self._sending += 1
        try:
            return self._run(req, sender, context, arrival, deadline, start)
        except CallEnded as failed:
            if failed.code == grpc.StatusCode.UNAVAILABLE:
                # The decode worker went away; a restarted one may listen elsewhere.
                self.transport.forget(request.decode_target)
            raise
        finally:
            with self._sending_lock:
                self._sending -= 1

    @staticmethod
    def _binding(request: prefill_pb2.PrefillRequest, prompt_ids) -> ReservationBinding:
        """The reservation's token and this prompt's chain hash, for the handshake; refuses a
        Prefill without a token or of another prompt than the reservation's."""
        if not request.reservation_token:
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT,
                            "reservation_token is required: the decode worker's Reserve "
                            "answer gives it")
        chain_hash = prompt_chain_hash(prompt_ids)
        if request.prompt_chain_hash != chain_hash:
            raise CallEnded("rejected", grpc.StatusCode.FAILED_PRECONDITION,
                            "prompt_chain_hash is not the hash of prompt_token_ids: the "
                            "reservation was made for another prompt")
        return ReservationBinding(request.reservation_token, chain_hash)

    def _check_target(self, target: str) -> None:
        """Refuses a decode_target that is not one of the decode workers (--decode-target)."""
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isascii() or not port.isdigit():
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT,
                            f"decode_target={target!r} must be host:port")
        host = host.strip("[]")
        if not self.decode_targets or host in self.decode_targets:
            return
        addresses = _addresses(host)
        if addresses & self._peer_addresses(fresh=False):
            return
        # A decode worker that started since the last look: resolve the names again.
        if not addresses & self._peer_addresses(fresh=True):
            raise CallEnded("rejected", grpc.StatusCode.PERMISSION_DENIED,
                            f"decode_target={target!r} is not a decode worker of this model")

    def _peer_addresses(self, fresh: bool) -> set[str]:
        """The addresses the --decode-target names resolve to (cached; fresh: look again)."""
        with self._sending_lock:
            cached = self._peers
        if cached is None or fresh:
            cached = set().union(*map(_addresses, self.decode_targets))
            with self._sending_lock:
                self._peers = cached
        return cached

    def _run(self, req, sender, context, arrival: float, deadline: float, start: int):
        rt = self.runtime
        if not context.add_callback(lambda: (rt.loop.abort(req.request_id),
                                             sender.abort("the Prefill call ended"))):
            # The call ended (its caller cancelled) before this handler ran: no prefill for it.
            sender.abort("the Prefill call ended before it started")
            raise CallEnded("cancelled", grpc.StatusCode.CANCELLED,
                            f"prefill of {req.request_id} was cancelled before it started")
        queued_for = time.monotonic() - arrival
        try:
            future = rt.loop.run_prefill(req, sender, sink_from=start)
        except EngineDraining as e:
            sender.abort(str(e))
            raise CallEnded("rejected", grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ValueError as e:
            sender.abort(str(e))
            raise CallEnded("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            result = future.result(timeout=max(deadline - time.time(), 0.0))
        except concurrent.futures.TimeoutError:
            rt.loop.abort(req.request_id)
            sender.abort("deadline")
            raise CallEnded("timeout", grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"prefill of {req.request_id} passed its deadline") from None
        except TransferError as e:
            sender.abort(str(e))
            raise _transfer_failed(e, "error") from None
        except EngineDraining as e:
            sender.abort(str(e))
            raise CallEnded("error", grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except PrefillAborted as e:
            # The call ended first (the router cancelled: its client went away); the
            # callback above already freed the engine's and the transfer's share.
            sender.abort(str(e))
            log.debug("%s", e)
            raise CallEnded("cancelled", grpc.StatusCode.CANCELLED, str(e)) from None
        except Exception as e:
            sender.abort(str(e))
            log.exception("prefill of %s failed", req.request_id)
            raise CallEnded("error", grpc.StatusCode.INTERNAL,
                          f"prefill of {req.request_id} failed: {e}") from None
        rt.metrics.time_to_first_token.observe(time.monotonic() - arrival)
        first = FirstToken(result.first_token, result.logprob or 0.0,
                           tuple(result.top_logprobs))
        try:
            transfer = sender.finish(first, result.cached_tokens)
        except TransferError as e:
            raise _transfer_failed(e) from None
        return prefill_pb2.PrefillResponse(
            first_token=token_to_proto(result.first_token, result.logprob, result.top_logprobs),
            num_prompt_tokens=result.num_prompt_tokens,
            queue_time=_duration(queued_for),
            prefill_time=_duration(result.prefill_seconds),
            transfer_time=_duration(transfer.tail_seconds),
            transferred_bytes=transfer.total_bytes,
            cached_tokens=result.cached_tokens)


def _addresses(host: str) -> set[str]:
    """The IP addresses host resolves to (none if it does not)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def transfer_listener(target: str) -> str:
    """The TLS transfer address of the decode worker at target (asked over its Load RPC).

    A decode worker without a TLS listener is refused: with TLS configured, state never
    travels in the clear."""
    host = target.rsplit(":", 1)[0]
    with grpc.insecure_channel(target) as channel:
        try:
            load = worker_pb2_grpc.WorkerServiceStub(channel).Load(worker_pb2.LoadRequest(),
                                                                     timeout=5)
        except grpc.RpcError as e:
            raise TransferError(FailureReason.UNAVAILABLE, f"decode worker {target} did not "
                                f"answer Load: {e.code().name}") from None
    if not load.transfer_port:
        raise TransferError(FailureReason.REFUSED, f"decode worker {target} has no TLS "
                            "transfer listener, and this prefill worker sends only over TLS")
    return f"{host}:{load.transfer_port}"


