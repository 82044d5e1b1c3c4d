"""The disaggregated backend's request flow against in-process fake gRPC workers.

The fakes speak the real protos (DecodeService, PrefillService, WorkerService, grpc.health.v1)
but replace the model with a deterministic next-token rule, so retries, worker choice,
queueing, draining and cancellation are tested in well under a second each. Real worker
processes with the real model are the e2e tests' job (tests/e2e).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import openai
import pytest

from baton.proto.baton.decode.v1 import decode_pb2, decode_pb2_grpc
from baton.proto.baton.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from baton.proto.baton.worker.v1 import worker_pb2, worker_pb2_grpc
from baton.proto.grpc.health.v1 import health_pb2, health_pb2_grpc
from baton.workers import headers
from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.router.admission import ANONYMOUS
from baton.workers.router.auth import cache_salt
from baton.workers.router.balancer import Balancer
from baton.workers.router.disaggregated import DisaggregatedBackend
from baton.workers.router.discovery import (
    DnsResolver,
    StaticResolver,
    WorkerPool,
    resolver_for,
)
from baton.workers.router.server import Router, RouterSettings, start_site

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def next_token(ids: Sequence[int]) -> int:
    """The fake model: a letter that depends on the whole sequence so far."""
    return 97 + (sum(i * (k + 1) for k, i in enumerate(ids)) % 26)


def reference(prompt: Sequence[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class Tokenizer:
    vocab_size = 256
    max_token_bytes = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")

    def render_chat(self, messages, kwargs) -> str:
        return "".join(m["content"] for m in messages)


class World:
    """Reservations shared by the fake workers: (decode address, reservation id) -> the first
    token, set by the prefill (or at once for a local prefill)."""

    def __init__(self) -> None:
        self.reservations: dict[tuple[str, str], asyncio.Future] = {}


class FakeWorker(health_pb2_grpc.HealthServicer, worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, world: World, role: str) -> None:
        self.world = world
        self.role = role
        self.address = ""
        self.serving = True
        self.draining = False
        self.requests: list = []
        self.metadata: list[dict] = []
        self.fail_with: grpc.StatusCode | None = None  # fail every call this way
        self.server: grpc.aio.Server | None = None
        # Cleared: the worker hangs (a stuck GPU, a stopped process): it answers nothing.
        self.hung = asyncio.Event()
        self.hung.set()

    async def Check(self, request, context):
        await self.hung.wait()
        return health_pb2.HealthCheckResponse(status=SERVING if self.serving else NOT_SERVING)

    async def Load(self, request, context):
        await self.hung.wait()
        return worker_pb2.LoadResponse(role=worker_pb2.ROLE_DECODE if self.role == "decode"
                                       else worker_pb2.ROLE_PREFILL, draining=self.draining,
                                       **self.load())

    def load(self) -> dict:
        return {}

    async def start(self, servicer_adder) -> None:
        self.server = grpc.aio.server()
        servicer_adder(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self, self.server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()


class FakeDecode(FakeWorker, decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, world: World, capacity: int = 8) -> None:
        super().__init__(world, "decode")
        self.capacity = capacity
        self.used = 0
        self.die_after: int | None = None  # tokens streamed before the worker "dies"
        self.hang_after: int | None = None  # tokens streamed before the worker hangs
        self.hang_reserve = False  # Reserve never answers (a stuck worker)
        self.gate: asyncio.Event | None = None  # when set, tokens after the first wait for it
        self.streamed = 0
        self.free_kv_tokens = 100_000
        self.cached_tokens = 0  # what its prefix cache holds of every prompt
        self.remembers = False  # a prefix cache: it holds what it served (but the last token)
        self.served: list[list[int]] = []
        self.local_prefill = False  # prefill every request itself
        self.held: dict[str, decode_pb2.ReserveRequest] = {}
        self.released: list[str] = []
        self.generates: list = []

    def load(self) -> dict:
        return {"running": self.used, "free_slots": max(0, self.capacity - self.used),
                "free_kv_tokens": self.free_kv_tokens}

    async def Reserve(self, request, context):
        if self.hang_reserve:
            self.hung.clear()
        await self.hung.wait()
        if self.used >= self.capacity:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot")
        self.used += 1
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        rid = f"{self.address}/{len(self.requests)}"
        self.held[rid] = request
        first = self.world.reservations[(self.address, rid)] = (
            asyncio.get_running_loop().create_future())
        cached = self._cached(list(request.prompt_token_ids))
        local = self.local_prefill or cached == len(request.prompt_token_ids)
        if local:
            first.set_result(next_token(request.prompt_token_ids))
        return decode_pb2.ReserveResponse(reservation_id=rid, cached_tokens=cached,
                                          local_prefill=local)

    async def Release(self, request, context):
        released = self._free(request.reservation_id)
        self.released.append(request.reservation_id)
        return decode_pb2.ReleaseResponse(released=released)

    def _cached(self, prompt: list[int]) -> int:
        if not self.remembers:
            return min(self.cached_tokens, len(prompt))
        best = 0
        for seen in self.served:
            n = 0
            while n < min(len(seen), len(prompt)) and seen[n] == prompt[n]:
                n += 1
            best = max(best, n)
        return best

    def _free(self, rid: str) -> bool:
        if self.held.pop(rid, None) is None:
            return False
        self.used -= 1
        self.world.reservations.pop((self.address, rid), None)
        return True

    async def Generate(self, request, context):
        self.generates.append(request)
        held = self.held.get(request.reservation_id)
        if held is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such reservation")
        try:
            token = await asyncio.wait_for(
                self.world.reservations[(self.address, request.reservation_id)], 5)
            ids = list(held.prompt_token_ids)
            for n in range(held.sampling.max_tokens):
                if self.die_after is not None and self.streamed >= self.die_after:
                    self.serving = False
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")
                if self.hang_after is not None and self.streamed >= self.hang_after:
                    self.hung.clear()
                await self.hung.wait()
                if n:
                    token = next_token(ids)
                    if self.gate is not None:
                        await self.gate.wait()
                ids.append(token)
                self.streamed += 1
                last = n + 1 == held.sampling.max_tokens
                if last:
                    self.served.append(ids[:-1])
                yield decode_pb2.GenerateResponse(
                    tokens=[worker_pb2.GeneratedToken(token_id=token, logprob=-0.5)],
                    finish_reason=decode_pb2.FINISH_REASON_LENGTH if last else 0,
                    num_cached_tokens=self._cached(list(held.prompt_token_ids))
                    if n == 0 else 0)
        finally:
            self._free(request.reservation_id)


class FakePrefill(FakeWorker, prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, world: World) -> None:
        super().__init__(world, "prefill")
        self.cancelled = 0
        self.hold: asyncio.Event | None = None  # when set, Prefill waits for it first
        # Decode addresses whose transfers fail as a dead decode worker's do.
        self.transfer_fails_to: set[str] = set()

    async def Prefill(self, request, context):
        self.requests.append(request)
        try:
            if self.hold is not None:
                await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_with is not None:
            await context.abort(self.fail_with, "injected failure")
        if request.decode_target in self.transfer_fails_to:
            # What a real prefill worker answers when its decode target died mid-transfer.
            context.set_trailing_metadata(((headers.FAILED_PEER, "decode"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"request {request.request_id} to {request.decode_target}: "
                                "Stream removed (recvmsg:Connection reset by peer (104))")
        future = self.world.reservations.get((request.decode_target, request.reservation_id))
        if future is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no reservation")
        token = next_token(request.prompt_token_ids)
        future.set_result(token)
        return prefill_pb2.PrefillResponse(first_token=worker_pb2.GeneratedToken(
            token_id=token), num_prompt_tokens=len(request.prompt_token_ids))


@pytest.fixture
async def cluster():
    world = World()
    decodes = [FakeDecode(world), FakeDecode(world)]
    prefills = [FakePrefill(world), FakePrefill(world)]
    for d in decodes:
        await d.start(decode_pb2_grpc.add_DecodeServiceServicer_to_server)
    for p in prefills:
        await p.start(prefill_pb2_grpc.add_PrefillServiceServicer_to_server)
    routers = []

    async def router(routing: str = "least-loaded", max_queued: int = 4, n_decode: int = 2,
                     n_prefill: int = 2, check_timeout_s: float = 1.0,
                     reserve_timeout_s: float = 2.0):
        backend = DisaggregatedBackend(
            WorkerPool("prefill", StaticResolver(tuple(p.address for p in prefills[:n_prefill])),
                       interval_s=0.05, check_timeout_s=check_timeout_s),
            WorkerPool("decode", StaticResolver(tuple(d.address for d in decodes[:n_decode])),
                       interval_s=0.05, check_timeout_s=check_timeout_s),
            Balancer(routing), transfer_timeout_s=30.0, reserve_timeout_s=reserve_timeout_s)
        # The deadline only bounds a hang: the tests that are about leaving a hung worker
        # succeed only if it was left by its failed health checks, long before this.
        settings = RouterSettings(served_model_name="tiny", max_model_len=512,
                                  request_timeout_s=60.0, max_queued_requests=max_queued)
        metrics = BatonMetrics(MetricLabels(namespace="t", model="tiny", role="router"))
        r = Router(backend, Tokenizer(), settings, metrics)
        runner, port = await start_site(r.app(), "127.0.0.1", 0)
        routers.append(runner)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                    max_retries=0)
        return client, backend

    yield decodes, prefills, router
    for w in decodes + prefills:
        w.hung.set()  # let hung handlers end, so the servers stop at once
        for held in (getattr(w, "gate", None), getattr(w, "hold", None)):
            if held is not None:
                held.set()
    for runner in routers:
        await runner.cleanup()
    for w in decodes + prefills:
        await w.server.stop(0)


async def stream_ids(client, prompt: str, max_tokens: int, **kw) -> str:
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                             stream=True, **kw)
    return "".join([c.choices[0].text async for c in stream])


def ref_text(prompt: str, n: int) -> str:
    return bytes(reference(list(prompt.encode()), n)).decode()


async def test_tokens_flow_prefill_to_decode(cluster):
    decodes, prefills, router = cluster
    client, backend = await router()
    out = await client.completions.create(model="tiny", prompt="hello", max_tokens=6,
                                          extra_headers={"x-request-id": "r-1"})
    assert out.choices[0].text == ref_text("hello", 6)
    assert out.choices[0].finish_reason == "length"
    served = [d for d in decodes if d.requests]
    assert len(served) == 1 and served[0].metadata[0]["x-request-id"] == "r-1"
    prefill_req = next(p for p in prefills if p.requests).requests[0]
    assert prefill_req.decode_target == served[0].address
    assert prefill_req.request_id == "r-1" and prefill_req.sampling.max_tokens == 6
    assert list(prefill_req.prompt_token_ids) == list(b"hello")
    assert backend.retries == 0


async def test_concurrent_requests_spread_over_decode_workers(cluster, until):
    decodes, prefills, router = cluster
    client, _ = await router()
    gate = asyncio.Event()  # every request is in flight before any finishes
    for d in decodes:
        d.gate = gate
    prompts = [f"prompt {i} " * (i + 1) for i in range(8)]
    streams = asyncio.gather(*(stream_ids(client, p, 8) for p in prompts))
    assert await until(lambda: sum(len(d.requests) for d in decodes) == 8)
    gate.set()
    texts = await streams
    assert texts == [ref_text(p, 8) for p in prompts]
    assert all(len(d.requests) >= 2 for d in decodes)  # least-loaded spreads the load
    assert await until(lambda: all(d.used == 0 for d in decodes))


async def test_decode_death_mid_stream_continues_on_the_other_worker(cluster, until):
    decodes, prefills, router = cluster
    client, backend = await router()
    decodes[0].die_after = 3
    decodes[1].capacity = 0  # the first attempt must land on decodes[0]; the retry waits
    task = asyncio.create_task(stream_ids(client, "abcdef", 10, seed=5))
    assert await until(lambda: backend.retries)
    decodes[1].capacity = 8
    text = await task
    assert text == ref_text("abcdef", 10)  # no duplicated token, no gap
    assert backend.retries == 1
    retry = decodes[1].requests[0]
    emitted = list(text[:3].encode())
    assert list(retry.prompt_token_ids) == list(b"abcdef") + emitted
    assert retry.sampling.max_tokens == 7 and retry.sampling.seed == 5
    # The emitted tokens count as output on the retry (penalties, min_tokens, grammar).
    assert retry.num_output_tokens == 3
    assert retry.request_id.endswith(".retry1")
    assert await until(lambda: all(d.used == 0 for d in decodes))


async def test_steps_name_the_reservation_and_what_the_decode_worker_holds(cluster, until):
    """Reserve -> Prefill(reservation, D's cached tokens) beside Generate(reservation); the
    usage reports the cached tokens D's first message carries."""
    decodes, prefills, router = cluster
    client, backend = await router(n_decode=1, n_prefill=1)
    decodes[0].cached_tokens = 3
    out = await client.completions.create(model="tiny", prompt="steps!", max_tokens=4,
                                          extra_body={"cache_salt": "s1"})
    assert out.choices[0].text == ref_text("steps!", 4)
    assert out.usage.prompt_tokens_details.cached_tokens == 3
    (reserve,) = decodes[0].requests
    (generate,) = decodes[0].generates
    (prefill,) = prefills[0].requests
    assert generate.reservation_id == prefill.reservation_id != ""
    assert prefill.decode_cached_tokens == 3 and reserve.local_prefill_max_tokens == 512
    assert list(reserve.prompt_token_ids) == list(prefill.prompt_token_ids) == list(b"steps!")
    # Both workers' prefix caches are asked under the request's salt.
    assert reserve.cache_salt == prefill.cache_salt == cache_salt(ANONYMOUS, "s1") != b""
    assert await until(lambda: decodes[0].used == 0)


async def test_a_local_prefill_needs_no_prefill_worker(cluster, until):
    decodes, prefills, router = cluster
    client, backend = await router(n_decode=1, n_prefill=1)
    decodes[0].cached_tokens, decodes[0].local_prefill = 4, True
    stream = await client.completions.create(model="tiny", prompt="local", max_tokens=5,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref_text("local", 5)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4
    assert not prefills[0].requests and backend.local_prefills == 1
    assert await until(lambda: decodes[0].used == 0)


async def test_giving_up_between_reserve_and_generate_releases_the_reservation(cluster, until):
    """The decode worker reserved, but no prefill worker is ready: the router releases the
    reservation (no Generate will come) and answers 503."""
    decodes, prefills, router = cluster
    client, backend = await router(n_decode=1, n_prefill=1)
    prefills[0].serving = False
    await backend.prefill.wait_refreshed()
    backend.check_ready = lambda: None  # let the request reach the backend anyway
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model="tiny", prompt="nobody", max_tokens=2)
    assert info.value.status_code == 503 and "prefill" in info.value.message
    assert await until(lambda: decodes[0].released and decodes[0].used == 0)
    assert not decodes[0].generates


async def test_a_decode_worker_hung_in_reserve_is_left_for_another(cluster):
    decodes, prefills, router = cluster
    # The Reserve timeout is past the request's deadline: only the failed health checks
    # can let the request go elsewhere in time.
    client, backend = await router(check_timeout_s=0.1, reserve_timeout_s=3600.0)
    first = min(decodes, key=lambda d: d.address)  # idle workers tie: the lower address
    first.hang_reserve = True
    out = await client.completions.create(model="tiny", prompt="stuck", max_tokens=3)
    assert out.choices[0].text == ref_text("stuck", 3)
    second = next(d for d in decodes if d is not first)
    assert len(second.generates) == 1 and not first.generates


async def test_prefix_aware_sends_the_next_turn_to_the_worker_holding_the_history(cluster, until):
    decodes, prefills, router = cluster
    client, backend = await router(routing="prefix-aware")
    for d in decodes:
        d.remembers = True
    history = "you are a helpful agent. " * 3
    for turn in range(4):
        out = await client.completions.create(model="tiny", prompt=history, max_tokens=4)
        history += out.choices[0].text + f" tool result {turn}."
        if turn == 0:
            (holder,) = [d for d in decodes if d.generates]
            other = next(d for d in decodes if d is not holder)
        else:
            # Back to the worker that holds the history, which reported the cache hit.
            assert len(holder.generates) == turn + 1 and not other.generates
            assert out.usage.prompt_tokens_details.cached_tokens > len(history) // 2
    # A session's cache key keeps a prompt that shares nothing on the same worker; an
    # unknown session goes where its key hashes (and stays there).
    import time

    from baton.workers.router.backend import GenerationRequest
    from baton.workers.sampling_params import SamplingParams

    async def one(prompt: bytes, key: str) -> None:
        async for _ in backend.generate(GenerationRequest(
                request_id=f"{key}-{len(prompt)}", prompt_ids=tuple(prompt),
                sampling=SamplingParams(max_tokens=2), deadline=time.time() + 10,
                cache_key=key)):
            pass

    for key in ("s-1", "s-2", "s-3"):
        before = {d.address: len(d.generates) for d in decodes}
        await one(b"first " + key.encode(), key)
        (first,) = [d for d in decodes if len(d.generates) > before[d.address]]
        await one(b"unrelated prompt for " + key.encode(), key)
        assert len(first.generates) == before[first.address] + 2, key
    assert await until(lambda: all(d.used == 0 for d in decodes))


async def test_second_failure_is_an_sse_error(cluster):
    decodes, prefills, router = cluster
    client, backend = await router()
    for d in decodes:
        d.die_after = 2
    stream = await client.completions.create(model="tiny", prompt="xyz", max_tokens=10,
                                             stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="worker died"):
        async for c in stream:
            texts.append(c.choices[0].text)
    assert "".join(texts) == ref_text("xyz", 4)  # 2 tokens from each worker, then the error
    assert backend.retries == 1


async def test_prefill_failure_releases_decode_and_retries(cluster, until):
    decodes, prefills, router = cluster
    client, backend = await router()
    # Idle workers tie on load and the lower address goes first: make that one fail.
    failing, healthy = sorted(prefills, key=lambda p: p.address)
    failing.fail_with = grpc.StatusCode.DATA_LOSS
    for i in range(3):
        out = await client.completions.create(model="tiny", prompt=f"q{i}", max_tokens=3)
        assert out.choices[0].text == ref_text(f"q{i}", 3)
    assert len(failing.requests) == 3 and len(healthy.requests) == 3
    assert backend.retries == 3
    # Each failed attempt's decode reservation was released (its Generate call cancelled).
    assert await until(lambda: all(d.used == 0 for d in decodes))


async def test_a_failed_transfer_blames_the_decode_worker_not_the_prefill_worker(cluster, until):
    """The only prefill worker reports that its transfer to a decode worker failed (that
    worker died): the retry goes to the other decode worker through the same prefill worker,
    which stays ready, instead of failing the request for want of a prefill worker."""
    decodes, prefills, router = cluster
    client, backend = await router(n_prefill=1)
    prefill = prefills[0]
    first = min(decodes, key=lambda d: d.address)  # idle workers tie: the lower address
    prefill.transfer_fails_to = {first.address}
    for i in range(3):
        out = await client.completions.create(model="tiny", prompt=f"t{i}", max_tokens=3)
        assert out.choices[0].text == ref_text(f"t{i}", 3)
        assert [w.address for w in backend.prefill.ready_workers()] == [prefill.address]
    assert backend.retries >= 1
    assert await until(lambda: all(d.used == 0 for d in decodes))


async def test_a_hung_decode_worker_mid_stream_is_left_for_another(cluster):
    """A decode worker that hangs mid-stream (alive to TCP, answering nothing, health checks
    included) does not hold the request until its deadline: after a few failed health checks
    the stream continues on the other decode worker, every token once, equal to the
    reference."""
    decodes, prefills, router = cluster
    client, backend = await router(check_timeout_s=0.1)
    first = min(decodes, key=lambda d: d.address)  # idle workers tie: the lower address
    first.hang_after = 4
    text = await stream_ids(client, "hang", 12)  # a stream left waiting would hit its deadline
    assert text == ref_text("hang", 12)
    assert backend.retries == 1
    second = next(d for d in decodes if d is not first)
    assert second.requests and second.requests[0].request_id.endswith(".retry1")


async def test_invalid_argument_is_not_retried(cluster):
    decodes, prefills, router = cluster
    client, backend = await router()
    for p in prefills:
        p.fail_with = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model="tiny", prompt="abc", max_tokens=3)
    assert info.value.status_code == 502 and "INVALID_ARGUMENT" in info.value.message
    assert backend.retries == 0


