"""Admission: a first-in first-out queue that wakes one waiter per freed slot, n > 1 requests
that take room for all their choices or are refused before anything is streamed, and fair
sharing between API keys (with vLLM's `priority` within a key). The official openai client
against the real aiohttp router over the fake backend."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from baton.workers.router.admission import Tenant
from baton.workers.router.auth import ApiKeys
from baton.workers.router.backend import NoCapacity
from baton.workers.router.server import RouterSettings


def _settings(**kw) -> RouterSettings:
    base = dict(served_model_name="tiny", max_model_len=128, request_timeout_s=60.0,
                max_queued_requests=16)
    base.update(kw)
    return RouterSettings(**base)


def _client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def refusals(fake_backend):
    """How many times the backend refused a start for lack of room (each a wasted try)."""
    count = [0]
    generate = fake_backend.generate

    async def counting(request):
        try:
            async for out in generate(request):
                yield out
        except NoCapacity:
            count[0] += 1
            raise

    fake_backend.generate = counting
    return count


async def _serve(start_router, backend=None, capacity: int | None = None, **kw):
    """A router over the fake backend; with capacity, the backend holds that many requests
    and holds each one's tokens after its first until backend.gate is set."""
    url = await start_router(_settings(**kw))
    router = start_router.routers[-1]
    router.queue.poll_s = 3600.0  # only freed slots wake waiters in these tests
    if capacity is not None:
        backend.capacity = capacity
        backend.gate = asyncio.Event()
    return url, router


async def _hold_one(c: openai.AsyncOpenAI, prompt: str = "abc"):
    """A streamed request that holds its slot (the backend's gate) after its first token."""
    stream = await c.completions.create(model="tiny", prompt=prompt, stream=True)
    await stream.__anext__()
    return stream


async def test_the_queue_admits_in_arrival_order_waking_one_waiter_per_freed_slot(
        start_router, fake_backend, refusals, until_queued):
    url, router = await _serve(start_router, fake_backend, 1)
    c = _client(url)
    running = await _hold_one(c)
    queued = []
    for i, prompt in enumerate(["q1", "q2", "q3", "q4"]):
        queued.append(asyncio.create_task(c.completions.create(model="tiny", prompt=prompt)))
        await until_queued(url, i + 1)
    # Only the first to queue tried the full backend; the others queued behind it untried.
    assert refusals[0] == 1
    fake_backend.gate.set()
    [x async for x in running]
    answers = await asyncio.gather(*queued)
    assert [a.choices[0].text for a in answers] == ["1q", "2q", "3q", "4q"]
    started = [bytes(r.prompt_ids).decode() for r in fake_backend.requests]
    assert started == ["abc", "q1", "q2", "q3", "q4"]
    # Each freed slot woke exactly the next waiter, which found room: no try was wasted.
    assert refusals[0] == 1
    assert router.queue.waiting == 0


async def test_n_greater_than_the_room_is_refused_429_before_anything_is_streamed(
        start_router, fake_backend):
    url, router = await _serve(start_router)
    fake_backend.capacity = 3
    async with httpx.AsyncClient() as http:
        r = await http.post(url + "/v1/completions", json={
            "model": "tiny", "prompt": "abc", "n": 4, "stream": True})
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "no_room_for_choices"
    assert "data:" not in r.text
    # The three choices that found room were given back at once.
    assert len(fake_backend.requests) == 4 - 1
    assert fake_backend.active == 0
    assert len(fake_backend.closed_early) == 3
    with pytest.raises(openai.RateLimitError):
        await _client(url).completions.create(model="tiny", prompt="abc", n=4)
    # With room for all four, all four run.
    fake_backend.capacity = 4
    out = await _client(url).completions.create(model="tiny", prompt="abc", n=4)
    assert sorted(ch.index for ch in out.choices) == [0, 1, 2, 3]
    assert {ch.text for ch in out.choices} == {"cba"}


