"""The router's bounded wait queue.

A request first tries to start at once. When every decode worker refuses it for lack of room
(NoCapacity), it waits here and tries again whenever a request finishes (or after a short
poll, since capacity also frees up behind other routers). The queue holds at most
`max_queued` waiting requests; one more is refused with 429 and a Retry-After header.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from baton.workers.router.backend import NoCapacity
from baton.workers.router.errors import queue_full

T = TypeVar("T")


class AdmissionQueue:
    def __init__(self, max_queued: int, poll_s: float = 0.1, retry_after_s: int = 1) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued={max_queued} must be >= 0")
        self.max_queued = max_queued
        self.poll_s = poll_s
        self.retry_after_s = retry_after_s
        self.waiting = 0
        self._wake: asyncio.Future | None = None

    def notify(self) -> None:
        """Some capacity was freed (a request finished): wake every waiter."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        self._wake = None

    async def _wait_for_capacity(self, timeout: float) -> None:
        if self._wake is None:
            self._wake = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._wake), timeout)
        except asyncio.TimeoutError:
            pass

    async def admit(self, start: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Run start() until it stops raising NoCapacity; TimeoutError past deadline."""
        try:
            return await start()
        except NoCapacity:
            pass
        if self.waiting >= self.max_queued:
            raise queue_full(self.retry_after_s)
        self.waiting += 1
        try:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await self._wait_for_capacity(min(self.poll_s, remaining))
                try:
                    return await start()
                except NoCapacity:
                    continue
        finally:
            self.waiting -= 1
