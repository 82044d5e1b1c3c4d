"""Deadlines: many timeouts on one heap, one thread."""

from __future__ import annotations

import logging
import threading
import time

from baton.workers.deadlines import Deadlines


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_due_entries_run_in_deadline_order_and_cancelled_ones_never():
    clock = Clock()
    heap = Deadlines(clock=clock, start_thread=False)
    ran: list[str] = []
    heap.at(1003.0, lambda: ran.append("c"))
    heap.at(1001.0, lambda: ran.append("a"))
    cancelled = heap.at(1002.0, lambda: ran.append("cancelled"))
    heap.at(1002.0, lambda: ran.append("b"))
    cancelled.cancel()
    cancelled.cancel()  # idempotent
    assert heap.run_due() == 0 and ran == []
    clock.now = 1002.0
    assert heap.run_due() == 2 and ran == ["a", "b"]
    clock.now = 1010.0
    assert heap.run_due() == 1 and ran == ["a", "b", "c"] and len(heap) == 0
    heap.at(900.0, lambda: ran.append("past"))  # already due: runs at the next look
    assert heap.run_due() == 1 and ran[-1] == "past"


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog):
    clock = Clock()
    heap = Deadlines(clock=clock, start_thread=False)
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    heap.at(1000.0, boom)
    heap.at(1000.0, lambda: ran.append(1))
    with caplog.at_level(logging.ERROR):
        assert heap.run_due() == 2
    assert ran == [1] and "a deadline callback failed" in caplog.text


def test_one_thread_serves_every_deadline_and_wakes_for_an_earlier_one():
    before = {t.name for t in threading.enumerate()}
    heap = Deadlines("test-deadlines")
    try:
        fired: dict[str, threading.Event] = {name: threading.Event() for name in "ab"}
        late = heap.at(time.time() + 3600, lambda: None)  # the thread sleeps toward it...
        for name in "ab":  # ...and an earlier entry wakes it
            heap.at(time.time(), fired[name].set)
        assert all(event.wait(30) for event in fired.values())
        new = {t.name for t in threading.enumerate()} - before
        assert new == {"test-deadlines"}  # one thread, however many entries
        late.cancel()
    finally:
        heap.close()
    assert "test-deadlines" not in {t.name for t in threading.enumerate()}
