"""Bad and oversized request bodies: a clear 4xx naming what is wrong, and no stall for
anyone else (a concurrent client's latency is measured while maximum-size bodies are
refused)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from baton.workers.metrics import BatonMetrics, MetricLabels
from baton.workers.router.backend import BackendStatus, GenerationRequest, TokenOutput
from baton.workers.router.server import Router, RouterSettings, start_site
from baton.workers.router.tokenization import (
    CheckpointTokenizer,
    PromptTooLong,
    _encode_within,
)

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"
LIMIT = 1 << 20  # 1 MiB bodies in these tests


class ThreeTokens:
    """A backend that answers every request with three tokens."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def check_ready(self) -> None:
        pass

    def status(self) -> BackendStatus:
        return BackendStatus(ready=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        for i in range(3):
            yield TokenOutput(token_id=300 + i, finish_reason="length" if i == 2 else None)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> CheckpointTokenizer:
    return CheckpointTokenizer(TINY)


@pytest.fixture
async def url(tiny_tokenizer):
    settings = RouterSettings(served_model_name="tiny", max_model_len=1024,
                              request_timeout_s=10.0, max_body_bytes=LIMIT)
    metrics = BatonMetrics(MetricLabels(namespace="test", model="tiny", role="router"))
    runner, port = await start_site(Router(ThreeTokens(), tiny_tokenizer, settings,
                                           metrics).app(), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_oversized_bodies_are_413(url):
    async with httpx.AsyncClient(timeout=30) as http:
        big = b'{"model": "tiny", "prompt": "' + b"a" * LIMIT + b'"}'
        r = await http.post(url + "/v1/completions", content=big,
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert str(LIMIT) in r.json()["error"]["message"]

        async def chunked():  # no Content-Length: refused once the limit is passed
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(LIMIT // 65536 + 2):
                yield b"a" * 65536

        r = await http.post(url + "/v1/chat/completions", content=chunked())
        assert r.status_code == 413
        # Just under the limit is read (and refused for its prompt's length instead).
        body = b'{"model": "tiny", "prompt": "' + b"a " * (LIMIT // 2 - 40) + b'"}'
        assert len(body) <= LIMIT
        r = await http.post(url + "/v1/completions", content=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, param", [
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"model": "tiny", "prompt": "x", "temperature": -Infinity}', "temperature"),
    (b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', "temperature"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"5": NaN}}', "logit_bias.5"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
     b'"function", "function": {"name": "f", "parameters": {"type": "object", "properties": '
     b'{"a": {"type": "number", "maximum": NaN}}}}}]}',
     "tools[0].function.parameters.properties.a.maximum"),
])
async def test_non_finite_numbers_are_400_naming_the_field(url, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    async with httpx.AsyncClient() as http:
        r = await http.post(url + path, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # past Python's recursion limit
    b'{"model": "tiny", "prompt": "x", "user": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}",
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": '
    b'{"type": "json_schema", "json_schema": {"name": "n", "schema": '
    + b'{"type": "array", "items": ' * 70 + b"{}" + b"}" * 70 + b"}}}",
])
async def test_deeply_nested_json_is_400(url, body):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    async with httpx.AsyncClient() as http:
        r = await http.post(url + path, content=body)
    assert r.status_code == 400, r.text
    assert "nests deeper" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    (b"\xff\xfe not utf-8", None),
    (b'{"model": "tiny", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1e3}', "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "stop": [null]}', "stop"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"-1": 1}}', "logit_bias"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "assistant", "content": null, "tool_calls": '
     b'[{"type": "function", "function": {"name": 3}}]}]}',
     "messages[0].tool_calls[0].function.name"),
    (b'{"model": "tiny", "messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}',
     "messages[0].tool_call_id"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": '
     b'{"type": "json_schema", "json_schema": {"name": "n", "schema": []}}}',
     "response_format.json_schema.schema"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
     b'"parallel_tool_calls": "yes"}', "parallel_tool_calls"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
     b'"prompt_cache_key": 7}', "prompt_cache_key"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
     b'"chat_template_kwargs": {"tools": []}}', "chat_template_kwargs"),
])
async def test_malformed_values_are_400(url, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    async with httpx.AsyncClient() as http:
        r = await http.post(url + path, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


class CountingTokenizer:
    """The tiny tokenizer, recording how many characters it was asked to tokenize."""

    def __init__(self, inner: CheckpointTokenizer) -> None:
        self.inner = inner
        self.max_token_bytes = inner.max_token_bytes
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append(len(text))
        return self.inner.encode(text, add_special_tokens)


def test_an_overlong_prompt_is_refused_before_it_is_tokenized_in_full(tiny_tokenizer):
    tok = CountingTokenizer(tiny_tokenizer)
    # More bytes than 1024 tokens could ever hold: refused without tokenizing at all.
    with pytest.raises(PromptTooLong):
        _encode_within(tok, "word " * 10_000, 1024, True)
    assert tok.encoded == []
    # Fewer bytes than that, but more tokens: counted chunk by chunk, refused after one.
    text = "".join(f"{i % 97}x " for i in range(3000))
    assert len(text.encode()) < 1024 * tok.max_token_bytes
    with pytest.raises(PromptTooLong) as info:
        _encode_within(tok, text, 1024, True)
    assert info.value.at_least >= 1024
    assert max(tok.encoded) < len(text) // 2
    # A prompt that fits is tokenized exactly as a whole.
    tok.encoded.clear()
    assert _encode_within(tok, "short prompt", 1024, True) == tiny_tokenizer.encode(
        "short prompt")


def _post_raw(url: str, body: bytes) -> int:
    """POST body over a plain socket; the status code. Sending and waiting release the GIL,
    so the flooding client itself takes little from the router's process."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


async def test_maximum_size_bodies_held_in_decoding_stall_no_other_client(tiny_tokenizer):
    """Two maximum-size bodies (a long text prompt, a long token-id prompt) are held in the
    middle of their decoding (the decoder process is stopped): a concurrent client's small
    chat requests are answered meanwhile, then the big ones are refused as usual."""
    import os
    import signal

    settings = RouterSettings(served_model_name="tiny", max_model_len=1024,
                              request_timeout_s=60.0, max_body_bytes=LIMIT)
    metrics = BatonMetrics(MetricLabels(namespace="test", model="tiny", role="router"))
    router = Router(ThreeTokens(), tiny_tokenizer, settings, metrics)
    runner, port = await start_site(router.app(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    text = b'{"model": "tiny", "prompt": "' + b"lorem ipsum " * ((LIMIT - 64) // 12) + b'"}'
    ids = b'{"model": "tiny", "prompt": [' + b"7," * ((LIMIT - 64) // 2 - 1) + b"7]}"
    assert len(text) <= LIMIT and len(ids) <= LIMIT
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}]}
    stopped = None
    try:
        assert await asyncio.to_thread(_post_raw, url, ids) == 400  # starts the decoder
        pool = router.bodies._pool
        (stopped,) = pool._processes
        os.kill(stopped, signal.SIGSTOP)
        big = [asyncio.create_task(asyncio.to_thread(_post_raw, url, b)) for b in (text, ids)]
        deadline = time.monotonic() + 60
        while len(pool._pending_work_items) < 2:  # both bodies read and in the decoder
            assert time.monotonic() < deadline and not any(t.done() for t in big), big
            await asyncio.sleep(0.01)  # a bounded poll for the asserted state
        async with httpx.AsyncClient(timeout=60) as small:
            for _ in range(10):
                r = await small.post(url + "/v1/chat/completions", json=chat)
                assert r.status_code == 200, r.text
        assert not any(t.done() for t in big)
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        assert [await t for t in big] == [400, 400]
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        await runner.cleanup()
