"""The router's OpenAI API against a fake backend, through the official openai client."""

from __future__ import annotations

import asyncio
import os

import httpx
import openai
import pytest

from baton.workers.router.server import RouterSettings


def client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def reverse(text: str) -> str:
    return text[::-1]


async def test_models_lists_the_served_model(router_url):
    models = await client(router_url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert (await client(router_url).models.retrieve("tiny")).id == "tiny"
    with pytest.raises(openai.NotFoundError):
        await client(router_url).models.retrieve("other")


async def test_completion_not_streamed(router_url):
    out = await client(router_url).completions.create(model="tiny", prompt="héllo wörld",
                                                      max_tokens=50)
    choice = out.choices[0]
    assert choice.text == reverse("héllo wörld")
    assert choice.finish_reason == "stop"
    n_prompt = len("héllo wörld".encode())
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == n_prompt + 1  # every byte, then eos
    assert out.usage.total_tokens == 2 * n_prompt + 1
    assert out.object == "text_completion"


async def test_usage_reports_cached_prompt_tokens(router_url, fake_backend):
    fake_backend.cached_tokens = 3
    out = await client(router_url).completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert out.usage.prompt_tokens_details.cached_tokens == 3
    chat = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hey"}], max_tokens=4)
    assert chat.usage.prompt_tokens_details.cached_tokens == 3
    stream = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hey"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [3]
    fake_backend.cached_tokens = 0
    out = await client(router_url).completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert out.usage.prompt_tokens_details.cached_tokens == 0


async def test_completion_default_max_tokens_and_length(router_url):
    out = await client(router_url).completions.create(model="tiny", prompt="x" * 40)
    assert out.usage.completion_tokens == 16  # OpenAI's default for completions
    assert out.choices[0].finish_reason == "length"
    out = await client(router_url).completions.create(model="tiny", prompt="abcdef",
                                                      max_tokens=2)
    assert (out.choices[0].text, out.choices[0].finish_reason) == ("fe", "length")


async def test_completion_streamed_with_usage(router_url):
    stream = await client(router_url).completions.create(
        model="tiny", prompt="naïve café", max_tokens=50, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reverse("naïve café")
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 13
    assert all(c.usage is None for c in chunks[:-1])


async def test_stop_strings_cut_text_and_cancel_the_stream(router_url, fake_backend, until):
    out = await client(router_url).completions.create(
        model="tiny", prompt="hello world", max_tokens=50, stop=["zz", "ow"])
    # "dlrow olleh": the text ends right before the first stop string.
    assert (out.choices[0].text, out.choices[0].finish_reason) == ("dlr", "stop")
    assert out.usage.completion_tokens == 5  # d l r o w: the token completing "ow" counts
    stream = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello world"}], stream=True,
        stop="ll")
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "dlrow o"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The backend stream is closed as the handler ends, a moment after the client's [DONE].
    assert await until(lambda: len(fake_backend.closed_early) == 2)


async def test_chat_not_streamed_and_template_kwargs(router_url, fake_backend):
    out = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "abc"}],
        max_completion_tokens=10)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "cba"
    assert out.choices[0].finish_reason == "stop"
    assert out.object == "chat.completion"
    prompt = bytes(fake_backend.requests[-1].prompt_ids).decode()
    assert prompt == "<system>be brief<user>abc<assistant>"
    await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "q"}]}],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    prompt = bytes(fake_backend.requests[-1].prompt_ids).decode()
    assert prompt == "<user>q<assistant><nothink>"


async def test_chat_streamed(router_url):
    stream = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream me ✓"}], stream=True,
        stream_options={"include_usage": True}, seed=7, temperature=0.5, top_p=0.9)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reverse("stream me ✓")
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.prompt_tokens == len("<user>stream me ✓<assistant>".encode())
    assert all(c.object == "chat.completion.chunk" for c in chunks)


async def test_sampling_options_reach_the_backend(router_url, fake_backend):
    await client(router_url).completions.create(
        model="tiny", prompt="abc", max_tokens=3, temperature=0.7, top_p=0.5, seed=42,
        extra_body={"top_k": 5, "stop_token_ids": [7], "ignore_eos": True})
    s = fake_backend.requests[-1].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.top_k) == (3, 0.7, 0.5, 42, 5)
    assert s.stop_token_ids == [7] and s.ignore_eos and s.logprobs is None


