"""Finding workers and keeping track of which are ready and how loaded they are.

Where a role's workers are is pluggable (`Resolver`):
- StaticResolver: a fixed list of "host:port" (`baton up`, tests);
- DnsResolver: a Kubernetes headless Service, "name:port", whose A records are the ready
  pods' addresses; resolved again at every refresh, so scaling shows up within one interval.

`WorkerPool` holds one role's workers: every refresh it resolves the addresses, opens a gRPC
channel to new ones, forgets vanished ones, and asks each worker for its grpc.health.v1
status and its Load. A worker is *ready* when it answers SERVING and is not draining; only
ready workers get new requests. A call that fails with UNAVAILABLE marks its worker not
ready at once, until a later health check says otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from baton.proto.baton.decode.v1 import decode_pb2_grpc
from baton.proto.baton.prefill.v1 import prefill_pb2_grpc
from baton.proto.baton.worker.v1 import worker_pb2, worker_pb2_grpc
from baton.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from baton.workers import security

log = logging.getLogger("baton.router.discovery")

ROLES = ("prefill", "decode")
# Health checks that miss their deadline in a row before a worker gets no new work (a worker
# that refuses the connection is out at once).
SLOW_CHECKS_BEFORE_UNREADY = 3
# Transfer payloads go worker to worker; router <-> worker messages are small, but a long
# prompt's token ids can exceed gRPC's 4 MiB default.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024**2),
                   ("grpc.max_receive_message_length", 64 * 1024**2)]


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"worker address {address!r} must be host:port with a port 1..65535")
    return host.strip("[]"), int(port)


class Resolver(Protocol):
    async def resolve(self) -> list[str]:
        """The current "host:port" addresses of a role's workers."""
        ...


@dataclass(frozen=True)
class StaticResolver:
    addresses: tuple[str, ...]

    async def resolve(self) -> list[str]:
        return list(self.addresses)


@dataclass(frozen=True)
class DnsResolver:
    """A headless Service: one A record per ready pod."""

    host: str
    port: int

    async def resolve(self) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, family=socket.AF_INET,
                                           type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            # No ready pods: a headless Service has no records (NXDOMAIN) until one is ready.
            log.info("resolved no workers for %s: %s", self.host, exc)
            return []
        return sorted({f"{info[4][0]}:{self.port}" for info in infos})


def resolver_for(service: str) -> Resolver:
    """"host:port,host:port" or an IP "ip:port" -> static; one "name:port" -> DNS."""
    entries = [e.strip() for e in service.split(",") if e.strip()]
    if not entries:
        raise ValueError(f"worker service {service!r} names no address (host:port[,...])")
    parsed = [split_host_port(e) for e in entries]
    if len(entries) == 1:
        host, port = parsed[0]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return DnsResolver(host, port)
    return StaticResolver(tuple(f"{h}:{p}" for h, p in parsed))


@dataclass
class Worker:
    """One worker as the router sees it."""

    address: str
    role: str
    channel: grpc.aio.Channel
    serving: bool = False  # last grpc.health.v1 answer was SERVING
    load: worker_pb2.LoadResponse = field(default_factory=worker_pb2.LoadResponse)
    inflight: int = 0  # requests this router has on the worker now
    failures: int = 0  # consecutive failed health checks / calls
    resolved: bool = True  # still among the resolver's addresses (else only finishes work)
    checked_at: float = 0.0

    def __post_init__(self) -> None:
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.control = worker_pb2_grpc.WorkerServiceStub(self.channel)
        if self.role == "decode":
            self.stub = decode_pb2_grpc.DecodeServiceStub(self.channel)
        else:
            self.stub = prefill_pb2_grpc.PrefillServiceStub(self.channel)

    @property
    def ready(self) -> bool:
        return self.serving and self.resolved and not self.load.draining

    def mark_failed(self) -> None:
        self.serving = False
        self.failures += 1

    def summary(self) -> dict:
        return {"address": self.address, "ready": self.ready, "draining": self.load.draining,
                "inflight": self.inflight, "running": self.load.running,
                "waiting": self.load.waiting, "freeSlots": self.load.free_slots,
                "kvCacheUsageRatio": round(self.load.kv_cache_usage_ratio, 4)}


