"""The router's admission: a bounded wait queue, fair between tenants.

A request first tries to start at once, unless others are already waiting (then it queues
behind them). When every decode worker refuses it for lack of room (NoCapacity), it waits
here. Each freed slot (a request's choice ending: `release`) wakes exactly one waiter, the
one fair queueing picks; a woken waiter that still finds no room keeps its place and waits
for the next freed slot. Capacity also frees up behind other routers, so when nothing has
woken a waiter for `poll_s`, the next one is woken (one waiter, not all of them).

Fairness: each tenant (an API key, see auth.py) has its own queue, ordered by the request's
`priority` (lower first, vLLM's meaning) and then by arrival. Between tenants the queue is
start-time fair queueing: a tenant's virtual time grows by cost / weight with every request
it starts, where a request's cost is its choices times its tokens (prompt + max_tokens); the
waiting tenant with the smallest virtual time goes next. A tenant that was idle rejoins at
the current virtual time, so idling banks no credit, and one tenant's many heavy requests
cannot hold back another's: the other is admitted at the next freed slot. A tenant may also
have a `max_concurrency` (requests started and not ended): beyond it its requests wait.

The queue holds at most `max_queued` waiting requests; one more is refused with 429 and a
Retry-After header.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from baton.workers.router.backend import NoCapacity
from baton.workers.router.errors import queue_full

T = TypeVar("T")


@dataclass(frozen=True)
class Tenant:
    """Who a request is for: an API key's identity and share (auth.ApiKeys)."""

    name: str = ""
    weight: float = 1.0
    max_concurrency: int | None = None


ANONYMOUS = Tenant()


@dataclass
class _TenantState:
    tenant: Tenant
    vtime: float = 0.0
    running: int = 0
    waiters: list[_Waiter] = field(default_factory=list)  # a heap by (priority, seq)


@dataclass
class _Waiter:
    priority: int
    seq: int
    cost: float
    state: _TenantState
    wake: asyncio.Future
    done: bool = False  # left the queue (started, timed out or cancelled)

    def __lt__(self, other: _Waiter) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class AdmissionQueue:
    def __init__(self, max_queued: int, poll_s: float = 1.0, retry_after_s: int = 1) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued={max_queued} must be >= 0")
        self.max_queued = max_queued
        self.poll_s = poll_s
        self.retry_after_s = retry_after_s
        self.waiting = 0
        self.admitted: list[str] = []  # tenants' names in the order requests started (last 1000)
        self._tenants: dict[str, _TenantState] = {}
        self._seq = itertools.count()
        self._vtime = 0.0  # the start tag of the request started last
        self._poll: asyncio.TimerHandle | None = None

    def _state(self, tenant: Tenant) -> _TenantState:
        state = self._tenants.get(tenant.name)
        if state is None:
            state = self._tenants[tenant.name] = _TenantState(tenant)
        state.tenant = tenant  # the keys file may have changed its share
        return state

    def _eligible(self, state: _TenantState) -> bool:
        limit = state.tenant.max_concurrency
        return limit is None or state.running < limit

    def _pick(self) -> _Waiter | None:
        """The next waiter to wake: the eligible tenant with the smallest virtual time (ties:
        the earlier arrival), its first request by priority then arrival."""
        best: _Waiter | None = None
        best_key: tuple[float, int] | None = None
        for state in self._tenants.values():
            heap = state.waiters
            while heap and heap[0].done:
                heapq.heappop(heap)
            if not heap or not self._eligible(state) or heap[0].wake.done():
                continue
            key = (max(state.vtime, self._vtime), heap[0].seq)
            if best_key is None or key < best_key:
                best, best_key = heap[0], key
        return best

    def _wake_one(self) -> bool:
        waiter = self._pick()
        if waiter is None:
            return False
        waiter.wake.set_result(None)
        return True

    def release(self, tenant: Tenant, slots: int = 1) -> None:
        """A request of tenant ended, freeing `slots` decode slots (its choices still held):
        wake one waiter per freed slot."""
        state = self._tenants.get(tenant.name)
        if state is not None:
            state.running = max(0, state.running - 1)
        self.freed(slots)

    def freed(self, slots: int = 1) -> None:
        """Slots were freed (a request's choice that ended before the others; a request's
        end through release): wake one waiter per slot."""
        for _ in range(slots):
            if not self._wake_one():
                break

    def _arm_poll(self) -> None:
        """While requests wait, wake one every poll_s when nothing else did (room freed
        behind other routers)."""
        if self._poll is not None or self.waiting == 0:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._poll = None
            self._wake_one()
            self._arm_poll()

        self._poll = loop.call_later(self.poll_s, fire)

    def _started(self, state: _TenantState, cost: float) -> None:
        start = max(state.vtime, self._vtime)
        self._vtime = start
        state.vtime = start + cost / state.tenant.weight
        state.running += 1
        self.admitted.append(state.tenant.name)
        del self.admitted[:-1000]

    async def admit(self, start: Callable[[], Awaitable[T]], deadline: float,
                    tenant: Tenant = ANONYMOUS, priority: int = 0, cost: float = 1.0) -> T:
        """Run start() once room and fairness allow; TimeoutError past deadline. Every
        admitted request must be `release`d when it ends."""
        state = self._state(tenant)
        if self._eligible(state) and self._pick() is None:  # no one to queue behind
            try:
                result = await start()
            except NoCapacity:
                pass
            else:
                self._started(state, cost)
                return result
        if self.waiting >= self.max_queued:
            raise queue_full(self.retry_after_s)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, next(self._seq), cost, state, loop.create_future())
        heapq.heappush(state.waiters, waiter)
        self.waiting += 1
        self._arm_poll()
        try:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(asyncio.shield(waiter.wake), remaining)
                try:
                    result = await start()
                except NoCapacity:
                    waiter.wake = loop.create_future()  # keeps its place for the next slot
                    continue
                waiter.done = True
                self._started(state, cost)
                return result
        finally:
            self.waiting -= 1
            if not waiter.done:
                waiter.done = True
                if waiter.wake.done():
                    self._wake_one()  # it was woken but leaves: the slot goes to the next
                else:
                    waiter.wake.cancel()
            if self.waiting == 0 and self._poll is not None:
                self._poll.cancel()
                self._poll = None
