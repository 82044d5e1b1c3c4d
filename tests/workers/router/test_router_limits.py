"""No input breaks the router: every bad value is a 4xx in OpenAI's shape naming the field,
an unexpected exception is a shaped 500 with the request id, aiohttp's own errors are shaped
too, and slow, idle, excess or oversized connections are closed or refused within the
configured limits (bodies in flight stay within their memory budget)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from baton.workers.router.params import UINT32_MAX
from baton.workers.router.server import RouterSettings
from baton.workers.router.tool_calls import typed_argument

DEADLINE_S = 60.0  # bounds a hang only


def _settings(**kw) -> RouterSettings:
    base = dict(served_model_name="tiny", max_model_len=128, request_timeout_s=30.0)
    base.update(kw)
    return RouterSettings(**base)


@pytest.fixture
def serve(start_router):
    """serve(settings) -> (router, port), over the fake backend."""

    async def start(settings: RouterSettings):
        url = await start_router(settings)
        return start_router.routers[-1], int(url.rsplit(":", 1)[1])

    return start


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))),
                                  DEADLINE_S)
    return status, headers, body


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF or reset) before the deadline."""
    try:
        while await asyncio.wait_for(reader.read(65536), DEADLINE_S):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def _shaped(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- every value validated -----------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _tool(schema: dict) -> dict:
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}


def _format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": schema}}}


DEEP_ARGS = "[" * 50_000
BAD_CHAT = [
    # logit_bias keys: isdigit() but not an ASCII integer, or past a token id's width
    ({"logit_bias": {"²": 1}}, "logit_bias"),
    ({"logit_bias": {"١٢": 1}}, "logit_bias"),
    ({"logit_bias": {"７": 1}}, "logit_bias"),
    ({"logit_bias": {str(2**32): 1}}, "logit_bias"),
    ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
    # every integer against its wire width (uint32; seed uint64 / int64)
    ({"top_k": UINT32_MAX + 1}, "top_k"),
    ({"max_tokens": UINT32_MAX + 1}, "max_tokens"),
    ({"max_completion_tokens": 2**70}, "max_completion_tokens"),
    ({"min_tokens": UINT32_MAX + 1}, "min_tokens"),
    ({"n": 2**64}, "n"),
    ({"top_logprobs": 2**40, "logprobs": True}, "top_logprobs"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    # every JSON Schema keyword's type, in tools and in response_format, at any depth
    (_tool({"type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}}),
     "tools[0].function.parameters.properties.a.minLength"),
    (_tool({"type": "object", "properties": {"a": {"type": "array", "maxItems": -1}}}),
     "tools[0].function.parameters.properties.a.maxItems"),
    (_tool({"type": "object", "properties": {"a": {"anyOf": [{"type": "integer",
                                                              "maximum": "9"}]}}}),
     "tools[0].function.parameters.properties.a.anyOf[0].maximum"),
    (_tool({"type": "object", "properties": {"a": {"enum": "abc"}}}),
     "tools[0].function.parameters.properties.a.enum"),
    (_format({"type": "string", "minLength": "x"}), "response_format.json_schema.schema.minLength"),
    (_format({"type": "strin"}), "response_format.json_schema.schema.type"),
    (_format({"type": "object", "required": "a"}), "response_format.json_schema.schema.required"),
    (_format({"type": "array", "items": {"pattern": 5}}),
     "response_format.json_schema.schema.items.pattern"),
    (_format({"type": "object", "additionalProperties": "no"}),
     "response_format.json_schema.schema.additionalProperties"),
    (_format({"type": "number", "multipleOf": 0}),
     "response_format.json_schema.schema.multipleOf"),
    (_format({"allOf": []}), "response_format.json_schema.schema.allOf"),
    # recursion in a parsed argument: 50k nested brackets
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": DEEP_ARGS}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("extra, param", BAD_CHAT,
                         ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD_CHAT)])
async def test_bad_chat_values_are_shaped_400s_naming_the_field(serve, extra, param):
    _, port = await serve(_settings())
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                max_retries=0)
    body = {**CHAT, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(**{k: v for k, v in body.items()
                                                if k in ("model", "messages")},
                                             extra_body={k: v for k, v in body.items()
                                                         if k not in ("model", "messages")})
    err = info.value.body
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    await client.close()


BAD_OTHER = [
    # lone surrogates, wherever text is (the official client cannot even encode them)
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi\ud800"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {**CHAT, "stop": ["ok", "\udc00"]}, "stop[1]"),
    ("/v1/chat/completions", {**CHAT, "user": "\ud83d"}, "user"),
    ("/v1/chat/completions", {**CHAT, "metadata": {"\ud83d": "key"}}, "metadata.\ud83d"),
    ("/v1/completions", {"model": "tiny", "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 2**33}, "logprobs"),
    ("/v1/responses", {"model": "tiny", "input": "\udc00"}, "input"),
    ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 2**32},
     "max_output_tokens"),
    ("/v1/responses", {"model": "tiny", "input": [{"type": "function_call", "call_id": "c",
                                                   "name": "f", "arguments": DEEP_ARGS}]},
     "input[0].arguments"),
    ("/v1/responses", {"model": "tiny", "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "string", "maxLength": "9"}}}},
     "text.format.schema.maxLength"),
    ("/tokenize", {"model": "tiny", "prompt": "\ud800"}, "prompt"),
]


@pytest.mark.parametrize("path, body, param", BAD_OTHER,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_OTHER)])
async def test_bad_values_on_other_endpoints_are_shaped_400s(serve, path, body, param):
    _, port = await serve(_settings())
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        # json.dumps escapes a lone surrogate as \\udXXX, as any client's JSON would.
        r = await http.post(f"http://127.0.0.1:{port}{path}", content=json.dumps(body),
                            headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert _shaped(r.content)["param"] == param


@pytest.mark.parametrize("schema", [{}, {"type": "array"}])
def test_a_model_argument_nested_past_the_parser_stays_text(schema):
    # The model's own output: no request to refuse, so the deep value stays its text.
    assert typed_argument(DEEP_ARGS, schema) == DEEP_ARGS


async def test_raw_surrogate_bytes_in_a_body_are_a_400(serve):
    _, port = await serve(_settings())
    raw = b'{"model": "tiny", "prompt": "a\xed\xa0\x80b"}'  # a surrogate's UTF-8-style bytes
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        r = await http.post(f"http://127.0.0.1:{port}/v1/completions", content=raw)
    assert r.status_code == 400, r.text
    _shaped(r.content)


async def test_a_surrogate_pair_is_one_character_and_accepted(serve):
    _, port = await serve(_settings())
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        r = await http.post(f"http://127.0.0.1:{port}/v1/completions",
                            content='{"model": "tiny", "prompt": "\\ud83d\\ude00", '
                                    '"max_tokens": 2}')
    assert r.status_code == 200, r.text


# -- the catch-all and aiohttp's own errors ------------------------------------------------

async def test_an_unexpected_exception_is_a_shaped_500_with_the_request_id(
        serve, fake_backend, caplog):
    async def exploding(request):
        raise RuntimeError("an unexpected failure")
        yield  # an async generator

    fake_backend.generate = exploding
    _, port = await serve(_settings())
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                max_retries=0)
    with caplog.at_level(logging.ERROR, logger="baton.router"):
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": "req-500"})
    assert info.value.status_code == 500
    assert info.value.body["code"] == "internal_error"
    assert "req-500" in info.value.body["message"]
    assert info.value.response.headers["x-request-id"] == "req-500"
    logged = [r for r in caplog.records if "req-500" in r.getMessage()]
    assert logged and logged[0].exc_info and "unexpected failure" in str(logged[0].exc_info[1])
    await client.close()


