"""EngineLoop: the engine on a background thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from baton.workers.engine import Engine, EngineConfig, Request, SamplingParams
from baton.workers.engine.loop import EngineDraining, EngineLoop


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def make_loop(model, **kw) -> EngineLoop:
    cfg = {"page_size": 4, "num_pages": 96, "max_num_seqs": 8, "max_batch_tokens": 16, **kw}
    return EngineLoop(Engine(model, EngineConfig(**cfg)), idle_wait=0.01)


def reference(model, requests) -> dict[str, list[int]]:
    engine = Engine(model, EngineConfig(page_size=4, num_pages=96, max_batch_tokens=16))
    for r in requests:
        engine.add_request(Request(r.request_id, r.prompt_ids, r.sampling))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    return out


def test_submit_from_threads_and_asyncio(tiny_model):
    requests = [Request(f"t{i}", prompt(i, 4 + 5 * i), greedy(6 + i)) for i in range(4)]
    expect = reference(tiny_model, requests)
    with make_loop(tiny_model) as loop:
        got: dict[str, list[int]] = {}

        def consume(req):
            got[req.request_id] = [ev.token_id for ev in loop.submit(req)]

        threads = [threading.Thread(target=consume, args=(r,)) for r in requests[:2]]
        for t in threads:
            t.start()

        async def consume_async(req):
            return [ev.token_id async for ev in loop.submit(req)]

        async def both():
            return await asyncio.gather(*(consume_async(r) for r in requests[2:]))

        for req, tokens in zip(requests[2:], asyncio.run(both())):
            got[req.request_id] = tokens
        for t in threads:
            t.join(30)
        assert got == expect
        with pytest.raises(ValueError, match="max_tokens"):
            loop.submit(Request("bad", [5], SamplingParams(max_tokens=0)))
        assert loop.stats().running == 0


def test_closing_a_stream_aborts_and_frees(tiny_model):
    with make_loop(tiny_model) as loop:
        stream = loop.submit(Request("long", prompt(1, 20), greedy(100)))
        first = next(stream)
        assert first.token_id is not None
        stream.close()
        rest = list(stream)
        assert rest and rest[-1].finish_reason == "abort"
        assert loop.drain(timeout=10)
        stats = loop.stats()
        assert stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0
        with pytest.raises(EngineDraining):
            loop.submit(Request("late", [5], greedy(1)))


def test_prefill_and_reserve_through_loops(tiny_model):
    requests = [Request(f"h{i}", prompt(30 + i, 9 + 6 * i), greedy(5)) for i in range(3)]
    expect = reference(tiny_model, requests)
    with make_loop(tiny_model) as prefill, make_loop(tiny_model) as decode:
        reservations = [decode.reserve(r) for r in requests]
        for res in reservations:
            res.bind(res.token, res.chain_hash)

        class Sink:
            def __init__(self, res):
                self.res = res

            def on_layer(self, state):
                self.res.write(state)

        futures = [prefill.run_prefill(r, Sink(res)) for r, res in zip(requests, reservations)]
        streams = []
        for r, res, fut in zip(requests, reservations, futures):
            result = fut.result(timeout=30)
            streams.append(decode.commit(res, result.first_token, r.sampling, result.logprob))
        for r, stream in zip(requests, streams):
            assert [ev.token_id for ev in stream] == expect[r.request_id]
        # A prefill aborted while queued fails its future; a released reservation frees.
        res = decode.reserve(Request("gone", prompt(9, 9)))
        decode.release(res).result(timeout=30)
        assert decode.drain(timeout=10) and prefill.drain(timeout=10)
        assert decode.stats().reserved == 0 and decode.stats().kv_cache_usage == 0


def hold_after_first_token(loop: EngineLoop, request_id: str, release) -> threading.Event:
    """Makes the engine's steps after the one that produced request_id's first token wait
    until release() holds: the request is still running then, however fast the machine and
    however late the test's thread runs. Returns an event set with that first token."""
    first = threading.Event()
    step = loop.engine.step

    def held_step():
        if first.is_set():
            deadline = time.monotonic() + 60
            while not release():
                assert time.monotonic() < deadline, "the engine was held for good"
                time.sleep(0.001)  # a bounded poll for the state the test brings about
        events = step()
        if any(e.request_id == request_id for e in events):
            first.set()
        return events

    loop.engine.step = held_step
    return first


def test_stop_ends_open_streams(tiny_model):
    loop = make_loop(tiny_model)
    hold_after_first_token(loop, "s", lambda: loop._stopping)  # until stop() below
    stream = loop.submit(Request("s", prompt(2, 10), greedy(149)))
    next(stream)
    loop.stop()
    events = list(stream)
    assert events[-1].finish_reason == "abort"
    with pytest.raises(EngineDraining):
        loop.submit(Request("after", [5], greedy(1)))
    assert loop.drain(timeout=1)
    stats = loop.stats()
    assert stats.kv_cache_usage == 0 and stats.ssm_slot_usage == 0


def test_a_failing_step_fails_open_requests_instead_of_hanging(tiny_model):
    loop = make_loop(tiny_model)
    stream = loop.submit(Request("doomed", prompt(3, 10), greedy(50)))
    next(stream)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    loop.engine.runner.run_chunks = broken
    with pytest.raises(RuntimeError, match="device lost"):
        list(stream)
    assert isinstance(loop.error, RuntimeError)
    with pytest.raises(RuntimeError, match="device lost"):
        loop.submit(Request("next", [5], greedy(1)))
    loop.stop()
    assert loop.stats().kv_cache_usage == 0 and loop.stats().ssm_slot_usage == 0


def test_cancelled_async_consumer_aborts_its_request(tiny_model):
    with make_loop(tiny_model) as loop:
        cancelled = threading.Event()
        first = hold_after_first_token(loop, "c", cancelled.is_set)

        async def consume():
            async with loop.submit(Request("c", prompt(4, 10), greedy(140))) as stream:
                async for _ in stream:
                    pass

        async def main():
            task = asyncio.create_task(consume())
            assert await asyncio.to_thread(first.wait, 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cancelled.set()

        asyncio.run(main())
        assert loop.drain(timeout=60)
        assert loop.stats().requests_finished_total.get("abort") == 1