async def test_full_decode_workers_queue_then_429(cluster, until, until_queued):
    decodes, prefills, router = cluster
    client, _ = await router(max_queued=1, n_decode=1)
    decodes[0].capacity = 1
    decodes[0].gate = asyncio.Event()  # the first request holds the only slot until set
    first = asyncio.create_task(client.completions.create(model="tiny", prompt="a",
                                                          max_tokens=6))
    assert await until(lambda: decodes[0].streamed == 1)
    queued = asyncio.create_task(client.completions.create(model="tiny", prompt="b",
                                                           max_tokens=2))
    await until_queued(str(client.base_url).removesuffix("/v1/"), 1)
    with pytest.raises(openai.RateLimitError) as info:
        await client.completions.create(model="tiny", prompt="c", max_tokens=2)
    assert info.value.response.headers["retry-after"] == "1"
    decodes[0].gate.set()
    assert (await first).choices[0].text == ref_text("a", 6)
    assert (await queued).choices[0].text == ref_text("b", 2)


async def test_draining_and_unhealthy_workers_get_no_new_work(cluster):
    decodes, prefills, router = cluster
    client, backend = await router()
    decodes[0].draining = True
    prefills[1].serving = False
    await backend.decode.wait_refreshed()
    await backend.prefill.wait_refreshed()
    for i in range(4):
        await client.completions.create(model="tiny", prompt=f"p{i}", max_tokens=2)
    assert not decodes[0].requests and len(decodes[1].requests) == 4
    assert not prefills[1].requests and len(prefills[0].requests) == 4
    decodes[1].serving = False
    await backend.decode.wait_refreshed()
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert info.value.status_code == 503 and "decode" in info.value.message