RAW_BAD = [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
]


@pytest.mark.parametrize("raw", RAW_BAD, ids=["request-line", "headers-too-large",
                                              "bad-chunked", "bad-content-length"])
async def test_aiohttp_parser_errors_come_in_openai_shape(serve, raw):
    _, port = await serve(_settings())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    status, headers, body = await _read_response(reader)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    assert headers["server"] == "baton"
    err = _shaped(body)
    assert err["code"] == "bad_http_request" and err["type"] == "invalid_request_error"
    writer.close()


async def test_no_response_names_the_server_software(serve):
    _, port = await serve(_settings())
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        for r in (await http.get(f"http://127.0.0.1:{port}/v1/models"),
                  await http.get(f"http://127.0.0.1:{port}/nowhere"),
                  await http.post(f"http://127.0.0.1:{port}/v1/completions", content=b"{")):
            assert r.headers["server"] == "baton", r.headers


# -- timeouts, the connection cap, the body budget -----------------------------------------

async def test_idle_and_silent_connections_are_closed_after_the_keepalive_timeout(serve):
    _, port = await serve(_settings(keepalive_timeout_s=0.3))
    silent = await asyncio.open_connection("127.0.0.1", port)  # never sends a byte
    partial = await asyncio.open_connection("127.0.0.1", port)  # a request head never ends
    partial[1].write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    idle = await asyncio.open_connection("127.0.0.1", port)  # one request, then idle
    idle[1].write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await _read_response(idle[0])
    assert status == 200 and headers.get("connection", "").lower() != "close"
    for reader, _ in (silent, partial, idle):
        assert await _closed_by_server(reader)
    for _, writer in (silent, partial, idle):
        writer.close()


