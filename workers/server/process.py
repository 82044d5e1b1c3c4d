"""A worker process from start to exit.

    start: gRPC (health NOT_SERVING, work refused as UNAVAILABLE) and /metrics come up first,
           so probes and scrapes answer while the model loads
    load:  model, tokenizer, caches, engine loop; then health SERVING
    serve: until SIGTERM / SIGINT or a Drain call
    drain: health NOT_SERVING, new work refused; in-flight transfers and streams finish
           (at most --drain-seconds); then the server stops and the process exits 0
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

from baton.operator.spec import WorkerConfig
from baton.proto.baton.worker.v1 import worker_pb2_grpc
from baton.proto.grpc.health.v1 import health_pb2_grpc
from baton.workers import security
from baton.workers.metrics import MetricsServer
from baton.workers.server import settings
from baton.workers.server.control import WorkerServicer
from baton.workers.server.decode import SERVICE as DECODE_SERVICE
from baton.workers.server.decode import DecodeServicer
from baton.workers.server.health import HealthServicer
from baton.workers.server.prefill import SERVICE as PREFILL_SERVICE
from baton.workers.server.prefill import PrefillServicer
from baton.workers.server.runtime import WorkerRuntime
from baton.workers.startup import freeze_startup_heap
from baton.workers.transfer import CHANNEL_OPTIONS

log = logging.getLogger("baton.worker")

WORKER_SERVICE = "baton.worker.v1.WorkerService"
# Calls still open when the drain bound passed get this long before they are cancelled.
STOP_GRACE_SECONDS = 2.0


class WorkerProcess:
    """The gRPC server, the metrics server and the runtime of one worker."""

    def __init__(self, args: settings.WorkerArgs, config: WorkerConfig):
        self.args = args
        self.runtime = WorkerRuntime(args, config)
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self.transfer_server: grpc.Server | None = None
        self.health_server: grpc.Server | None = None
        # Read now, so a missing or wrong certificate stops the worker before it loads a model.
        self.identity = (None if args.certs is None
                         else security.Identity.load(args.certs, args.role))
        transfer_port = 0
        if args.role == "decode":
            self.role_servicer = DecodeServicer(
                self.runtime, attach_timeout_s=args.attach_timeout_seconds,
                max_open=args.max_open_reservations)
            role_service = DECODE_SERVICE
            transfers = self.role_servicer.receiver.in_flight
            # One thread per open Generate stream and per incoming transfer.
            workers = 2 * config.decode.max_concurrency + 16
            if args.tls is not None:
                self.transfer_server, transfer_port = self._tls_transfer_listener(
                    args, config.decode.max_concurrency + 8)
        else:
            self.role_servicer = PrefillServicer(self.runtime, tls=args.tls,
                                                 decode_targets=args.decode_targets,
                                                 identity=self.identity)
            role_service = PREFILL_SERVICE
            transfers = self.role_servicer.transfers_in_flight
            workers = 2 * settings.PREFILL_MAX_SEQS + 16
        self.transfer_port = transfer_port
        self.health = HealthServicer((role_service, WORKER_SERVICE))
        # Every call on a mutual-TLS port is authorized by its caller's certificate role.
        interceptors = () if self.identity is None else (
            security.RoleAuthorization(self.runtime.metrics.rpc_refused),)
        # No SO_REUSEPORT: a second worker on a taken port must fail, not share its traffic.
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                             thread_name_prefix="baton-grpc"),
                                  interceptors=interceptors,
                                  options=CHANNEL_OPTIONS + (("grpc.so_reuseport", 0),))
        if self.transfer_server is not None:
            # State arrives only over TLS: the plaintext port does not take transfers.
            handler = self.role_servicer.generic_handler(transfers=False)
        else:
            handler = self.role_servicer.generic_handler()
        self.server.add_generic_rpc_handlers((handler,))
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.runtime, transfers, self.request_drain, transfer_port),
            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{_host(args.host)}:{args.grpc_port}"
        try:
            if self.identity is None:
                self.grpc_port = self.server.add_insecure_port(address)
            else:
                self.grpc_port = self.server.add_secure_port(
                    address, self.identity.server_credentials())
        except RuntimeError as e:  # grpcio's bind failure
            raise OSError(f"cannot listen on {args.host}:{args.grpc_port} for gRPC: {e}") from None
        if args.health_port is not None:
            self.health_server, self.health_port = self._health_listener(args)
        self.metrics_server: MetricsServer | None = None

    def _tls_transfer_listener(self, args: settings.WorkerArgs,
                               threads: int) -> tuple[grpc.Server, int]:
        """A second server, TLS only, that serves nothing but TransferState."""
        tls = args.tls
        credentials = grpc.ssl_server_credentials(
            [(tls.read("key"), tls.read("cert"))], root_certificates=tls.read("ca"),
            require_client_auth=tls.ca is not None)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads,
                                                        thread_name_prefix="baton-transfer"),
                             options=CHANNEL_OPTIONS + (("grpc.so_reuseport", 0),))
        server.add_generic_rpc_handlers((self.role_servicer.transfer_only_handler(),))
        try:
            port = server.add_secure_port(f"{_host(args.host)}:{tls.transfer_port}",
                                          credentials)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {args.host}:{tls.transfer_port} for transfers: "
                          f"{e}") from None
        return server, port

    def _health_listener(self, args: settings.WorkerArgs) -> tuple[grpc.Server, int]:
        """A plaintext server with grpc.health.v1 only: what a kubelet's gRPC probe can reach
        without a certificate. It answers SERVING / NOT_SERVING and nothing else."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                        thread_name_prefix="baton-health"),
                             options=(("grpc.so_reuseport", 0),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port = server.add_insecure_port(f"{_host(args.host)}:{args.health_port}")
        except RuntimeError as e:
            raise OSError(f"cannot listen on {args.host}:{args.health_port} for health "
                          f"probes: {e}") from None
        return server, port

    def request_drain(self) -> None:
        """Stops admitting work (a Drain call); the process keeps serving what it has."""
        self.runtime.start_draining()
        self.health.set_serving(False)

    def request_stop(self) -> None:
        """SIGTERM / SIGINT: drain, then exit once in-flight work finished."""
        self.request_drain()
        self.stop_requested.set()

    def run(self) -> int:
        rt = self.runtime
        try:
            self.metrics_server = MetricsServer(rt.metrics, self.args.metrics_port,
                                                self.args.host)
        except OSError as e:
            log.error("cannot serve /metrics on %s:%d: %s", self.args.host,
                      self.args.metrics_port, e)
            return 2
        self.server.start()
        for extra in (self.transfer_server, self.health_server):
            if extra is not None:
                extra.start()
        log.info("%s worker (pool %s) listening on gRPC %s:%d, metrics :%d; loading the model",
                 rt.role, self.args.pool, self.args.host, self.grpc_port,
                 self.metrics_server.port)
        if self.transfer_server is not None:
            log.info("state transfers over TLS on port %d only", self.transfer_port)
        log.info("gRPC port: %s", "plaintext (--plaintext)" if self.identity is None
                 else "mutual TLS, calls authorized by certificate role")
        if self.health_server is not None:
            log.info("plaintext health probes on port %d", self.health_port)
        status = 1
        try:
            status = self._serve()
        finally:
            # A replica whose ranks parted or whose followers failed exits non-zero.
            status = self.shutdown() or status
        return status

    def _serve(self) -> int:
        rt = self.runtime
        try:
            rt.load()
        except (OSError, ValueError) as e:
            log.error("cannot serve %s: %s", rt.config.model_path, e)
            return 1
        self.role_servicer.on_loaded()
        frozen = freeze_startup_heap()
        log.debug("%d start-up objects frozen out of the garbage collector", frozen)
        rt.set_ready()
        if not self.stop_requested.is_set() and not rt.draining:
            self.health.set_serving(True)
            log.info("ready in %.2f s (start to health SERVING)",
                     time.monotonic() - self.started)
        while not self.stop_requested.wait(timeout=1.0):
            pass
        return self.drain()

    def drain(self) -> int:
        rt = self.runtime
        self.request_drain()
        log.info("draining: %d calls in flight", rt.in_flight)
        drained = rt.wait_idle(self.args.drain_seconds)
        if drained:
            log.info("drained; stopping")
        else:
            log.warning("%d calls still in flight after %.0f s; cancelling them",
                        rt.in_flight, self.args.drain_seconds)
        return 0

    def shutdown(self) -> int:
        """Stops everything; non-zero when the replica's ranks did not end cleanly."""
        self.health.set_serving(False)
        self.health.close()
        stopped = [self.server.stop(grace=STOP_GRACE_SECONDS)]
        for extra in (self.transfer_server, self.health_server):
            if extra is not None:
                stopped.append(extra.stop(grace=STOP_GRACE_SECONDS))
        for event in stopped:
            event.wait()
        status = self.runtime.close()
        if self.role_servicer is not None and hasattr(self.role_servicer, "transport"):
            if self.role_servicer.transport is not None:
                self.role_servicer.transport.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        return status


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main(argv: list[str]) -> int:
    args = settings.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format=f"%(asctime)s {args.role}[{args.pool}] %(levelname)s "
                               "%(name)s: %(message)s")
    try:
        config = WorkerConfig.load(args.config_path)
        process = WorkerProcess(args, config)
    except (OSError, ValueError) as e:
        print(f"baton worker: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame) -> None:
        log.info("received %s", signal.Signals(signum).name)
        process.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return process.run()
