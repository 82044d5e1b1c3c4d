"""How many KV pages, Mamba state slots and prefix-cache snapshots an engine gets.

The one place that sizes the caches (the Engine, and the worker through it): from explicit
counts, or from a byte budget, with the bytes per page, slot and snapshot measured on a probe
cache allocated exactly like the real one (same page size, speculation buffers, SSM dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from baton.workers.engine.config import EngineConfig

# A pure-Mamba model's pages hold no bytes: they only carry the prefix cache's page chains.
_STATELESS_PAGES_PER_SEQUENCE = 4


class CacheSizeError(ValueError):
    """Sizes that cannot work; `field` names the EngineConfig field to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"EngineConfig.{field}: {message}")
        self.field = field
        self.detail = message


@dataclass(frozen=True)
class CacheSizes:
    num_pages: int
    num_slots: int
    num_snapshots: int
    bytes_per_page: int
    bytes_per_slot: int
    bytes_per_snapshot: int
    pages_per_sequence: int
    """Pages one sequence of max_model_len tokens (plus drafts) needs."""


def size_caches(model, config: EngineConfig, max_model_len: int) -> CacheSizes:
    """The cache sizes of an engine for `model` (see the module docstring)."""
    k = config.speculative_tokens
    probe = model.allocate_cache(1, config.page_size, 1, spec_tokens=k,
                                 ssm_dtype=config.ssm_dtype)
    per_page, per_slot = probe.bytes_per_page(), probe.bytes_per_slot()
    per_snapshot = probe.bytes_per_snapshot(int(model.config.hidden_size))
    del probe
    num_slots = config.num_slots or config.max_num_seqs
    per_sequence = -(-(max_model_len + k + 1) // config.page_size)
    enough = config.max_num_seqs * per_sequence
    if config.num_pages is not None:
        num_pages = config.num_pages
        num_snapshots = config.num_snapshots
        if num_snapshots is None:
            num_snapshots = num_slots if config.prefix_cache else 0
    else:
        budget = config.cache_memory_bytes
        left = budget - num_slots * per_slot
        if left <= 0:
            raise CacheSizeError(
                "cache_memory_bytes", f"{budget} bytes: {num_slots} state slots take "
                f"{num_slots * per_slot} bytes, leaving no room for KV pages of {per_page} "
                "bytes")
        num_snapshots = 0
        if config.prefix_cache:
            num_snapshots = config.num_snapshots
            if num_snapshots is None:
                share = int(budget * config.snapshot_memory_fraction)
                num_snapshots = share // per_snapshot
                if num_snapshots < 1:
                    raise CacheSizeError(
                        "snapshot_memory_fraction", f"{config.snapshot_memory_fraction} of "
                        f"{budget} bytes is {share} bytes: less than one Mamba snapshot "
                        f"({per_snapshot} bytes); give a larger share, more cache memory, or "
                        "turn the prefix cache off")
            left -= num_snapshots * per_snapshot
            if left <= 0:
                raise CacheSizeError(
                    "num_snapshots", f"{num_snapshots} snapshots of {per_snapshot} bytes "
                    f"leave no room for KV pages in {budget} bytes of cache memory")
        if per_page:
            num_pages = left // per_page
            if not config.prefix_cache:
                # Without a prefix cache, pages past what the running sequences can fill
                # would hold nothing.
                num_pages = min(num_pages, enough)
        else:
            num_pages = _STATELESS_PAGES_PER_SEQUENCE * enough
    if config.prefix_cache and num_snapshots < 1:
        raise CacheSizeError("num_snapshots", f"{num_snapshots}: the prefix cache needs at "
                             "least one snapshot row (or prefix_cache=False)")
    # One request of max_model_len tokens (plus drafts) must fit alone, so that admission
    # and preemption always make progress.
    if num_pages < per_sequence:
        field = "num_pages" if config.num_pages is not None else "cache_memory_bytes"
        raise CacheSizeError(
            field, f"{num_pages} KV pages of {config.page_size} tokens cannot hold one sequence "
            f"of max_model_len={max_model_len} tokens (+{k} drafts); give at least "
            f"{per_sequence} pages ({per_sequence * per_page} bytes) or lower max_model_len")
    return CacheSizes(num_pages=num_pages, num_slots=num_slots, num_snapshots=num_snapshots,
                      bytes_per_page=per_page, bytes_per_slot=per_slot,
                      bytes_per_snapshot=per_snapshot, pages_per_sequence=per_sequence)