async def test_completion_logprobs(router_url):
    out = await client(router_url).completions.create(model="tiny", prompt="ab", logprobs=2,
                                                      max_tokens=10)
    lp = out.choices[0].logprobs
    assert lp.tokens == ["b", "a", ""]
    assert lp.token_logprobs == [-0.25, -0.5, -0.75]
    assert lp.top_logprobs[0] == {"b": -0.25, "A": -1.25}
    assert lp.text_offset == [0, 1, 2]
    out = await client(router_url).completions.create(
        model="tiny", prompt="ab", logprobs=1, max_tokens=10,
        extra_body={"return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    assert lp.tokens == ["token_id:98", "token_id:97", "token_id:256"]
    assert lp.top_logprobs[1] == {"token_id:97": -0.5}
    stream = await client(router_url).completions.create(model="tiny", prompt="ab",
                                                         logprobs=0, stream=True)
    got = [c.choices[0].logprobs.token_logprobs[0] async for c in stream
           if c.choices[0].logprobs is not None]
    assert got == [-0.25, -0.5, -0.75]


async def test_chat_logprobs(router_url):
    out = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hé"}], logprobs=True,
        top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == [-0.25, -0.5, -0.75, -1.0]
    assert [t.token for t in content[2].top_logprobs] == ["h", "A", "B"]
    assert content[2].bytes == [ord("h")]
    stream = await client(router_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True, stream=True)
    got = [c.choices[0].logprobs.content[0].logprob async for c in stream
           if c.choices and c.choices[0].logprobs is not None]
    assert got == [-0.25, -0.5]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"prompt": ["a"] * 65, "n": 2}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 3]}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": "x" * 128}, "prompt"),
    ({"prompt": "x" * 100, "max_tokens": 29}, "max_tokens"),
    ({"prompt": [300]}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ({"extra_body": {"max_tokens": 1.5}}, "max_tokens"),
    ({"extra_body": {"stop": [1]}}, "stop"),
    ({"extra_body": {"bogus": 1}}, "bogus"),
    ({"extra_body": {"stop_token_ids": [257]}}, "stop_token_ids"),
    ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"extra_body": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ({"extra_body": {"logit_bias": {"300": 1}}}, "logit_bias"),
    ({"extra_body": {"logit_bias": {"3": 101}}}, "logit_bias"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 20}, "max_tokens": 5}, "min_tokens"),
    ({"extra_body": {"echo": True}, "logprobs": 1}, "echo"),
    ({"extra_body": {"stream_options": {"include_usage": True}}}, "stream_options"),
])
async def test_bad_completion_parameters_are_400(router_url, kwargs, param):
    args = {"model": "tiny", "prompt": "hello"} | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        await client(router_url).completions.create(**args)
    assert info.value.status_code == 400
    err = info.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str) and err["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"extra_body": {"chat_template_kwargs": "no"}}, "chat_template_kwargs"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name"),
])
async def test_bad_chat_parameters_are_400(router_url, kwargs, param):
    args = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        await client(router_url).chat.completions.create(**args)
    assert info.value.body["param"] == param


