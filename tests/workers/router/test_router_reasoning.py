"""Reasoning effort and budgets, snapshot points and continuous usage through the official
openai client against the fake backend (what reaches the workers), and message boundaries
on the demo model's real chat template."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from baton.operator.spec import ReasoningSpec
from baton.workers.router.server import RouterSettings
from baton.workers.router.tokenization import CheckpointTokenizer, message_boundaries

DEMO = Path(__file__).resolve().parents[3] / "examples" / "demo"
THINK = {"chat_template_kwargs": {"enable_thinking": True}}


@pytest.fixture
async def router_url(start_router):
    return await start_router(RouterSettings(
        served_model_name="tiny", max_model_len=512, request_timeout_s=5.0,
        reasoning=ReasoningSpec(low_tokens=7, high_tokens=300, default_effort="low")))


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


def lark(fake_backend) -> str | None:
    grammar = fake_backend.requests[-1].sampling.grammar
    return json.loads(grammar)["grammars"][0]["lark_grammar"] if grammar else None


async def test_effort_and_budget_bound_the_reasoning(router_url, fake_backend):
    c = client(router_url)
    msgs = [{"role": "user", "content": "hi"}]
    await c.chat.completions.create(model="tiny", messages=msgs, extra_body=THINK)
    assert "think_text[max_tokens=7]" in lark(fake_backend)  # the default effort, low
    await c.chat.completions.create(model="tiny", messages=msgs, extra_body=THINK,
                                    reasoning_effort="high")
    assert "think_text[max_tokens=300]" in lark(fake_backend)
    await c.chat.completions.create(model="tiny", messages=msgs, reasoning_effort="high",
                                    extra_body={**THINK, "thinking_token_budget": 3})
    assert "think_text[max_tokens=3]" in lark(fake_backend)
    await c.responses.create(model="tiny", input="hi", reasoning={"effort": "high"},
                             extra_body=THINK)
    assert "think_text[max_tokens=300]" in lark(fake_backend)
    # none: thinking off in the template, nothing to bound.
    await c.chat.completions.create(model="tiny", messages=msgs, reasoning_effort="none")
    assert lark(fake_backend) is None
    assert bytes(fake_backend.requests[-1].prompt_ids).decode().endswith("<nothink>")
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model="tiny", messages=msgs, reasoning_effort="max")
    assert info.value.body["param"] == "reasoning_effort"


async def test_snapshot_points_and_continuous_usage(router_url, fake_backend):
    c = client(router_url)
    await c.completions.create(model="tiny", prompt="hello there", max_tokens=2,
                               extra_body={"snapshot_points": [3, 6]})
    assert fake_backend.requests[-1].snapshot_points == (3, 6)
    for bad in ([6, 3], [0], [40]):
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model="tiny", prompt="hello there", max_tokens=2,
                                       extra_body={"snapshot_points": bad})
        assert info.value.body["param"] == "snapshot_points"
    chunks = [ch async for ch in await c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "olleh"}], stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})]
    counted = [ch.usage.completion_tokens for ch in chunks if ch.choices]
    assert len(counted) > 3 and counted == sorted(counted)
    assert chunks[-1].usage.completion_tokens == counted[-1] == len("hello") + 1


def test_message_boundaries_on_the_demo_template():
    """A tool loop's next prompt keeps every message before the generation prompt: the last
    boundary of a turn is a prefix of the next turn's prompt, which its own prompt is not
    (thinking on: `<think>\\n` then, `<think></think>` in the history)."""
    tok = CheckpointTokenizer(DEMO)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"}]
    turn1 = tok.render_chat(msgs, {})
    ids1 = tok.encode(turn1, False)
    points = message_boundaries(tok, msgs, {}, turn1, ids1)
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}]}
    msgs2 = [*msgs, call, {"role": "tool", "tool_call_id": "c", "content": "5"}]
    turn2 = tok.render_chat(msgs2, {})
    ids2 = tok.encode(turn2, False)
    assert ids2[:len(ids1)] != ids1  # the previous prompt is no prefix
    assert points and points[-1] < len(ids1) and ids2[:points[-1]] == ids1[:points[-1]]
    assert len(ids1) - points[-1] <= 5  # only the generation prompt is lost
    points2 = message_boundaries(tok, msgs2, {}, turn2, ids2)
    assert points[-1] in points2 and len(points2) >= 3
