"""Snapshot points: a thinking-on agent conversation of under 1024 tokens (the demo template
renders each earlier assistant turn `<think></think>...`, where the previous prompt ended in
the generation prompt's `<think>\\n`) hits the prefix cache at the last message boundary from
turn 2 on, through `baton up examples/demo.yaml` (1 prefill + 1 decode worker, MTP on), and
every turn's output equals a cache-off run's. The turns are fixed (hand-built assistant tool
calls and tool results, as an agent framework sends them: no reasoning echoed back)."""

from __future__ import annotations

from pathlib import Path

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


def run(e2e, spec: Path) -> list[tuple[int, int, str, str]]:
    """(prompt tokens, cached tokens, reasoning, answer) of every turn."""
    up, ready, _ = e2e.start_baton_up(spec, free_port())
    try:
        client = openai.OpenAI(base_url=ready["url"], api_key="none", max_retries=0,
                               timeout=300)
        out = []
        for messages in conversation():
            r = client.chat.completions.create(model="demo", messages=messages,
                                               tools=[CALCULATOR], max_tokens=24,
                                               temperature=0)
            m = r.choices[0].message
            out.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens,
                        getattr(m, "reasoning_content", None) or "", str(m.content) +
                        str([c.function.arguments for c in m.tool_calls or []])))
        return out
    finally:
        e2e.stop_baton_up(up)


def test_message_boundary_snapshots_hit_every_turn_and_change_no_output(e2e, tmp_path):
    doc = yaml.safe_load(DEMO_YAML.read_text())
    doc["spec"]["source"]["uri"] = str(REPO / "examples" / "demo")
    doc["spec"]["engine"]["prefixCache"] = {"enabled": False}
    off_yaml = tmp_path / "demo-cache-off.yaml"
    off_yaml.write_text(yaml.safe_dump(doc))
    on = run(e2e, DEMO_YAML)
    off = run(e2e, off_yaml)
    prompts = [p for p, _, _, _ in on]
    assert prompts[-1] < 1024 and prompts == sorted(prompts)
    for turn in range(1, len(on)):
        cached = on[turn][1]
        assert cached >= 0.9 * prompts[turn - 1], (turn, on)
    assert all(c == 0 for _, c, _, _ in off)
    assert [t[2:] for t in on] == [t[2:] for t in off]
