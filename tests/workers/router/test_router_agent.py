"""The agent API through the official openai client, against the fake backend: tool calls,
reasoning, structured output, n, several prompts, echo, the new sampling parameters and
/tokenize. The fake model answers a chat with its last user message reversed, so a test
scripts the model's text by sending it reversed (`say`)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from llguidance import LLMatcher, LLTokenizer
from pydantic import BaseModel

from baton.workers.router.generation import choice_seed
from baton.workers.router.server import RouterSettings

MAX_MODEL_LEN = 4096
TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"


@pytest.fixture
async def router_url(start_router):
    return await start_router(RouterSettings(served_model_name="tiny",
                                             max_model_len=MAX_MODEL_LEN,
                                             request_timeout_s=60.0, max_queued_requests=8))


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def say(text: str) -> list[dict]:
    """Messages whose answer (from the fake model) is text."""
    return [{"role": "user", "content": text[::-1]}]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "detail": {"type": "object"}}, "required": ["city"]}}}
CALLS = ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
         "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=detail>\n"
         "{\"wind\": true}\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
         "<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n"
         "</tool_call>\n")


async def test_tool_calls_not_streamed_and_streamed_agree(router_url):
    c = client(router_url)
    out = await c.chat.completions.create(model="tiny", messages=say(CALLS),
                                          tools=[WEATHER_TOOL])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        ("get_weather", {"city": "Paris", "days": 3, "detail": {"wind": True}}),
        ("get_weather", {"city": "Rome"})]
    assert all(t.id.startswith("call_") and t.type == "function" for t in calls)
    # The official client's own stream accumulation gives the same message.
    async with c.chat.completions.stream(model="tiny", messages=say(CALLS),
                                         tools=[WEATHER_TOOL]) as stream:
        chunks = [event.chunk async for event in stream if event.type == "chunk"]
        final = await stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert streamed.message.content == "Let me check."
    assert [(t.function.name, t.function.arguments) for t in streamed.message.tool_calls] == [
        (t.function.name, t.function.arguments) for t in calls]
    # OpenAI's stream shape: a call's id and name first, then argument fragments.
    pieces = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    firsts = [p for p in pieces if p.id is not None]
    assert [p.index for p in firsts] == [0, 1] and all(p.function.arguments == ""
                                                       for p in firsts)
    assert sum(1 for p in pieces if p.id is None) > 2


async def test_tool_history_and_bad_tool_requests(router_url, fake_backend):
    c = client(router_url)
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
               *say("It is sunny.")]
    out = await c.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL])
    assert out.choices[0].message.content == "It is sunny."
    for kwargs, param in [
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function",
             "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function",
             "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1]"),
    ]:
        args = {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER_TOOL]} | kwargs
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(**args)
        assert info.value.body["param"] == param, info.value.body
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="tiny", messages=say("x"), tool_choice="required")
    assert info.value.body["param"] == "tool_choice"


async def test_tool_choice_none_and_one_call_without_parallel_calls(router_url, fake_backend):
    c = client(router_url)
    out = await c.chat.completions.create(model="tiny", messages=say(CALLS),
                                          tools=[WEATHER_TOOL], tool_choice="none")
    assert out.choices[0].message.content == CALLS and not out.choices[0].message.tool_calls
    out = await c.chat.completions.create(model="tiny", messages=say(CALLS),
                                          tools=[WEATHER_TOOL], parallel_tool_calls=False)
    assert len(out.choices[0].message.tool_calls) == 1
    assert out.choices[0].finish_reason == "tool_calls"
    assert fake_backend.closed_early  # the answer ended at the first call


async def test_reasoning_split(router_url):
    c = client(router_url)
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    out = await c.chat.completions.create(
        model="tiny", messages=say("Two and two.\n</think>\nFour."), extra_body=thinking)
    message = out.choices[0].message
    assert (message.reasoning_content, message.content) == ("Two and two.", "Four.")
    assert out.usage.completion_tokens_details.reasoning_tokens > 0
    stream = await c.chat.completions.create(
        model="tiny", messages=say("Two and two.\n</think>\nFour."), extra_body=thinking,
        stream=True)
    reasoning, content = "", ""
    async for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == ("Two and two.", "Four.")
    # Thinking off: the output is the answer, markup and all.
    out = await c.chat.completions.create(
        model="tiny", messages=say("a </think> b"),
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert out.choices[0].message.content == "a </think> b"
    assert out.choices[0].message.reasoning_content is None


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]


async def test_parse_with_a_pydantic_model(router_url, fake_backend):
    answer = json.dumps({"name": "Ada", "age": 36, "tags": ["math"]})
    out = await client(router_url).chat.completions.parse(
        model="tiny", messages=say(answer), response_format=Person)
    assert out.choices[0].message.parsed == Person(name="Ada", age=36, tags=["math"])
    # The request carried an llguidance grammar that accepts such answers, and not others.
    grammar = fake_backend.requests[-1].sampling.grammar
    tok = LLTokenizer(str(TINY / "tokenizer.json"))

    def accepts(text: str) -> bool:
        m = LLMatcher(tok, grammar, log_level=0)
        return m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting()

    assert accepts(answer)
    assert not accepts(json.dumps({"name": "Ada", "age": "old", "tags": []}))


async def test_unconstrained_requests_carry_no_grammar(router_url, fake_backend):
    await client(router_url).chat.completions.create(model="tiny", messages=say("hi"),
                                                     tools=[WEATHER_TOOL])
    assert fake_backend.requests[-1].sampling.grammar == ""
    await client(router_url).chat.completions.create(
        model="tiny", messages=say("hi"), tools=[WEATHER_TOOL], tool_choice="required")
    assert "<function=get_weather>" in fake_backend.requests[-1].sampling.grammar


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nothing"}}},
     "response_format.json_schema.schema.type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format"),
])
async def test_schemas_that_cannot_compile_are_400(router_url, response_format, param):
    with pytest.raises(openai.BadRequestError) as info:
        await client(router_url).chat.completions.create(
            model="tiny", messages=say("{}"), response_format=response_format)
    assert info.value.body["param"] == param
    assert info.value.body["message"].startswith(param)


async def test_n_choices_open_after_the_first_token(router_url, fake_backend, until):
    import asyncio

    fake_backend.hold_first = asyncio.Event()
    task = asyncio.create_task(client(router_url).completions.create(
        model="tiny", prompt="abc", n=3, seed=11, max_tokens=10,
        extra_body={"prompt_cache_key": "session-1"}))
    assert await until(lambda: fake_backend.requests)  # choice 0 waits for its first token
    # The router answers other requests meanwhile (every task it started had its turns);
    # the other choices still wait for choice 0's first token.
    for _ in range(3):
        await client(router_url).models.list()
    assert len(fake_backend.requests) == 1
    fake_backend.hold_first.set()
    fake_backend.hold_first = None
    out = await task
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.text == "cba" for c in out.choices)
    reqs = fake_backend.requests
    assert [r.sampling.seed for r in reqs] == [choice_seed(11, j) for j in range(3)]
    assert reqs[0].sampling.seed == 11 and len({r.sampling.seed for r in reqs}) == 3
    assert {r.cache_key for r in reqs} == {"session-1"}
    assert len({r.request_id for r in reqs}) == 3
    # The prompt is counted once.
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 12
    # Without a prompt_cache_key the choices still share one key.
    await client(router_url).completions.create(model="tiny", prompt="xy", n=2)
    keys = {r.cache_key for r in fake_backend.requests[3:]}
    assert len(keys) == 1 and None not in keys


async def test_n_streamed_and_several_prompts(router_url):
    c = client(router_url)
    stream = await c.chat.completions.create(model="tiny", messages=say("hello"), n=2,
                                             stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
        usage = chunk.usage or usage
    assert texts == {0: "hello", 1: "hello"} and finish == {0: "stop", 1: "stop"}
    assert usage.completion_tokens == 12
    out = await c.completions.create(model="tiny", prompt=["ab", "xyz"], n=2, max_tokens=10)
    assert [(ch.index, ch.text) for ch in out.choices] == [(0, "ba"), (1, "ba"), (2, "zyx"),
                                                           (3, "zyx")]
    assert out.usage.prompt_tokens == 5
    out = await c.completions.create(model="tiny", prompt=[[104, 105], [106]], max_tokens=5)
    assert [ch.text for ch in out.choices] == ["ih", "j"]


async def test_echo(router_url):
    c = client(router_url)
    out = await c.completions.create(model="tiny", prompt="abc", echo=True, max_tokens=10)
    assert out.choices[0].text == "abccba"
    stream = await c.completions.create(model="tiny", prompt="abc", echo=True, stream=True)
    assert "".join([ch.choices[0].text async for ch in stream]) == "abccba"


async def test_sampling_parameters_reach_the_backend(router_url, fake_backend):
    await client(router_url).chat.completions.create(
        model="tiny", messages=say("x"), presence_penalty=0.5, frequency_penalty=-1.0,
        logit_bias={"65": 5, "66": -100}, seed=-1,
        extra_body={"repetition_penalty": 1.2, "min_tokens": 1})
    s = fake_backend.requests[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.2)
    assert s.logit_bias == {65: 5.0, 66: -100.0} and s.min_tokens == 1
    assert s.seed == 2**64 - 1
    s.validate()


async def test_tokenize_and_detokenize(router_url):
    async with httpx.AsyncClient() as http:
        r = await http.post(router_url + "/tokenize", json={"prompt": "héllo",
                                                            "return_token_strs": True})
        body = r.json()
        assert body["tokens"] == list("héllo".encode()) and body["count"] == 6
        assert body["max_model_len"] == MAX_MODEL_LEN and len(body["token_strs"]) == 6
        r = await http.post(router_url + "/tokenize", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["tokens"] == list(b"<user>hi<assistant>")
        r = await http.post(router_url + "/detokenize", json={"tokens": [104, 105]})
        assert r.json() == {"prompt": "hi"}
        for path, body, param in [
            ("/tokenize", {"prompt": "x" * MAX_MODEL_LEN}, "prompt"),
            ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
            ("/detokenize", {"tokens": [1, 300]}, "tokens"),
            ("/detokenize", {"tokens": "hi"}, "tokens"),
        ]:
            r = await http.post(router_url + path, json=body)
            assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_tools_reach_the_template_unless_tool_choice_is_none(fake_backend):
    from baton.workers.metrics import BatonMetrics, MetricLabels
    from baton.workers.router.params import parse_chat
    from baton.workers.router.server import Router

    router = Router(fake_backend, None, RouterSettings(served_model_name="tiny",
                                                       max_model_len=64),
                    BatonMetrics(MetricLabels(namespace="t", model="tiny", role="router")))
    body = {"model": "tiny", "messages": say("x"), "tools": [WEATHER_TOOL]}
    kwargs = router.template_kwargs(parse_chat(body))
    assert kwargs["tools"] == [WEATHER_TOOL]
    assert "tools" not in router.template_kwargs(parse_chat(body | {"tool_choice": "none"}))


async def test_a_token_the_grammar_refused_is_an_error_not_a_stop(router_url, fake_backend):
    """The workers end a choice with grammar_error: the client sees finish_reason "error"
    and an error (an error event when streamed), without the refused token's text; the
    router counts it."""
    c = client(router_url)
    text = "Let me check.\n<tool_call>\n<function=get_weather>"
    fake_backend.refuse_at = len("Let me check.\n")
    out = await c.chat.completions.create(model="tiny", messages=say(text))
    choice = out.choices[0]
    assert choice.finish_reason == "error"
    assert choice.message.content == "Let me check.\n"  # no markup
    assert choice.model_extra["error"]["code"] == "grammar_refused_token"
    with pytest.raises(openai.APIError, match="grammar refused"):
        async for _ in await c.chat.completions.create(model="tiny", messages=say(text),
                                                       stream=True):
            pass
    r = await c.responses.create(model="tiny", input=say(text))
    assert r.status == "failed" and "grammar refused" in r.error.message
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(router_url + "/metrics")).text
    assert any(line.startswith("baton_grammar_refused_tokens_total{") and
               line.endswith(" 3.0") for line in metrics.splitlines()), metrics
