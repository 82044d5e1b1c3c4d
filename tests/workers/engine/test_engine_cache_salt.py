"""Prefix-cache isolation: a prompt cached under one cache salt is no hit under another or
under none (its tokens are computed again), is a hit under its own, and salts' tries go when
their last page or snapshot is evicted."""

from __future__ import annotations

import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams

PAGE = 4


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def _engine(model, snapshots: int | None = None, pages: int = 200) -> Engine:
    extra = {} if snapshots is None else {"num_snapshots": snapshots}
    return Engine(model, EngineConfig(page_size=PAGE, num_pages=pages, max_num_seqs=4,
                                      max_batch_tokens=12, prefix_cache=True,
                                      snapshot_interval=8, **extra))


def _hit_tokens(engine: Engine, name: str, ids: list[int], salt: bytes) -> int:
    """Serves one request alone; returns how many of its prompt tokens came from the cache."""
    before = engine.stats().prefix_hit_tokens_total
    engine.add_request(Request(name, list(ids), SamplingParams(max_tokens=3, temperature=0,
                                                               ignore_eos=True),
                               cache_salt=salt))
    while engine.has_work():
        engine.step()
    return engine.stats().prefix_hit_tokens_total - before


def test_a_salted_prompt_hits_only_under_its_own_salt(tiny_model):
    engine = _engine(tiny_model, snapshots=16)
    for n in (3, 17):  # inside the first page (a snapshot on the root), and over pages
        ids = _prompt(n, n)
        assert _hit_tokens(engine, f"a{n}", ids, b"tenant-a") == 0
        assert _hit_tokens(engine, f"b{n}", ids, b"tenant-b") == 0
        assert _hit_tokens(engine, f"s{n}", ids, b"") == 0
        assert _hit_tokens(engine, f"a{n}'", ids, b"tenant-a") > 0
        assert _hit_tokens(engine, f"s{n}'", ids, b"") > 0
    engine.prefix.audit()


def test_salts_tries_are_pruned_as_their_state_is_evicted(tiny_model):
    engine = _engine(tiny_model, snapshots=6, pages=42)
    for i in range(60):  # many more salts than the cache holds: the oldest are evicted
        _hit_tokens(engine, f"r{i}", _prompt(i, 5), f"salt-{i}".encode())
        counts = engine.prefix.audit()  # which also finds any salt's root left empty
        # Every salt's root left holds a page or a snapshot of its own.
        assert len(engine.prefix.roots) - 1 <= counts["cached"] + counts["snapshots"]
    assert len(engine.prefix.roots) - 1 <= 6 + 42
    # The last salt still hits.
    assert _hit_tokens(engine, "again", _prompt(59, 5), b"salt-59") > 0
