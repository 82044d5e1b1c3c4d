"""/v1/responses through the official client's responses.create, against the fake backend
(which answers with the last user message reversed: `said` scripts the model's text)."""

from __future__ import annotations

import json

import openai
import pytest

from baton.workers.router.server import RouterSettings


@pytest.fixture
async def router_url(start_router):
    return await start_router(RouterSettings(served_model_name="tiny", max_model_len=4096,
                                             request_timeout_s=60.0, stored_responses=2))


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def said(text: str) -> str:
    return text[::-1]


TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "days": {"type": "integer"}},
                       "required": ["city"]}}
CALL = ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n")


async def test_text_in_text_out(router_url, fake_backend):
    r = await client(router_url).responses.create(model="tiny", input=said("Hello there."),
                                                  instructions="Be brief.")
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == "Hello there."
    assert [item.type for item in r.output] == ["message"]
    assert r.usage.output_tokens == len("Hello there.") + 1
    assert r.usage.input_tokens == len(fake_backend.requests[-1].prompt_ids)
    assert r.instructions == "Be brief."
    prompt = bytes(fake_backend.requests[-1].prompt_ids).decode()
    assert prompt.startswith("<system>Be brief.<user>")


async def test_function_call_streamed_and_not(router_url):
    c = client(router_url)
    r = await c.responses.create(model="tiny", input=said(CALL), tools=[TOOL])
    kinds = [item.type for item in r.output]
    assert kinds == ["message", "function_call"]
    call = r.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris",
                                                                       "days": 2})
    assert call.call_id.startswith("call_") and call.status == "completed"
    assert r.output[0].content[0].text == "Checking."
    stream = await c.responses.create(model="tiny", input=said(CALL), tools=[TOOL],
                                      stream=True)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    assert types.count("response.output_item.added") == 2
    assert types.count("response.output_item.done") == 2
    assert [e.sequence_number for e in events] == list(range(len(events)))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args == done.arguments == call.arguments
    final = events[-1].response
    assert [item.type for item in final.output] == kinds
    assert final.output[1].arguments == call.arguments
    # max_tool_calls ends the answer after that many calls.
    r = await c.responses.create(model="tiny", input=said(CALL + CALL.split("\n", 1)[1] * 2),
                                 tools=[TOOL], max_tool_calls=2)
    assert [item.type for item in r.output] == ["message", "function_call", "function_call"]


async def test_reasoning_items(router_url):
    c = client(router_url)
    r = await c.responses.create(model="tiny", input=said("Think first.\n</think>\nDone."),
                                 extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Think first." and r.output_text == "Done."
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    stream = await c.responses.create(
        model="tiny", input=said("Think first.\n</think>\nDone."), stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    events = [e async for e in stream]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") \
        == "Think first."


async def test_conversation_items_and_previous_response_id(router_url, fake_backend):
    c = client(router_url)
    first = await c.responses.create(model="tiny", input=said(CALL), tools=[TOOL])
    call = first.output[1]
    # The client runs the function and continues from the stored response.
    second = await c.responses.create(
        model="tiny", previous_response_id=first.id, tools=[TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
               {"role": "user", "content": said("It is sunny.")}])
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    prompt = bytes(fake_backend.requests[-1].prompt_ids).decode()
    assert prompt.startswith(f"<user>{said(CALL)}<assistant>Checking.<tool>sunny<user>")
    # The same conversation sent as items renders the same prompt.
    await c.responses.create(model="tiny", tools=[TOOL], input=[
        {"role": "user", "content": said(CALL)},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        {"role": "user", "content": [{"type": "input_text", "text": said("It is sunny.")}]}])
    assert bytes(fake_backend.requests[-1].prompt_ids).decode() == prompt
    assert (await c.responses.retrieve(second.id)).output_text == "It is sunny."
    await c.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(second.id)


async def test_store_false_and_eviction(router_url):
    c = client(router_url)
    unstored = await c.responses.create(model="tiny", input=said("x"), store=False)
    with pytest.raises(openai.BadRequestError) as info:
        await c.responses.create(model="tiny", input="y", previous_response_id=unstored.id)
    assert info.value.body["param"] == "previous_response_id"
    assert "store" in info.value.body["message"]
    ids = [(await c.responses.create(model="tiny", input=said("z"))).id for _ in range(3)]
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(ids[0])  # the store holds two
    assert (await c.responses.retrieve(ids[2])).output_text == "z"


async def test_structured_output_and_limits(router_url, fake_backend):
    c = client(router_url)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = await c.responses.create(model="tiny", input=said('{"ok": true}'), text={"format": {
        "type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert json.loads(r.output_text) == {"ok": True}
    assert json.loads(fake_backend.requests[-1].sampling.grammar)["grammars"]
    r = await c.responses.create(model="tiny", input=said("a long answer"),
                                 max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "a lo"
    for kwargs, param in [
        ({"text": {"format": {"type": "json_schema", "name": "x",
                              "schema": {"type": "bogus"}}}}, "text.format.schema.type"),
        ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                     "arguments": "not json"}]}, "input[0].arguments"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [TOOL]}, "tool_choice"),
        ({"background": True}, "background"),
        ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"extra_body": {"thinking_token_budget": -1}}, "thinking_token_budget"),
    ]:
        args = {"model": "tiny", "input": "hi"} | kwargs
        with pytest.raises(openai.BadRequestError) as info:
            await c.responses.create(**args)
        assert info.value.body["param"] == param, info.value.body
