"""Allocators for the two caches: KV pages (attention) and state slots (Mamba conv + SSM).

Both hand out integer ids of rows the model's cache tensors were allocated with once; they
never grow, and the scheduler asks before it admits (admission control), so running out is a
scheduling decision, never an exception in the forward pass.

KV pages are reference-counted: sequences that share a cached prefix hold the same pages
(prefix_cache.py publishes full pages under their content). A page whose last holder lets go
goes back to the free list, or, when it is published, to an LRU of reusable cached pages: it
keeps its contents until a fresh page is needed and none is free, and a later request with the
same prefix takes it back (`share`) instead of recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class PoolExhausted(RuntimeError):
    """Asked for more ids than are free."""


class _IdPool:
    what = "ids"

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"{self.what} capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # Popped from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        return len(self._used) / self.capacity

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} {self.what}")
        if n > len(self._free):
            raise PoolExhausted(f"asked for {n} {self.what}, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise ValueError(f"{self.what} id {i} is not allocated (double free?)")
            self._used.remove(i)
            self._free.append(i)


class PageReclaimer(Protocol):
    """Holds pages it can give back when fresh pages run short (the snapshot pool's tails)."""

    def reclaimable(self) -> int:
        """Pages reclaim() could free now."""

    def reclaim(self, n: int) -> None:
        """Frees at least n of its pages (fewer if it holds fewer), least recently used first."""


class PageAllocator:
    """KV cache pages of page_size tokens each: free, held (refcount > 0), or cached."""

    what = "pages"

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"pages capacity must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.capacity = num_pages
        self.page_size = page_size
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unheld, oldest first
        self._cached: set[int] = set()
        self.on_evict: Callable[[int], None] | None = None
        """Called when a cached page is taken for reuse (the prefix cache forgets it)."""
        self.reclaimer: PageReclaimer | None = None
        self.evictions_total = 0

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold num_tokens tokens."""
        return -(-num_tokens // self.page_size)

    # ---- counts --------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages a sequence can get now: free, cached but unheld, and reclaimable."""
        spare = self.reclaimer.reclaimable() if self.reclaimer is not None else 0
        return len(self._free) + len(self._lru) + spare

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def usage(self) -> float:
        """Share of pages held by sequences (cached pages are reusable, so not counted)."""
        return self.num_used / self.capacity

    @property
    def num_cached(self) -> int:
        """Published pages nobody holds: the reusable part of the prefix cache."""
        return len(self._lru)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # ---- taking and giving back ----------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (refcount 1): free ones first, then the least recently used cached
        ones, then pages the reclaimer gives back."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} {self.what}")
        if n > len(self._free) + len(self._lru) and self.reclaimer is not None:
            self.reclaimer.reclaim(n - len(self._free) - len(self._lru))
        if n > len(self._free) + len(self._lru):
            raise PoolExhausted(f"asked for {n} {self.what}, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._lru.popitem(last=False)
                self._cached.discard(page)
                self.evictions_total += 1
                if self.on_evict is not None:
                    self.on_evict(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, page: int) -> None:
        """One more holder of a page (a cached page taken back leaves the LRU)."""
        if self._refs[page] == 0:
            if page not in self._lru:
                raise ValueError(f"page {page} is neither held nor cached")
            del self._lru[page]
        self._refs[page] += 1

    def free(self, pages: list[int]) -> None:
        """Each page loses one holder. Released in reverse, so a sequence's deepest pages are
        the older entries of the LRU and go first (the shared beginnings stay longest)."""
        for page in reversed(pages):
            if self._refs[page] <= 0:
                raise ValueError(f"{self.what} id {page} is not allocated (double free?)")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._cached:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    # ---- publishing ----------------------------------------------------------------------

    def mark_cached(self, page: int) -> None:
        """The prefix cache published this (held) page: when unheld it goes to the LRU."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not held: only held pages are published")
        self._cached.add(page)

    def uncache(self, page: int) -> None:
        """The prefix cache forgot this page: when unheld it is simply free."""
        self._cached.discard(page)
        if page in self._lru:
            del self._lru[page]
            self._free.append(page)

    def is_cached(self, page: int) -> bool:
        return page in self._cached

    def audit(self) -> dict[str, int]:
        """Checks that every page is exactly one of free, cached-unheld or held; returns the
        counts. RuntimeError names what is inconsistent (a leak or a double use)."""
        held = [p for p, r in enumerate(self._refs) if r > 0]
        if any(r < 0 for r in self._refs):
            raise RuntimeError("a page has a negative refcount")
        free, lru = set(self._free), set(self._lru)
        if len(free) != len(self._free):
            raise RuntimeError("a page is on the free list twice")
        if free & lru or free & set(held) or lru & set(held):
            raise RuntimeError("a page is in two of free / cached / held")
        if len(free) + len(lru) + len(held) != self.capacity:
            raise RuntimeError(f"{self.capacity - len(free) - len(lru) - len(held)} pages are "
                               "neither free, cached nor held (leaked)")
        if not lru <= self._cached:
            raise RuntimeError("an unpublished page waits in the cached LRU")
        return {"free": len(free), "cached": len(lru), "held": len(held)}


class SlotPool(_IdPool):
    """Mamba state slots: one per live sequence, holding its conv and SSM state."""

    what = "slots"

    def allocate_one(self) -> int:
        return self.allocate(1)[0]
