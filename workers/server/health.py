"""grpc.health.v1 for a worker: NOT_SERVING while loading or draining, SERVING in between.

Kubernetes gRPC probes and the router call Check (or Watch) with service "" (the whole
worker) or a service's full name; every name answers the same status.
"""

from __future__ import annotations

import threading

import grpc

from baton.proto.grpc.health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """One status for the worker and each service it names."""

    def __init__(self, services: tuple[str, ...]):
        self._services = ("",) + tuple(services)
        self._status = NOT_SERVING
        self._cond = threading.Condition()
        self._closed = False

    @property
    def serving(self) -> bool:
        return self._status == SERVING

    def set_serving(self, serving: bool) -> None:
        with self._cond:
            self._status = SERVING if serving else NOT_SERVING
            self._cond.notify_all()

    def close(self) -> None:
        """Ends every Watch stream (at shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def Check(self, request, context):
        if request.service not in self._services:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status)

    def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=self._status)
            for name in self._services})

    def Watch(self, request, context):
        if request.service not in self._services:
            yield health_pb2.HealthCheckResponse(status=SERVICE_UNKNOWN)
            return
        last = None
        while context.is_active():
            with self._cond:
                if self._status == last and not self._closed:
                    self._cond.wait(timeout=1.0)
                status, closed = self._status, self._closed
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if closed:
                return