async def test_a_cancelled_n_4_request_frees_all_four_choices(
        start_router, fake_backend, until, until_queued):
    url, router = await _serve(start_router, fake_backend, 4)
    c = _client(url)
    stream = await c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], n=4, stream=True)
    await stream.__anext__()
    assert fake_backend.active == 4
    # A fifth request waits for room.
    waiting = asyncio.create_task(c.completions.create(model="tiny", prompt="xy"))
    await until_queued(url, 1)
    await stream.close()
    assert await until(lambda: len(fake_backend.closed_early) == 4)
    fake_backend.gate.set()
    assert (await waiting).choices[0].text == "yx"
    assert await until(lambda: fake_backend.active == 0)
    assert router.queue.waiting == 0


async def test_a_choice_that_ends_first_hands_its_slot_to_the_next_waiter(
        start_router, fake_backend, until_queued):
    url, router = await _serve(start_router, fake_backend, 2)
    fake_backend.gate = None
    release = {"s": asyncio.Event(), "long": asyncio.Event()}  # each prompt's tokens wait
    generate = fake_backend.generate

    async def held(request):
        prompt = bytes(request.prompt_ids).decode()
        async for i, out in _enumerate(generate(request)):
            if i > 0 and prompt in release:
                await release[prompt].wait()
            yield out

    fake_backend.generate = held
    c = _client(url)
    both = await c.completions.create(model="tiny", prompt=["s", "long"], stream=True)
    await both.__anext__()
    waiting = asyncio.create_task(c.completions.create(model="tiny", prompt="xy"))
    await until_queued(url, 1)
    release["s"].set()  # choice "s" ends; "long" holds its slot on
    assert (await waiting).choices[0].text == "yx"
    assert not release["long"].is_set() and fake_backend.active == 1
    release["long"].set()
    [x async for x in both]
    assert router.queue.waiting == 0 and fake_backend.active == 0


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# tenants\nsk-a weight=1\nsk-b weight=1 maxConcurrency=4\n"
                    "sk-c maxConcurrency=1\n")
    return path


async def test_one_key_s_heavy_queue_cannot_starve_another_key(
        start_router, fake_backend, keys_file, until_queued):
    url, router = await _serve(start_router, fake_backend, 1, api_keys_file=str(keys_file))
    keys = ApiKeys(str(keys_file))
    a, b = keys.tenant("sk-a").name, keys.tenant("sk-b").name
    ca, cb = _client(url, "sk-a"), _client(url, "sk-b")
    running = await _hold_one(ca)
    heavy = []
    for i in range(3):
        heavy.append(asyncio.create_task(ca.completions.create(
            model="tiny", prompt="heavy" * 4, max_tokens=100)))
        await until_queued(url, i + 1)
    light = asyncio.create_task(cb.completions.create(model="tiny", prompt="b", max_tokens=4))
    await until_queued(url, 4)
    fake_backend.gate.set()
    [x async for x in running]
    await asyncio.gather(light, *heavy)
    # B queued last yet went in at the first freed slot, ahead of A's earlier requests.
    assert router.queue.admitted[-5:] == [a, b, a, a, a]


async def test_priority_orders_a_key_s_own_requests(start_router, fake_backend, until_queued):
    url, router = await _serve(start_router, fake_backend, 1)
    c = _client(url)
    running = await _hold_one(c)
    tasks = []
    for i, (prompt, priority) in enumerate([("p5", 5), ("p0", 0), ("pm", -3), ("p0b", 0)]):
        tasks.append(asyncio.create_task(c.completions.create(
            model="tiny", prompt=prompt, extra_body={"priority": priority})))
        await until_queued(url, i + 1)
    fake_backend.gate.set()
    [x async for x in running]
    await asyncio.gather(*tasks)
    started = [bytes(r.prompt_ids).decode() for r in fake_backend.requests]
    assert started == ["abc", "pm", "p0", "p0b", "p5"]


@pytest.mark.parametrize("field,value", [
    ("priority", "high"), ("priority", 1.5), ("priority", True), ("priority", 2**31),
    ("cache_salt", ""), ("cache_salt", 7), ("cache_salt", ["a"]), ("cache_salt", "s" * 10_000)])