async def test_client_disconnect_cancels_both_workers(cluster, until):
    decodes, prefills, router = cluster
    client, backend = await router(n_decode=1, n_prefill=1)
    prefills[0].hold = asyncio.Event()  # the client leaves while the prompt is prefilled
    task = asyncio.create_task(client.completions.create(model="tiny", prompt="bye",
                                                         max_tokens=4))
    assert await until(lambda: prefills[0].requests)
    assert decodes[0].used == 1
    task.cancel()
    assert await until(lambda: decodes[0].used == 0 and prefills[0].cancelled == 1)


async def test_round_robin_alternates(cluster):
    decodes, prefills, router = cluster
    client, _ = await router(routing="round-robin")
    for i in range(4):
        await client.completions.create(model="tiny", prompt=f"r{i}", max_tokens=1)
    assert [len(d.requests) for d in decodes] == [2, 2]
    assert [len(p.requests) for p in prefills] == [2, 2]


async def test_resolvers():
    assert resolver_for("10.0.0.1:5,10.0.0.2:6") == StaticResolver(("10.0.0.1:5", "10.0.0.2:6"))
    assert resolver_for("10.0.0.1:5") == StaticResolver(("10.0.0.1:5",))
    assert resolver_for("baton-decode.llm.svc:50051") == DnsResolver("baton-decode.llm.svc",
                                                                      50051)
    assert await DnsResolver("localhost", 7).resolve() == ["127.0.0.1:7"]
    assert await DnsResolver("no-such-host.invalid", 7).resolve() == []
    for bad in ("", "host", "host:0", "host:99999", ":80"):
        with pytest.raises(ValueError, match="host:port|no address"):
            resolver_for(bad)


