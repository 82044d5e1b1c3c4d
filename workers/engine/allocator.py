"""Allocators for the two caches: KV pages (attention) and state slots (Mamba conv + SSM).

Both are free lists of integer ids. They never grow: the model's cache tensors are allocated
once with num_pages / num_slots rows, and the scheduler asks before it admits (admission
control), so running out is a scheduling decision, never an exception in the forward pass.
"""

from __future__ import annotations


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


class PageAllocator(_IdPool):
    """KV cache pages of page_size tokens each."""

    what = "pages"

    def __init__(self, num_pages: int, page_size: int) -> None:
        super().__init__(num_pages)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold num_tokens tokens."""
        return -(-num_tokens // self.page_size)


class SlotPool(_IdPool):
    """Mamba state slots: one per live sequence, holding its conv and SSM state."""

    what = "slots"

    def allocate_one(self) -> int:
        return self.allocate(1)[0]
