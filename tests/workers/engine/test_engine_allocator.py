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


def test_shared_pages_are_refcounted_and_published_ones_wait_in_an_lru():
    pages = PageAllocator(num_pages=4, page_size=4)
    evicted = []
    pages.on_evict = evicted.append
    a = pages.allocate(3)
    pages.mark_cached(a[0])
    pages.mark_cached(a[1])
    pages.share(a[0])  # a second sequence holds the first page too
    pages.free(a)
    assert pages.refs(a[0]) == 1 and pages.num_cached == 1 and pages.num_free == 3
    pages.free([a[0]])
    # Released deepest first: a[1] is the older LRU entry, so it is reused before a[0].
    assert pages.audit() == {"free": 2, "cached": 2, "held": 0}
    assert pages.usage == 0.0
    fresh = pages.allocate(3)
    assert evicted == [a[1]] and a[1] in fresh and a[0] not in fresh
    pages.share(a[0])  # a cached page comes back from the LRU
    assert pages.num_free == 0 and pages.refs(a[0]) == 1
    pages.uncache(a[0])
    pages.free([a[0], *fresh])
    assert pages.audit() == {"free": 4, "cached": 0, "held": 0}
    with pytest.raises(ValueError, match="neither held nor cached"):
        pages.share(a[0])  # a free page has no contents anybody may share
    with pytest.raises(ValueError, match="only held pages"):
        pages.mark_cached(a[0])


def test_pages_held_by_snapshots_are_reclaimed_when_fresh_ones_run_short():
    class Snapshots:
        def __init__(self, held):
            self.held = held

        def reclaimable(self):
            return len(self.held)

        def reclaim(self, n):
            give, self.held = self.held[:n], self.held[n:]
            pages.free(give)

    pages = PageAllocator(num_pages=3, page_size=4)
    pages.reclaimer = Snapshots(pages.allocate(2))
    assert pages.num_free == 3 and pages.usage == 0.0
    got = pages.allocate(3)
    assert sorted(got) == [0, 1, 2] and pages.reclaimer.held == []
    with pytest.raises(PoolExhausted):
        pages.allocate(1)