class MutableResolver:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self) -> list[str]:
        return list(self.addresses)


async def test_pool_follows_the_resolver(cluster):
    decodes, _, _ = cluster
    resolver = MutableResolver([decodes[0].address])
    pool = WorkerPool("decode", resolver, interval_s=0.05)
    await pool.start()
    try:
        assert [w.address for w in pool.ready_workers()] == [decodes[0].address]
        assert pool.workers[decodes[0].address].load.free_slots == 8
        resolver.addresses = [decodes[0].address, decodes[1].address]  # scaled up
        await pool.wait_refreshed()
        assert {w.address for w in pool.ready_workers()} == {d.address for d in decodes}
        # Scaled down while this router still has a request on the worker: it gets no new
        # work, and is forgotten once its requests are done.
        pool.workers[decodes[0].address].inflight = 1
        resolver.addresses = [decodes[1].address]
        await pool.wait_refreshed()
        assert decodes[0].address in pool.workers
        assert [w.address for w in pool.ready_workers()] == [decodes[1].address]
        pool.workers[decodes[0].address].inflight = 0
        await pool.wait_refreshed()
        assert list(pool.workers) == [decodes[1].address]
        # A worker that stops answering is not ready; it is again once it answers.
        await decodes[1].server.stop(0)
        await pool.wait_refreshed()
        assert pool.ready_workers() == []
    finally:
        await pool.close()