async def test_a_trickled_body_is_refused_after_the_body_timeout_and_never_counts_as_running(
        serve, until):
    router, port = await serve(_settings(body_timeout_s=1.0, keepalive_timeout_s=60.0))
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:3])
    await writer.drain()
    # The handler is reading the body (it holds its share of the budget): not running.
    assert await until(lambda: router.body_budget.held == len(body))
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    running = next(x for x in metrics.splitlines() if x.startswith("baton_requests_running{"))
    assert running.endswith(" 0.0"), running

    async def trickle():
        for i in range(3, len(body) - 1):  # one byte at a time, never the last one
            writer.write(body[i:i + 1])
            await asyncio.sleep(0.05)  # the pace of a slow client, not a wait for a state

    trickler = asyncio.create_task(trickle())
    status, headers, payload = await _read_response(reader)
    assert status == 408 and _shaped(payload)["code"] == "request_timeout"
    assert await _closed_by_server(reader)
    trickler.cancel()
    writer.close()
    assert router.body_budget.held == 0 and router.running == 0


async def test_a_body_in_time_is_served_and_counted(serve):
    router, port = await serve(_settings(body_timeout_s=30.0))
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        r = await http.post(f"http://127.0.0.1:{port}/v1/completions",
                            json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert router.body_budget.held == 0 and router.body_budget.peak == len(r.request.content)


async def test_connections_past_the_cap_are_closed(serve):
    _, port = await serve(_settings(max_connections=3))
    kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed_by_server(reader)
        writer.close()
    for reader, writer in kept:  # the first three still serve
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await _read_response(reader)
        assert status == 200
        writer.close()


MB15 = 15 * 1024**2


async def test_24_bodies_of_15_mb_stay_within_the_body_budget(serve, until):
    budget = 64 * 1024**2  # room for 4 such bodies
    router, port = await serve(_settings(body_budget_bytes=budget, body_timeout_s=120.0))
    prefix = b'{"model": "tiny", "max_tokens": 2, "prompt": "'
    body = prefix + b"a" * (MB15 - len(prefix) - 2) + b'"}'
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(24)]
    for _, writer in conns:  # every head first, then a little of every body
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body[:1024])
    # Four bodies fit the budget; the other twenty are refused before they are read.
    assert await until(lambda: router.body_budget.refused == 20)
    assert router.body_budget.held == 4 * len(body) <= budget

    answers: dict[int, tuple[int, str | None]] = {}

    async def answer(i, reader):
        status, _, payload = await _read_response(reader)
        answers[i] = (status, _shaped(payload)["code"] if status >= 400 else None)

    tasks = [asyncio.create_task(answer(i, reader)) for i, (reader, _) in enumerate(conns)]
    # The twenty refused are answered 503 while the others' bodies are still unsent.
    assert await until(lambda: len(answers) == 20)
    assert set(answers.values()) == {(503, "body_budget_exhausted")}
    for i, (_, writer) in enumerate(conns):
        if i not in answers:
            writer.write(body[1024:])
    await asyncio.gather(*tasks)
    for _, writer in conns:
        writer.close()
    rest = [i for i in range(24) if answers[i][0] != 503]
    assert len(rest) == 4
    # The accepted bodies were read and decoded; a 15 MB prompt leaves no room for output.
    assert all(answers[i] == (400, "context_length_exceeded") for i in rest), answers
    assert router.body_budget.peak <= budget
    assert router.body_budget.held == 0


async def test_chunked_bodies_are_held_to_the_budget_as_they_arrive(serve, until):
    """Without a Content-Length a body takes its share chunk by chunk: the one that would
    pass the budget is refused 503 while the first goes on to be served."""
    router, port = await serve(_settings(body_budget_bytes=1024**2))
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    first = await asyncio.open_connection("127.0.0.1", port)
    opening = b'{"model": "tiny", "max_tokens": 2, "prompt": "hi", "user": "'
    first[1].write(head + chunk(opening + b"u" * (700 * 1024)))
    assert await until(lambda: router.body_budget.held >= 700 * 1024)

    second = await asyncio.open_connection("127.0.0.1", port)
    second[1].write(head + chunk(opening + b"u" * (700 * 1024)))
    status, _, payload = await _read_response(second[0])
    assert status == 503 and _shaped(payload)["code"] == "body_budget_exhausted"
    assert router.body_budget.peak <= 1024**2

    first[1].write(chunk(b'"}') + b"0\r\n\r\n")
    status, _, payload = await _read_response(first[0])
    assert status == 200, payload
    assert router.body_budget.held == 0
    for _, writer in (first, second):
        writer.close()