async def test_priority_is_an_int32_and_cache_salt_a_non_empty_string(start_router, field,
                                                                      value):
    url, _ = await _serve(start_router)
    async with httpx.AsyncClient() as http:
        r = await http.post(url + "/v1/completions",
                            json={"model": "tiny", "prompt": "a", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


async def test_max_concurrency_holds_a_key_s_extra_requests_but_not_other_keys(
        start_router, fake_backend, keys_file, until_queued):
    url, router = await _serve(start_router, fake_backend, 1000, api_keys_file=str(keys_file))
    cc, ca = _client(url, "sk-c"), _client(url, "sk-a")
    running = await _hold_one(cc)
    second = asyncio.create_task(cc.completions.create(model="tiny", prompt="c2"))
    await until_queued(url, 1)
    # Another key's request goes straight past the waiting one: room is not the limit.
    other = await _hold_one(ca, "a1")
    assert [bytes(r.prompt_ids).decode() for r in fake_backend.requests] == ["abc", "a1"]
    fake_backend.gate.set()
    [x async for x in running]
    [x async for x in other]
    assert (await second).choices[0].text == "2c"


def test_keys_file_options_and_their_errors(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-plain\nsk-heavy  weight=2.5 maxConcurrency=3\n# sk-off weight=9\n")
    keys = ApiKeys(str(path))
    assert keys.tenant("sk-plain") == Tenant(keys.tenant("sk-plain").name, 1.0, None)
    heavy = keys.tenant("sk-heavy")
    assert (heavy.weight, heavy.max_concurrency) == (2.5, 3)
    assert keys.tenant("sk-off") is None and keys.tenant("# sk-off") is None
    assert "sk" not in heavy.name and heavy.name != keys.tenant("sk-plain").name
    for line, word in [("sk-x weight=0", "weight"), ("sk-x weight=nan", "weight"),
                       ("sk-x maxConcurrency=0", "maxConcurrency"),
                       ("sk-x maxConcurrency=²", "maxConcurrency"),
                       ("sk-x burst=3", "burst"), ("sk-x weight", "weight")]:
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=word) as info:
            ApiKeys(str(path))
        assert "sk-x" not in str(info.value)


async def test_stored_responses_belong_to_their_key(start_router, keys_file):
    url, _ = await _serve(start_router, api_keys_file=str(keys_file))
    ca, cb = _client(url, "sk-a"), _client(url, "sk-b")
    first = await ca.responses.create(model="tiny", input="olleh")
    assert (await ca.responses.retrieve(first.id)).id == first.id
    # Another key finds it no more than a response never stored: no GET, DELETE or
    # continuation, with the same answers a missing one gets.
    with pytest.raises(openai.NotFoundError):
        await cb.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await cb.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as info:
        await cb.responses.create(model="tiny", input="on", previous_response_id=first.id)
    assert info.value.body["code"] == "previous_response_not_found"
    # Its own key still has it.
    second = await ca.responses.create(model="tiny", input="no", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    await ca.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await ca.responses.retrieve(first.id)


async def test_each_key_and_cache_salt_gets_its_own_prefix_cache_salt(
        start_router, fake_backend, keys_file):
    url, _ = await _serve(start_router, api_keys_file=str(keys_file))
    ca, cb = _client(url, "sk-a"), _client(url, "sk-b")
    await ca.completions.create(model="tiny", prompt="same")
    await ca.completions.create(model="tiny", prompt="same")
    await cb.completions.create(model="tiny", prompt="same")
    await ca.completions.create(model="tiny", prompt="same", extra_body={"cache_salt": "x"})
    await cb.completions.create(model="tiny", prompt="same", extra_body={"cache_salt": "x"})
    a1, a2, b, ax, bx = (r.cache_salt for r in fake_backend.requests)
    assert a1 == a2 and len(a1) == 32
    assert len({a1, b, ax, bx}) == 4  # keys never share, even under one cache_salt


async def test_without_keys_only_cache_salt_splits_the_cache(start_router, fake_backend):
    url, _ = await _serve(start_router)
    c = _client(url)
    await c.completions.create(model="tiny", prompt="same")
    await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    extra_body={"cache_salt": "tenant-7"})
    shared, salted = (r.cache_salt for r in fake_backend.requests)
    assert shared == b"" and salted != b""