async def test_a_slow_health_check_keeps_the_worker_until_several_in_a_row(cluster, caplog):
    """A busy host can miss one health-check deadline: the worker keeps its work (logged at
    INFO) until SLOW_CHECKS_BEFORE_UNREADY in a row; one that refuses connections is out at
    the first check."""
    import logging

    from baton.workers.router.discovery import SLOW_CHECKS_BEFORE_UNREADY

    decodes, _, _ = cluster
    pool = WorkerPool("decode", MutableResolver([decodes[0].address, decodes[1].address]),
                      interval_s=3600, check_timeout_s=2.0)  # refreshed by hand below
    await pool.refresh()
    try:
        slow, gone = (pool.workers[d.address] for d in decodes)
        assert slow.ready and gone.ready
        decodes[0].hung.clear()  # answers nothing: every check misses its deadline
        await decodes[1].server.stop(0)  # refuses connections
        with caplog.at_level(logging.INFO, logger="baton.router.discovery"):
            await pool.refresh()
            assert slow.ready and slow.failures == 1
            assert not gone.ready
            for _ in range(SLOW_CHECKS_BEFORE_UNREADY - 2):
                await pool.refresh()
            assert slow.ready
            await pool.refresh()
            assert not slow.ready and slow.failures == SLOW_CHECKS_BEFORE_UNREADY
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [f"decode worker {decodes[1].address} failed its health check: "
                            "UNAVAILABLE",
                            f"decode worker {decodes[0].address} failed its health check: "
                            "DEADLINE_EXCEEDED"], warnings
        decodes[0].hung.set()  # answers again: back in at the next check
        await pool.refresh()
        assert slow.ready and slow.failures == 0
    finally:
        decodes[0].hung.set()
        await pool.close()


