"""Agent traffic on the demo model with its defaults (thinking on), through `baton up
examples/demo.yaml` (real processes, 1 prefill + 1 decode worker, decode speculating with
MTP) and the official openai client: forced tool calls and json_schema answers validate,
streamed and not; a reasoning budget bounds the reasoning and the constrained answer still
validates; the Responses API takes the sampling extras; continuous usage stats come on every
chunk; a thinking-on tool conversation hits the prefix cache at its message boundaries
(snapshot points) every turn, with the outputs of a cache-off run. And the agent frameworks
people use, unchanged (the `agents` extra; a framework not installed is skipped): an
openai-agents agent with the calculator (Chat Completions and Responses models, streamed and
not, and a multi-turn session that hits the cache every model call), each library's default
structured output (pydantic-ai's output tool, LangChain's function_calling and json_schema,
instructor's TOOLS mode) and litellm's forced tool call return valid objects. The demo Model
bounds reasoning with defaultEffort minimal."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from pathlib import Path

import jsonschema
import openai
import pytest
import yaml
from pydantic import BaseModel, Field

from baton.workers.local import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "examples" / "demo.yaml"

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]



def load_agent_example():
    spec = importlib.util.spec_from_file_location("agent_example", REPO / "examples" / "agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AGENT = load_agent_example()  # its calculator tool: schema and implementation
CALCULATOR = AGENT.CALCULATOR
QUESTION = [{"role": "user", "content": "What is 17 * 23?"}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0,
                                                      "maximum": 1000000},
                                           "note": {"type": "string", "maxLength": 30}},
          "required": ["answer", "note"]}


@pytest.fixture(scope="module")
def client(demo_up):
    return openai.OpenAI(base_url=demo_up["url"], api_key="none", max_retries=0, timeout=300)


@contextlib.contextmanager
def cache_off(e2e, tmp_path):
    """The demo Model with the prefix cache off, up: its API URL."""
    doc = yaml.safe_load(DEMO_YAML.read_text())
    doc["spec"]["source"]["uri"] = str(REPO / "examples" / "demo")
    doc["spec"]["engine"]["prefixCache"] = {"enabled": False}
    off_yaml = tmp_path / "demo-cache-off.yaml"
    off_yaml.write_text(yaml.safe_dump(doc))
    up, ready, _ = e2e.start_baton_up(off_yaml, free_port())
    try:
        yield ready["url"]
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
    with cache_off(e2e, tmp_path) as off_url:
        off = run(openai.OpenAI(base_url=off_url, api_key="none", max_retries=0, timeout=300))
    prompts = [p for p, _, _, _ in on]
    assert prompts[-1] < 1024 and prompts == sorted(prompts)
    for turn in range(1, len(on)):
        assert on[turn][1] >= 0.9 * prompts[turn - 1], (turn, on)
    assert all(c == 0 for _, c, _, _ in off)
    assert [t[2:] for t in on] == [t[2:] for t in off]


# ---- the agent frameworks, unchanged ------------------------------------------------------

ASK = "What is 17 * 23?"


def url(client) -> str:
    return str(client.base_url).rstrip("/")


class Answer(BaseModel):
    answer: int = Field(ge=0, le=1_000_000)


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_runner_calls_the_calculator(client, api, streamed):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    async_client = AsyncOpenAI(base_url=url(client), api_key="none", max_retries=0,
                               timeout=300)
    model = (agents.OpenAIChatCompletionsModel if api == "chat"
             else agents.OpenAIResponsesModel)(model="demo", openai_client=async_client)
    calls = []

    @agents.function_tool
    def calc(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        calls.append(expression)
        return AGENT.calculator(expression)

    calc.name = "calculator"
    agent = agents.Agent(name="calc", instructions="Use the calculator.", model=model,
                         tools=[calc])

    async def run():
        if not streamed:
            return await agents.Runner.run(agent, ASK, max_turns=4)
        result = agents.Runner.run_streamed(agent, ASK, max_turns=4)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert calls and AGENT.calculator(calls[0]) == "391", calls
    assert isinstance(result.final_output, str) and result.final_output


def test_pydantic_ai_default_structured_output(client):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=url(client), api_key="none"))
    result = Agent(model, output_type=Answer).run_sync(ASK)
    assert isinstance(result.output, Answer)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(client, method):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="demo", base_url=url(client), api_key="none", max_retries=0, timeout=300)
    out = llm.with_structured_output(Answer, method=method, include_raw=True).invoke(ASK)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Answer), out


def test_instructor_tools_mode(client):
    instructor = pytest.importorskip("instructor")
    from openai import OpenAI

    patched = instructor.from_openai(OpenAI(base_url=url(client), api_key="none",
                                            max_retries=0), mode=instructor.Mode.TOOLS)
    answer = patched.chat.completions.create(model="demo", response_model=Answer,
                                            max_retries=0,
                                            messages=[{"role": "user", "content": ASK}])
    assert isinstance(answer, Answer)


def test_litellm_forced_tool_call(client):
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model="openai/demo", api_base=url(client), api_key="none",
                           messages=[{"role": "user", "content": ASK}],
                           tools=[AGENT.CALCULATOR],
                           tool_choice="required")
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "calculator"
    assert "expression" in json.loads(call.function.arguments)


def agent_session(base_url: str, api: str) -> tuple[list[tuple[int, int]], list[str]]:
    """Three questions in one openai-agents session (its SQLite memory resends the history,
    tool round trips included), greedy: (prompt tokens, cached tokens) of every model call,
    and the final answers."""
    import agents
    import httpx
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    usage: list[tuple[int, int]] = []

    async def record(response: httpx.Response) -> None:
        await response.aread()
        u = response.json().get("usage") or {}
        details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
        usage.append((u.get("prompt_tokens") or u.get("input_tokens"),
                      details.get("cached_tokens")))

    async def run() -> list[str]:
        http = httpx.AsyncClient(event_hooks={"response": [record]}, timeout=300)
        client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                             http_client=http)
        model = (agents.OpenAIChatCompletionsModel if api == "chat"
                 else agents.OpenAIResponsesModel)(model="demo", openai_client=client)

        @agents.function_tool
        def calculator(expression: str) -> str:
            """Evaluate an arithmetic expression."""
            return AGENT.calculator(expression)

        agent = agents.Agent(name="calc", instructions="Use the calculator for every step.",
                             model=model, tools=[calculator],
                             model_settings=agents.ModelSettings(temperature=0))
        session = agents.SQLiteSession(f"{api}-session")
        answers = []
        for question in ("What is 17 * 23?", "And 391 + 45?", "Now 436 / 4?"):
            result = await agents.Runner.run(agent, question, session=session, max_turns=6)
            answers.append(result.final_output)
        await http.aclose()
        return answers

    return usage, asyncio.run(run())


def test_an_agent_session_hits_the_prefix_cache_every_turn(client, e2e, tmp_path):
    """From the second model call on, the cache covers at least 90% of the previous call's
    prompt (the previous generation prompt is re-rendered; the snapshot at the last message
    boundary hits), and the answers equal a cache-off run's."""
    pytest.importorskip("agents")
    on = {api: agent_session(url(client), api) for api in ("chat", "responses")}
    with cache_off(e2e, tmp_path) as off_url:
        off = {api: agent_session(off_url, api) for api in ("chat", "responses")}
    for api in ("chat", "responses"):
        usage, answers = on[api]
        assert len(usage) >= 6, usage  # several tool round trips
        for (previous, _), (_, cached) in zip(usage, usage[1:]):
            assert cached >= 0.9 * previous, (api, usage)
        assert answers == off[api][1] and all(c == 0 for _, c in off[api][0])
        assert [p for p, _ in usage] == [p for p, _ in off[api][0]]
