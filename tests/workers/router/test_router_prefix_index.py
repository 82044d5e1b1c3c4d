"""The router's prefix index and the prefix-aware balancer, without workers."""

from __future__ import annotations

import random

import grpc

from baton.proto.baton.worker.v1 import worker_pb2
from baton.workers.router.balancer import AFFINITY, Balancer
from baton.workers.router.discovery import Worker
from baton.workers.router.prefix_index import PrefixIndex, rendezvous


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_points_are_found_at_their_depth_and_only_on_their_prefix():
    index = PrefixIndex(block_size=16)
    a = tokens(1, 100)
    index.record("d1", a, [37, 64, 100])
    index.record("d2", a[:20] + tokens(2, 50), [70])
    # A longer prompt that extends a hits at the deepest point d1 holds on it.
    assert index.lookup(a + tokens(3, 30)) == {"d1": 100}
    # Diverging at 50: d1's point at 37 (its interval snapshot) is the best; d2 diverged at 20.
    assert index.lookup(a[:50] + tokens(4, 10)) == {"d1": 37}
    assert index.lookup(tokens(5, 80)) == {}
    # A point inside the last block needs the same tokens up to it, not just the same block.
    assert index.lookup(a[:36]) == {}
    assert index.lookup(a[:37]) == {"d1": 37}


def test_answers_correct_what_the_index_believed():
    index = PrefixIndex(block_size=16)
    a = tokens(6, 90)
    index.record("d1", a, [40, 90])
    # D evicted the deep part: its Reserve answer says 40 for this prompt.
    index.correct("d1", a + [1, 2, 3], 40)
    assert index.lookup(a + [1, 2, 3]) == {"d1": 40}
    index.correct("d1", a, 0)
    assert index.lookup(a) == {}
    index.correct("d2", a, 64)  # an answer is also news
    assert index.lookup(a) == {"d2": 64}
    index.forget("d2")
    assert index.lookup(a) == {} and len(index) == 0


def test_points_expire_and_the_index_is_bounded():
    index = PrefixIndex(block_size=8, ttl_s=10.0, max_points=3)
    a = tokens(7, 64)
    index.record("d1", a, [8, 16], now=0.0)
    assert index.lookup(a, now=5.0) == {"d1": 16}
    assert index.lookup(a, now=11.0) == {}
    index.record("d1", a, [24, 32, 40], now=20.0)
    assert len(index) == 3  # the oldest points went first
    assert index.lookup(a[:20], now=21.0) == {}
    assert index.lookup(a, now=21.0) == {"d1": 40}
    index.bind("s", "d1", now=20.0)
    assert index.session("s", now=25.0) == "d1" and index.session("s", now=31.0) is None


def test_rendezvous_is_stable_and_moves_only_a_lost_workers_sessions():
    workers = [f"10.0.0.{i}:5" for i in range(4)]
    chosen = {s: rendezvous(s, workers) for s in (f"session-{i}" for i in range(200))}
    assert set(chosen.values()) == set(workers)  # spread over every worker
    survivors = workers[1:]
    for session, worker in chosen.items():
        again = rendezvous(session, survivors)
        assert again == worker or worker == workers[0]


def _worker(address: str, running: int = 0, free_slots: int = 16) -> Worker:
    w = Worker(address, "decode", grpc.aio.insecure_channel(address))
    w.serving = True
    w.checked_at = 1.0
    w.load = worker_pb2.LoadResponse(role=worker_pb2.ROLE_DECODE, running=running,
                                     free_slots=free_slots, free_kv_tokens=10**6)
    return w


async def test_prefix_aware_prefers_the_holder_unless_it_is_much_busier():
    balancer = Balancer("prefix-aware", block_size=16, snapshot_interval=32)
    d1, d2 = _worker("10.0.0.1:5"), _worker("10.0.0.2:5")
    history = tokens(8, 200)
    # Nothing known: least-loaded (the idler one first).
    d1.load.running, d1.load.free_slots = 3, 13
    assert [w.address for w in balancer.order([d1, d2], prompt=history)] == [d2.address,
                                                                             d1.address]
    balancer.computed(d1, history, 0)  # d1 prefilled it: snapshots at 32, 64, ... and 200
    turn = history + tokens(9, 40)
    assert balancer.order([d1, d2], prompt=turn)[0] is d1
    # A prompt that shares only the first 70 tokens: d1's snapshot at 64 still wins.
    assert balancer.order([d1, d2], prompt=history[:70] + tokens(10, 5))[0] is d1
    # Far busier than the other: the load outweighs most of the prompt.
    d1.load.running, d1.load.free_slots = 15, 1
    d1.inflight = 15
    assert balancer.order([d1, d2], prompt=history[:70] + tokens(10, 5))[0] is d2
    # Full workers and workers to avoid still go last.
    d1.inflight, d1.load.running, d1.load.free_slots = 0, 0, 16
    assert balancer.order([d1, d2], avoid={d1.address}, prompt=turn)[0] is d2
    for w in (d1, d2):
        await w.channel.close()


async def test_a_session_goes_back_to_its_worker_and_unknown_ones_hash_alike():
    d1, d2, d3 = (_worker(f"10.0.0.{i}:5") for i in (1, 2, 3))
    a, b = Balancer("prefix-aware"), Balancer("prefix-aware")  # two routers
    prompt = tokens(11, 30)
    # A new session: both routers pick the worker its key hashes to (all idle).
    first = a.order([d1, d2, d3], prompt=prompt, cache_key="chat-42")[0]
    assert b.order([d3, d1, d2], prompt=prompt, cache_key="chat-42")[0] is first
    # Router a served it on d2: its next turn goes back there, with a modest load against it.
    a.held(d2, prompt, 0, cache_key="chat-42")
    d2.inflight = 2
    assert a.order([d1, d2, d3], prompt=prompt + [5], cache_key="chat-42")[0] is d2
    assert AFFINITY < 1.0  # ...but not at any load
    for w in (d1, d2, d3):
        await w.channel.close()


def test_other_routings_learn_nothing():
    balancer = Balancer("least-loaded")
    assert balancer.indexes == {}
    balancer.held(_FakeWorker(), [1, 2], 2, cache_key="x")  # no index: nothing to do
    balancer.finished(_FakeWorker(), [1, 2, 3])


class _FakeWorker:
    role = "decode"
    address = "x:1"


async def test_snapshot_points_count_like_any_other_snapshot():
    """A worker that computed a prompt with snapshot points (message boundaries) is believed
    to hold them: a next turn that shares the prompt only up to a point goes to it."""
    balancer = Balancer("prefix-aware", block_size=16, snapshot_interval=0)
    d1, d2 = _worker("10.0.0.1:5"), _worker("10.0.0.2:5")
    d1.load.running, d1.load.free_slots = 1, 15  # busier: it wins only by its prefix
    d1.inflight = 1
    history = tokens(11, 150)
    rerendered = history[:137] + tokens(12, 30)
    balancer.computed(d1, history, 0)
    assert balancer.order([d1, d2], prompt=rerendered)[0] is d2  # the prompt end: no prefix
    balancer.computed(d1, history, 0, points=(40, 137))
    assert balancer.order([d1, d2], prompt=rerendered)[0] is d1
    for w in (d1, d2):
        await w.channel.close()
