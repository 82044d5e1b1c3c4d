"""WorkerService (Load, Drain), served by both roles beside their own service."""

from __future__ import annotations

from collections.abc import Callable

from baton.proto.baton.worker.v1 import worker_pb2, worker_pb2_grpc
from baton.workers.server.runtime import WorkerRuntime


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Load and Drain, for either role."""

    def __init__(self, runtime: WorkerRuntime, transfers_in_flight: Callable[[], int],
                 on_drain: Callable[[], None], transfer_port: int = 0):
        self.runtime = runtime
        self._transfers_in_flight = transfers_in_flight
        self._on_drain = on_drain
        self._transfer_port = transfer_port

    def Load(self, request, context):
        return self.runtime.load_response(self._transfers_in_flight(), self._transfer_port)

    def Drain(self, request, context):
        self._on_drain()
        return worker_pb2.DrainResponse(draining=True, in_flight=self.runtime.in_flight)