async def test_decode_choice_skips_workers_reported_too_full(cluster):
    decodes, prefills, router = cluster
    client, backend = await router()
    decodes[0].free_kv_tokens = 10  # the idler worker reports too little KV room
    decodes[1].used, decodes[1].capacity = 3, 11  # busier, but with room
    await backend.decode.wait_refreshed()
    out = await client.completions.create(model="tiny", prompt="x" * 40, max_tokens=2)
    assert out.choices[0].text == ref_text("x" * 40, 2)
    assert not decodes[0].requests and len(decodes[1].requests) == 1
    # A short prompt fits the idler worker again.
    await client.completions.create(model="tiny", prompt="y", max_tokens=2)
    assert len(decodes[0].requests) == 1


async def test_local_prefill_stretches_where_the_prefill_workers_lag(cluster, until):
    """D may prefill more than localPrefillMaxTokens itself where the prefill workers' best
    hit is so far behind that P would compute over RECOMPUTE_BOUND times what D lacks (earlier
    turns prefilled on D never reached P), up to LOCAL_PREFILL_STRETCH times the limit."""
    from baton.workers.router.disaggregated import LOCAL_PREFILL_STRETCH, RECOMPUTE_BOUND

    decodes, prefills, router = cluster
    client, backend = await router(routing="prefix-aware", n_prefill=2)
    assert await until(lambda: len(backend.prefill.ready_workers()) == 2)
    p1, p2 = (w.address for w in backend.prefill.ready_workers())
    index = backend.balancer.indexes["prefill"]
    prompt = [(7 * i) % 251 + 3 for i in range(3000)]
    limit = backend.local_prefill_max_tokens
    assert limit == 512
    # Nothing known on any P: it would compute all 3000 tokens.
    assert backend.local_prefill_limit(prompt) == int(3000 / RECOMPUTE_BOUND)
    index.record(p1, prompt, [1000])
    assert backend.local_prefill_limit(prompt) == int(2000 / RECOMPUTE_BOUND)
    index.record(p2, prompt, [2900])  # the best P is close behind: the plain limit
    assert backend.local_prefill_limit(prompt) == limit
    assert backend.local_prefill_limit(prompt, avoid={p2}) == int(2000 / RECOMPUTE_BOUND)
    long = [(5 * i) % 241 + 3 for i in range(20000)]
    assert backend.local_prefill_limit(long) == LOCAL_PREFILL_STRETCH * limit
    backend.local_prefill_max_tokens = 0  # off stays off
    assert backend.local_prefill_limit(prompt) == 0
    # What D is sent: the limit for this prompt, stretched (no P holds any of it).
    backend.local_prefill_max_tokens = 100
    out = await client.completions.create(model="tiny", prompt="stretch " * 40, max_tokens=2)
    assert out.choices[0].text
    (reserve,) = [r for d in decodes for r in d.requests]
    n = len(reserve.prompt_token_ids)
    assert n == 320 and reserve.local_prefill_max_tokens == int(n / RECOMPUTE_BOUND) > 100


async def test_least_loaded_keeps_the_plain_local_prefill_limit(cluster):
    _, _, router = cluster
    _, backend = await router(routing="least-loaded")
    assert backend.local_prefill_limit(list(range(3, 3003))) == 512