async def test_unknown_model_is_404(router_url):
    with pytest.raises(openai.NotFoundError) as info:
        await client(router_url).completions.create(model="gpt-5", prompt="hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client(router_url).chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "hi"}], stream=True)


async def test_malformed_bodies_and_routes(router_url):
    async with httpx.AsyncClient() as http:
        r = await http.post(router_url + "/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await http.post(router_url + "/v1/completions", json=["a"])
        assert r.status_code == 400 and "object" in r.json()["error"]["message"]
        r = await http.get(router_url + "/v1/nothing")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param",
                                                                    "code"}
        r = await http.get(router_url + "/v1/completions")
        assert r.status_code == 405 and "error" in r.json()


async def test_no_ready_worker_is_503(router_url, fake_backend):
    fake_backend.ready = False
    with pytest.raises(openai.InternalServerError) as info:
        await client(router_url).completions.create(model="tiny", prompt="hi")
    assert info.value.status_code == 503 and info.value.body["code"] == "no_ready_worker"
    async with httpx.AsyncClient() as http:
        assert (await http.get(router_url + "/ready")).status_code == 503
        live = await http.get(router_url + "/health")
        assert live.status_code == 200 and live.json()["ready"] is False
        fake_backend.ready = True
        assert (await http.get(router_url + "/ready")).status_code == 200


async def test_full_queue_is_429_with_retry_after(router_url, fake_backend, until_queued):
    fake_backend.capacity = 1
    fake_backend.gate = asyncio.Event()
    c = client(router_url)
    running = await c.completions.create(model="tiny", prompt="abc", stream=True)
    first = await running.__anext__()
    assert first.choices[0].text == "c"
    # The second request finds no capacity and waits in the queue (max 1)...
    queued = asyncio.create_task(c.completions.create(model="tiny", prompt="xy"))
    await until_queued(router_url, 1)
    # ...so the third is refused.
    async with httpx.AsyncClient() as http:
        r = await http.post(router_url + "/v1/completions", json={"model": "tiny",
                                                                  "prompt": "z"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    fake_backend.gate.set()
    rest = "".join([c.choices[0].text async for c in running])
    assert rest == "ba"
    assert (await queued).choices[0].text == "yx"


@pytest.mark.parametrize("router_url", [RouterSettings(
    served_model_name="tiny", max_model_len=128, request_timeout_s=0.4)], indirect=True)
async def test_deadline_is_504_or_an_sse_error(router_url, fake_backend, start_router):
    # The backend holds its tokens (events, not delays): what reaches the client before the
    # deadline is fixed, however slow the machine.
    fake_backend.hold_first = asyncio.Event()  # no token at all before the deadline
    with pytest.raises(openai.APIStatusError) as info:
        await client(router_url).completions.create(model="tiny", prompt="abc", stream=True)
    assert info.value.status_code == 504
    assert fake_backend.closed_early == [fake_backend.requests[-1].request_id]  # cancelled
    fake_backend.hold_first = None
    fake_backend.gate = asyncio.Event()  # the first token, then nothing before the deadline
    with pytest.raises(openai.APIStatusError) as info:
        await client(router_url).completions.create(model="tiny", prompt="abcdefghij",
                                                    max_tokens=20)
    assert info.value.status_code == 504 and info.value.body["code"] == "deadline_exceeded"
    # Streamed, the first token is sent before the deadline ends the stream with an SSE
    # error. That token must reach the client within the deadline, so this router's is far
    # longer than a loaded machine takes for one request (it bounds the wait, not a speed).
    streaming = await start_router(RouterSettings(
        served_model_name="tiny", max_model_len=128, request_timeout_s=3.0))
    stream = await client(streaming).completions.create(model="tiny", prompt="abcdefghij",
                                                        max_tokens=20, stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="deadline"):
        async for c in stream:
            texts.append(c.choices[0].text)
    assert texts == ["j"]
    assert len(fake_backend.closed_early) == 3


async def test_worker_failure_mid_stream_is_an_sse_error(router_url, fake_backend):
    fake_backend.fail_after = 3
    stream = await client(router_url).completions.create(model="tiny", prompt="abcdefgh",
                                                         stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="retry failed"):
        async for c in stream:
            texts.append(c.choices[0].text)
    assert "".join(texts) == "hgf"
    with pytest.raises(openai.APIStatusError) as info:
        await client(router_url).completions.create(model="tiny", prompt="abcdefgh")
    assert info.value.status_code == 502


async def test_request_id_is_taken_or_made(router_url, fake_backend, until):
    async with httpx.AsyncClient() as http:
        r = await http.post(router_url + "/v1/completions",
                            json={"model": "tiny", "prompt": "ab"},
                            headers={"x-request-id": "req-123"})
        assert r.headers["x-request-id"] == "req-123" and r.json()["id"] == "cmpl-req-123"
        assert fake_backend.requests[-1].request_id == "req-123"
        r = await http.post(router_url + "/v1/completions", json={"model": "tiny",
                                                                  "prompt": "ab"})
        made = r.headers["x-request-id"]
        assert len(made) == 32 and fake_backend.requests[-1].request_id == made
        # A reused id stays the client's, but the workers get a unique one while both run.
        fake_backend.gate = asyncio.Event()
        streams = [asyncio.create_task(http.post(
            router_url + "/v1/completions", json={"model": "tiny", "prompt": "ab"},
            headers={"x-request-id": "same"})) for _ in range(2)]
        assert await until(lambda: len(fake_backend.requests) == 4)
        fake_backend.gate.set()
        replies = [await t for t in streams]
        assert [r.json()["id"] for r in replies] == ["cmpl-same", "cmpl-same"]
        assert sorted(q.request_id for q in fake_backend.requests[2:]) == ["same", "same.1"]
        r = await http.post(router_url + "/v1/completions", json={"model": "tiny"},
                            headers={"x-request-id": "abc"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "abc"


async def test_client_disconnect_cancels_the_backend_stream(router_url, fake_backend, until):
    fake_backend.gate = asyncio.Event()
    async with httpx.AsyncClient() as http:
        async with http.stream("POST", router_url + "/v1/completions",
                               json={"model": "tiny", "prompt": "abcdef", "stream": True},
                               headers={"x-request-id": "gone"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break
    assert await until(lambda: fake_backend.closed_early == ["gone"])
    assert fake_backend.active == 0
    async with httpx.AsyncClient() as http:
        text = (await http.get(router_url + "/metrics")).text
    assert 'outcome="cancelled",pool="",role="router"} 1.0' in text


async def test_metrics_count_outcomes_and_latency(router_url):
    c = client(router_url)
    await c.completions.create(model="tiny", prompt="abc")
    with pytest.raises(openai.BadRequestError):
        await c.completions.create(model="tiny", prompt="abc", temperature=-1)
    async with httpx.AsyncClient() as http:
        text = (await http.get(router_url + "/metrics")).text
    assert 'baton_requests_total{model="tiny",namespace="test",outcome="success",pool="",' \
           'role="router"} 1.0' in text
    assert 'outcome="rejected",pool="",role="router"} 1.0' in text
    assert 'baton_time_to_first_token_seconds_count{model="tiny",namespace="test",pool="",' \
           'role="router"} 1.0' in text
    # One mean gap per request (3 tokens and eos after the first token).
    assert 'baton_inter_token_latency_seconds_count{model="tiny",namespace="test",pool="",' \
           'role="router"} 1.0' in text


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated monthly\nsk-one\n\nsk-two\n")
    return path


async def test_api_keys(start_router, keys_file):
    url = await start_router(RouterSettings(served_model_name="tiny", max_model_len=64,
                                            api_keys_file=str(keys_file)))
    with pytest.raises(openai.AuthenticationError) as info:
        await client(url, "sk-wrong").completions.create(model="tiny", prompt="a")
    assert info.value.body["code"] == "invalid_api_key"
    out = await client(url, "sk-two").completions.create(model="tiny", prompt="ab")
    assert out.choices[0].text == "ba"
    keys_file.write_text("sk-three\n")
    os.utime(keys_file, (1, 1))  # a new mtime even within the clock's resolution
    with pytest.raises(openai.AuthenticationError):
        await client(url, "sk-two").models.list()
    await client(url, "sk-three").models.list()
    async with httpx.AsyncClient() as http:  # probes stay open
        assert (await http.get(url + "/health")).status_code == 200
        assert (await http.get(url + "/metrics")).status_code == 200


async def test_itl_is_one_mean_gap_per_request(router_url, fake_backend, monkeypatch):
    # The router's clock advances 50 ms per token: the mean gap is exactly that.
    from types import SimpleNamespace

    from baton.workers.router import generation

    now = [1000.0]
    monkeypatch.setattr(generation, "time", SimpleNamespace(monotonic=lambda: now[0],
                                                            time=generation.time.time))
    fake_backend.tick = lambda: now.__setitem__(0, now[0] + 0.05)
    await client(router_url).completions.create(model="tiny", prompt="abcd", max_tokens=4)
    async with httpx.AsyncClient() as http:
        text = (await http.get(router_url + "/metrics")).text
    line = next(x for x in text.splitlines()
                if x.startswith("baton_inter_token_latency_seconds_sum"))
    mean_gap = float(line.rsplit(" ", 1)[1])
    assert mean_gap == pytest.approx(0.05), line
    assert 'baton_inter_token_latency_seconds_count{model="tiny",namespace="test",pool="",' \
           'role="router"} 1.0' in text


@pytest.mark.parametrize("router_url", [RouterSettings(
    served_model_name="tiny", max_model_len=1 << 20, request_timeout_s=30.0)], indirect=True)
async def test_a_client_gone_mid_stream_is_no_router_error(router_url, fake_backend, caplog,
                                                          start_router, until):
    """A client stops reading and half-closes while tokens keep coming: its connection is
    closing with unsent bytes, so the router's next write fails (aiohttp cancels nothing yet).
    That is a cancelled request, logged as nothing worse than debug, with the backend stream
    closed."""
    import logging
    import socket

    host, port = router_url.removeprefix("http://").split(":")
    body = (b'{"model": "tiny", "prompt": "abcdef", "stream": true, "max_tokens": 500000, '
            b'"ignore_eos": true, "logprobs": 3}')
    with caplog.at_level(logging.DEBUG):
        reader, writer = await asyncio.open_connection(host, int(port))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\nx-request-id: gone-writing\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await reader.readuntil(b"data:")  # the stream has begun; read nothing more
        # The socket buffers between the two fill up, until the router's transport holds
        # bytes it cannot send: then the client half-closes.
        (runner,) = start_router.runners
        assert await until(lambda: any(
            h.transport is not None and h.transport.get_write_buffer_size() > 0
            for h in runner.server.connections))
        sock.shutdown(socket.SHUT_WR)
        assert await until(lambda: "gone-writing" in fake_backend.closed_early)
        writer.transport.abort()
    assert fake_backend.closed_early == ["gone-writing"] and fake_backend.active == 0
    # The router's and aiohttp's own loggers (earlier tests' leftovers may log elsewhere).
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING
              and r.name.split(".")[0] in ("aiohttp", "baton")]
    assert not errors, [r.getMessage() for r in errors]
    async with httpx.AsyncClient() as http:
        text = (await http.get(router_url + "/metrics")).text
    assert 'outcome="cancelled",pool="",role="router"} 1.0' in text
