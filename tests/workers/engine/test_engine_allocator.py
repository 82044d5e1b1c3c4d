"""Page and slot allocators."""

from __future__ import annotations

import pytest

from baton.workers.engine.allocator import PageAllocator, PoolExhausted, SlotPool


def test_pages_allocate_free_and_refuse_when_empty():
    pages = PageAllocator(num_pages=4, page_size=16)
    assert pages.pages_for(0) == 0 and pages.pages_for(16) == 1 and pages.pages_for(17) == 2
    a = pages.allocate(3)
    assert len(set(a)) == 3 and pages.num_free == 1 and pages.usage == 0.75
    assert not pages.can_allocate(2)
    with pytest.raises(PoolExhausted):
        pages.allocate(2)
    pages.free(a[:2])
    assert pages.num_free == 3
    with pytest.raises(ValueError, match="double free"):
        pages.free(a[:1])
    pages.free(a[2:])
    assert pages.usage == 0.0


def test_slots_and_bad_sizes():
    slots = SlotPool(2)
    assert {slots.allocate_one(), slots.allocate_one()} == {0, 1}
    with pytest.raises(PoolExhausted):
        slots.allocate_one()
    with pytest.raises(ValueError, match="capacity"):
        SlotPool(0)
    with pytest.raises(ValueError, match="page_size"):
        PageAllocator(4, 0)
