"""Deadlines: many timeouts on one heap, serviced by one thread.

A decode worker holds hundreds of reservations and transfers, each with deadlines (attach,
transfer, request). A Timer thread each would cost a thread per deadline; here every deadline
is an entry on one heap and one daemon thread sleeps until the earliest, runs its callback,
and goes back to sleep. Cancelling marks the entry (it is skipped when it comes up), so
cancel and schedule are O(log n) and never wait for the thread.

Callbacks run on the deadline thread: they must be short and must not block (hand real work
to another thread or queue). One that raises is logged; the others still run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Deadline:
    """One scheduled callback; cancel() keeps it from running (idempotent)."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """A heap of Deadline entries and the one thread that runs them when due.

    `clock` is time.time by default (deadlines cross processes as wall-clock times); tests
    that are about time may inject another, and call `run_due()` themselves with
    start_thread=False.
    """

    def __init__(self, name: str = "baton-deadlines", clock: Callable[[], float] = time.time,
                 start_thread: bool = True) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def at(self, when: float, callback: Callable[[], object]) -> Deadline:
        """Runs callback once `clock()` reaches when (at once if it already has)."""
        entry = Deadline(when, callback)
        with self._cond:
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (when, next(self._order), entry))
            if earliest is None or when < earliest:
                self._cond.notify()
        return entry

    def __len__(self) -> int:
        """Entries not yet run (cancelled ones included until they come up)."""
        with self._cond:
            return len(self._heap)

    def _pop_due(self) -> list[Deadline]:
        now = self._clock()
        due = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)[2]
            if not entry.cancelled:
                due.append(entry)
        return due

    def run_due(self) -> int:
        """Runs every entry that is due; how many ran (for a caller-driven clock)."""
        with self._cond:
            due = self._pop_due()
        for entry in due:
            self._fire(entry)
        return len(due)

    @staticmethod
    def _fire(entry: Deadline) -> None:
        if entry.cancelled:
            return
        try:
            entry.callback()
        except Exception:
            log.exception("a deadline callback failed")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    due = self._pop_due()
                    if due:
                        break
                    # Sleep until the earliest entry (a new earlier one notifies).
                    wait = self._heap[0][0] - self._clock() if self._heap else None
                    self._cond.wait(wait)
                else:
                    return
            for entry in due:
                self._fire(entry)

    def close(self) -> None:
        """Stops the thread; entries not yet due never run."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
