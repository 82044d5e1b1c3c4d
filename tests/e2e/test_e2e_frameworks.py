"""The agent frameworks people use, unchanged, against `baton up examples/demo.yaml` (thinking
on, as the template ships; the demo Model bounds reasoning with defaultEffort minimal): an
openai-agents agent with a calculator tool (Chat Completions and Responses models, streamed
and not), each library's default structured output (pydantic-ai's output tool, LangChain's
function_calling and json_schema, instructor's TOOLS mode) and litellm's forced tool call
return valid objects. The libraries come with the `agents` extra."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from baton.workers.local import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "examples" / "demo.yaml"

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
QUESTION = "What is 17 * 23?"


class Answer(BaseModel):
    answer: int = Field(ge=0, le=1_000_000)


@pytest.fixture(scope="module")
def url(e2e):
    up, ready, _ = e2e.start_baton_up(DEMO_YAML, free_port())
    try:
        yield ready["url"]
    finally:
        e2e.stop_baton_up(up)


def load_agent_example():
    spec = importlib.util.spec_from_file_location("agent_example", REPO / "examples" / "agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AGENT = load_agent_example()  # its calculator tool: schema and implementation


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_runner_calls_the_calculator(url, api, streamed):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    model = (agents.OpenAIChatCompletionsModel if api == "chat"
             else agents.OpenAIResponsesModel)(model="demo", openai_client=client)
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
            return await agents.Runner.run(agent, QUESTION, max_turns=4)
        result = agents.Runner.run_streamed(agent, QUESTION, max_turns=4)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert calls and AGENT.calculator(calls[0]) == "391", calls
    assert isinstance(result.final_output, str) and result.final_output


def test_pydantic_ai_default_structured_output(url):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=url, api_key="none"))
    result = Agent(model, output_type=Answer).run_sync(QUESTION)
    assert isinstance(result.output, Answer)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(url, method):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="demo", base_url=url, api_key="none", max_retries=0, timeout=300)
    out = llm.with_structured_output(Answer, method=method, include_raw=True).invoke(QUESTION)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Answer), out


def test_instructor_tools_mode(url):
    instructor = pytest.importorskip("instructor")
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=url, api_key="none", max_retries=0),
                                    mode=instructor.Mode.TOOLS)
    answer = client.chat.completions.create(model="demo", response_model=Answer,
                                            max_retries=0,
                                            messages=[{"role": "user", "content": QUESTION}])
    assert isinstance(answer, Answer)


def test_litellm_forced_tool_call(url):
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model="openai/demo", api_base=url, api_key="none",
                           messages=[{"role": "user", "content": QUESTION}],
                           tools=[AGENT.CALCULATOR],
                           tool_choice="required")
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "calculator"
    assert "expression" in json.loads(call.function.arguments)