class WorkerPool:
    """One role's workers, refreshed every `interval_s`."""

    def __init__(self, role: str, resolver: Resolver, interval_s: float = 1.0,
                 check_timeout_s: float = 1.0,
                 identity: security.Identity | None = None) -> None:
        """identity: mutual TLS to the workers with this (the router role's) certificate;
        None: plaintext channels (--plaintext)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.role = role
        self.resolver = resolver
        self.interval_s = interval_s
        self.check_timeout_s = check_timeout_s
        self.identity = identity
        self.workers: dict[str, Worker] = {}
        self._task: asyncio.Task | None = None
        # Refreshes numbered as they begin; the latest that completed, and an event set (and
        # replaced) at every completion: wait_refreshed() waits for one that began after it.
        self._refreshes_begun = 0
        self._refreshed_through = 0
        self._refreshed = asyncio.Event()

    def ready_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.ready]

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the router serves (503s) and keeps trying
            log.exception("the first look for %s workers failed", self.role)
        self._task = asyncio.create_task(self._loop(), name=f"baton-{self.role}-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*(w.channel.close() for w in self.workers.values()),
                             return_exceptions=True)
        self.workers.clear()

    async def wait_refreshed(self) -> None:
        """Waits for a refresh that began after this call to complete, so it saw whatever
        changed before the call (tests, start-up)."""
        target = self._refreshes_begun + 1
        while self._refreshed_through < target:
            await self._refreshed.wait()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # one bad round must not end discovery for good
                log.exception("refreshing %s workers failed", self.role)

    async def refresh(self) -> None:
        self._refreshes_begun += 1
        number = self._refreshes_begun
        addresses = set(await self.resolver.resolve())
        for address in addresses - set(self.workers):
            channel = self._channel(address)
            self.workers[address] = Worker(address, self.role, channel)
            log.info("found %s worker %s", self.role, address)
        for address, worker in list(self.workers.items()):
            worker.resolved = address in addresses
            if not worker.resolved and worker.inflight == 0:
                del self.workers[address]
                await worker.channel.close()
                log.info("forgot %s worker %s: no longer resolved", self.role, address)
        await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))
        self._refreshed_through = max(self._refreshed_through, number)
        done, self._refreshed = self._refreshed, asyncio.Event()
        done.set()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self.identity is None:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, self.identity.channel_credentials(),
                                       options=[*CHANNEL_OPTIONS,
                                                *security.channel_options(self.role)])

    async def _check(self, worker: Worker) -> None:
        was_ready = worker.ready
        try:
            health = await worker.health.Check(health_pb2.HealthCheckRequest(service=""),
                                               timeout=self.check_timeout_s)
            worker.serving = health.status == health_pb2.HealthCheckResponse.SERVING
            if worker.serving:
                worker.load = await worker.control.Load(worker_pb2.LoadRequest(),
                                                        timeout=self.check_timeout_s)
            worker.failures = 0
        except grpc.aio.AioRpcError as exc:
            if (exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                    and worker.failures + 1 < SLOW_CHECKS_BEFORE_UNREADY):
                # Slow, not gone: a busy host can miss one deadline. The worker keeps its
                # work until SLOW_CHECKS_BEFORE_UNREADY in a row (a hung one is left then);
                # an unreachable one (any other code) is taken out at once.
                worker.failures += 1
                log.info("%s worker %s: health check %s (%d in a row; out at %d)", self.role,
                         worker.address, exc.code().name, worker.failures,
                         SLOW_CHECKS_BEFORE_UNREADY)
            else:
                worker.mark_failed()
                if was_ready:
                    log.warning("%s worker %s failed its health check: %s", self.role,
                                worker.address, exc.code().name)
        worker.checked_at = time.monotonic()
        if worker.ready != was_ready:
            log.info("%s worker %s is %s", self.role, worker.address,
                     "ready" if worker.ready else "not ready")
