"""A fake backend and tokenizer behind the router's real interfaces, and a live router.

The fake produces a scripted token stream per prompt, so the HTTP layer (validation, error
shapes, SSE framing, stop strings, logprobs, queueing, disconnects) is tested in
milliseconds without workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import pytest

from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.router.backend import (
    BackendStatus,
    GenerationRequest,
    NoCapacity,
    NoReadyWorker,
    TokenOutput,
    WorkerFailure,
)
from baton.workers.router.grammar import GrammarCompiler
from baton.workers.router.server import Router, RouterSettings, start_site

EOS = 256


class ByteTokenizer:
    """Token id = UTF-8 byte; 256 = eos. Multi-byte characters span several tokens."""

    vocab_size = 257
    max_token_bytes = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    def render_chat(self, messages: list[dict], template_kwargs: dict) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        if template_kwargs.get("enable_thinking") is False:
            text += "<nothink>"
        elif template_kwargs.get("enable_thinking") is True:
            text += "<think>\n"  # the output starts inside the reasoning, as Nemotron 3's does
        return text

    def grammar_compiler(self) -> GrammarCompiler:
        return GrammarCompiler(None)


def script(prompt_ids: Sequence[int]) -> list[int]:
    """The fake model's output: the prompt (or the last user message) reversed, then eos."""
    text = bytes(prompt_ids).decode("utf-8", errors="replace")
    if "<assistant>" in text:  # a rendered chat: answer the last user message
        text = text.rsplit("<user>", 1)[-1].split("<assistant>", 1)[0]
    return list(text[::-1].encode("utf-8")) + [EOS]


def fake_logprob(position: int) -> float:
    return -0.25 * (position + 1)


class FakeBackend:
    def __init__(self) -> None:
        self.capacity = 1_000
        self.active = 0
        self.ready = True
        self.tick: Callable[[], None] | None = None  # called before each token (a fake clock)
        self.fail_after: int | None = None  # raise WorkerFailure after this many tokens
        self.gate: asyncio.Event | None = None  # when set, tokens after the first wait for it
        self.hold_first: asyncio.Event | None = None  # the first token waits for it
        self.requests: list[GenerationRequest] = []
        self.closed_early: list[str] = []
        self.cached_tokens = 0  # reported with the first token (a prefix-cache hit)
        self.refuse_at: int | None = None  # this token ends as one the grammar refused

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def check_ready(self) -> None:
        if not self.ready:
            raise NoReadyWorker("decode")

    def status(self) -> BackendStatus:
        return BackendStatus(ready=self.ready, workers={"decode": [], "prefill": []})

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        if self.active >= self.capacity:
            raise NoCapacity()
        self.active += 1
        self.requests.append(request)
        finished = False
        try:
            tokens = script(request.prompt_ids)
            if request.sampling.ignore_eos:
                tokens = (tokens * request.sampling.max_tokens)
            for i, tok in enumerate(tokens):
                if self.fail_after is not None and i >= self.fail_after:
                    raise WorkerFailure("decode worker died and the retry failed too")
                if i > 0 and self.gate is not None:
                    await self.gate.wait()
                if i == 0 and self.hold_first is not None:
                    await self.hold_first.wait()
                if self.tick is not None:
                    self.tick()
                last = i + 1 >= request.sampling.max_tokens
                reason = "stop" if tok == EOS and not request.sampling.ignore_eos else (
                    "length" if last else None)
                if i == self.refuse_at:
                    reason = "grammar_error"
                k = request.sampling.logprobs
                yield TokenOutput(
                    token_id=tok,
                    logprob=fake_logprob(i) if k is not None else None,
                    top_logprobs=tuple((t, fake_logprob(i) - j) for j, t in
                                       enumerate([tok, 65, 66, 67][: k or 0])),
                    finish_reason=reason,
                    cached_tokens=self.cached_tokens if i == 0 else None,
                )
                if reason is not None:
                    finished = True
                    return
        finally:
            self.active -= 1
            if not finished:
                self.closed_early.append(request.request_id)


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def start_router(fake_backend):
    """Starts routers over fake_backend with the given settings; returns each one's URL.
    `start_router.runners`: their aiohttp runners, in order (a test that looks at a
    connection's transport); `start_router.routers`: the Router objects, in order."""
    runners, routers = [], []

    async def start(settings: RouterSettings) -> str:
        metrics = BatonMetrics(MetricLabels(namespace="test", model="tiny", role="router"))
        router = Router(fake_backend, ByteTokenizer(), settings, metrics)
        runner, port = await start_site(router.app(), "127.0.0.1", 0)
        runners.append(runner)
        routers.append(router)
        return f"http://127.0.0.1:{port}"

    start.runners = runners
    start.routers = routers
    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def router_url(start_router, request):
    settings = getattr(request, "param", None) or RouterSettings(
        served_model_name="tiny", max_model_len=128, request_timeout_s=60.0,
        max_queued_requests=1)
    return await start_router(settings)


@pytest.fixture
def until_queued(until):
    """until_queued(url, n): waits until the router at url holds n requests in its admission
    queue (its baton_requests_waiting gauge); asserts it within a deadline that bounds a
    hang."""

    async def wait(url: str, n: int) -> None:
        async with httpx.AsyncClient() as http:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                text = (await http.get(url + "/metrics")).text
                line = next(x for x in text.splitlines()
                            if x.startswith("baton_requests_waiting{"))
                if float(line.rsplit(" ", 1)[1]) == n:
                    return
                assert asyncio.get_running_loop().time() < deadline, f"not {n} queued: {line}"
                await asyncio.sleep(0.01)  # a bounded poll for the asserted state

    return wait
