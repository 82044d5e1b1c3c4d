"""Agent traffic on the demo model with its defaults (thinking on), through `baton up
examples/demo.yaml` (real processes, 1 prefill + 1 decode worker, decode speculating with
MTP) and the official openai client: forced tool calls and json_schema answers validate,
streamed and not; a reasoning budget bounds the reasoning and the constrained answer still
validates; the Responses API takes the sampling extras; continuous usage stats come on every
chunk; and a thinking-on tool conversation hits the prefix cache at its message boundaries
(snapshot points) every turn, with the outputs of a cache-off run."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
import yaml

from baton.workers.local import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "examples" / "demo.yaml"

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}
QUESTION = [{"role": "user", "content": "What is 17 * 23?"}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0,
                                                      "maximum": 1000000},
                                           "note": {"type": "string", "maxLength": 30}},
          "required": ["answer", "note"]}


@pytest.fixture(scope="module")
def client(e2e):
    up, ready, _ = e2e.start_baton_up(DEMO_YAML, free_port())
    try:
        yield openai.OpenAI(base_url=ready["url"], api_key="none", max_retries=0, timeout=300)
    finally:
        e2e.stop_baton_up(up)


def chat(client, stream: bool, **kwargs):
    if not stream:
        return client.chat.completions.create(model="demo", messages=QUESTION, **kwargs)
    with client.chat.completions.stream(model="demo", messages=QUESTION,
                                        stream_options={"include_usage": True},
                                        **kwargs) as s:
        for _ in s:
            pass
        return s.get_final_completion()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "calculator"}}])
def test_forced_tool_calls_are_valid_calls(client, stream, tool_choice):
    out = chat(client, stream, tools=[CALCULATOR], tool_choice=tool_choice, max_tokens=400)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculator"
    jsonschema.validate(json.loads(call.function.arguments),
                        CALCULATOR["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("budget", [0, 16, "minimal"])
def test_json_schema_answers_validate_within_the_reasoning_budget(client, stream, budget):
    """The demo model alone reasons to max_tokens here: the budget is what ends it (effort
    minimal: spec.router.reasoning.minimalTokens, 128 by default)."""
    if budget == "minimal":
        extra, budget = {"reasoning_effort": "minimal"}, 128
    else:
        extra = {"thinking_token_budget": budget}
    out = chat(client, stream, max_tokens=600, extra_body=extra, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    jsonschema.validate(value, {**SCHEMA, "additionalProperties": False})
    # The reasoning tokens and the close that ended them.
    assert out.usage.completion_tokens_details.reasoning_tokens <= budget + 1


def test_reasoning_effort_none_turns_thinking_off(client):
    out = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=60,
                                         reasoning_effort="none")
    assert out.usage.completion_tokens_details.reasoning_tokens == 0
    assert not getattr(out.choices[0].message, "reasoning_content", None)


def test_responses_take_the_sampling_extras_and_usage_streams_on_every_chunk(client):
    r = client.responses.create(model="demo", input="Count: 1 2 3", max_output_tokens=12,
                                reasoning={"effort": "none"},
                                extra_body={"ignore_eos": True, "top_k": 5, "min_tokens": 12})
    assert r.usage.output_tokens == 12 and r.status == "incomplete"
    chunks = list(client.chat.completions.create(
        model="demo", messages=QUESTION, max_tokens=10, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices and all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens


STEPS = [("12 * 7", "84"), ("84 + 5", "89"), ("89 * 2", "178"), ("178 - 9", "169"),
         ("169 / 13", "13")]


def conversation() -> list[list[dict]]:
    """The messages of turns 1..6: a question, then one tool round trip per turn."""
    messages: list[dict] = [{"role": "user", "content": "Compute ((12 * 7 + 5) * 2 - 9) / 13 "
                                                        "step by step with the calculator."}]
    turns = [list(messages)]
    for i, (expression, result) in enumerate(STEPS):
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{i}", "type": "function",
                "function": {"name": "calculator",
                             "arguments": f'{{"expression": "{expression}"}}'}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": result}]
        turns.append(list(messages))
    return turns


def run(client) -> list[tuple[int, int, str, str]]:
    """(prompt tokens, cached tokens, reasoning, answer) of every turn."""
    out = []
    for messages in conversation():
        r = client.chat.completions.create(model="demo", messages=messages,
                                           tools=[CALCULATOR], max_tokens=24, temperature=0)
        m = r.choices[0].message
        out.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens,
                    getattr(m, "reasoning_content", None) or "",
                    str(m.content) + str([c.function.arguments for c in m.tool_calls or []])))
    return out


def test_message_boundary_snapshots_hit_every_turn_and_change_no_output(client, e2e,
                                                                         tmp_path):
    """The demo template renders each earlier assistant turn `<think></think>...` where the
    previous prompt ended in the generation prompt's `<think>\\n`; the turns are fixed
    (hand-built tool calls and results, as an agent framework sends them: no reasoning echoed
    back), under 1024 tokens."""
    on = run(client)
    doc = yaml.safe_load(DEMO_YAML.read_text())
    doc["spec"]["source"]["uri"] = str(REPO / "examples" / "demo")
    doc["spec"]["engine"]["prefixCache"] = {"enabled": False}
    off_yaml = tmp_path / "demo-cache-off.yaml"
    off_yaml.write_text(yaml.safe_dump(doc))
    up, ready, _ = e2e.start_baton_up(off_yaml, free_port())
    try:
        off = run(openai.OpenAI(base_url=ready["url"], api_key="none", max_retries=0,
                                timeout=300))
    finally:
        e2e.stop_baton_up(up)
    prompts = [p for p, _, _, _ in on]
    assert prompts[-1] < 1024 and prompts == sorted(prompts)
    for turn in range(1, len(on)):
        assert on[turn][1] >= 0.9 * prompts[turn - 1], (turn, on)
    assert all(c == 0 for _, c, _, _ in off)
    assert [t[2:] for t in on] == [t[2:] for t in off]
