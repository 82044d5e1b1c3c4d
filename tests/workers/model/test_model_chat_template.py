"""The Nemotron 3 chat template: golden renderings of tools, tool calls, tool results and
reasoning, the same with and without trim_blocks / lstrip_blocks."""

from __future__ import annotations

import json

import jinja2
import pytest

from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE, TOOLS_FOOTER
from baton.workers.text.tokenizer import _compile_template

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression. ",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "for example 3 + 4"},
                "digits": {"type": "integer", "enum": [0, 1, 2]},
            },
            "required": ["expression"],
        },
    },
}


def _render(messages, **kwargs) -> str:
    """Renders with baton's environment and with both plain jinja2 settings; all must agree."""
    out = _compile_template(NEMOTRON3_CHAT_TEMPLATE).render(messages=messages, **kwargs)
    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False)
        assert env.from_string(NEMOTRON3_CHAT_TEMPLATE).render(messages=messages, **kwargs) == out
    return out


def test_plain_chat_always_has_a_system_turn():
    text = _render([{"role": "user", "content": " Hi "}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n")
    off = _render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  add_generation_prompt=True, enable_thinking=False)
    assert off == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n<think></think>")


def test_tools_follow_the_system_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = _render(messages, tools=[CALCULATOR], add_generation_prompt=True)
    assert text.startswith(
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou have access to the following "
        "functions:\n\n<tools>\n<function>\n<name>calculator</name>\n<description>Evaluate an "
        "arithmetic expression.</description>\n<parameters>\n<parameter>\n<name>digits</name>\n"
        "<type>integer</type>\n<enum>[0, 1, 2]</enum>\n</parameter>\n<parameter>\n"
        "<name>expression</name>\n<type>string</type>\n<description>for example 3 + 4"
        "</description>\n</parameter>\n<required>[\"expression\"]</required>\n</parameters>\n"
        "</function>\n</tools>" + TOOLS_FOOTER + "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
    # Without a system prompt the tools open the system turn.
    bare = _render([{"role": "user", "content": "2+2?"}], tools=[CALCULATOR])
    assert bare.startswith("<|im_start|>system\n# Tools\n")


def test_tool_calls_results_and_reasoning_of_earlier_turns():
    call = {"id": "call_1", "type": "function", "function": {
        "name": "calculator",
        "arguments": {"expression": "3 + 4", "digits": 0, "exact": True, "opts": {"a": [1]}}}}
    messages = [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": None, "reasoning_content": "Use the tool.",
         "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"},
        {"role": "tool", "tool_call_id": "call_2", "content": "8"},
        {"role": "assistant", "content": "It is 7.", "reasoning_content": "The tool said 7."},
    ]
    latest = _render(messages)
    # After the last user turn, reasoning is kept.
    assert latest == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nUse the tool.\n</think>\n<tool_call>\n"
        "<function=calculator>\n<parameter=expression>\n3 + 4\n</parameter>\n"
        "<parameter=digits>\n0\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n"
        "<parameter=opts>\n{\"a\": [1]}\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n7\n</tool_response>\n<tool_response>\n8\n"
        "</tool_response>\n<|im_end|>\n<|im_start|>assistant\n<think>\nThe tool said 7.\n"
        "</think>\nIt is 7.<|im_end|>\n")
    # Once a later user turn exists, earlier reasoning is dropped (markup in content too).
    later = _render([*messages[:4],
                     {"role": "assistant",
                      "content": "<think>\nThe tool said 7.\n</think>\nIt is 7."},
                     {"role": "user", "content": "Thanks"}], add_generation_prompt=True)
    assert "Use the tool." not in later and "The tool said 7." not in later
    assert ("<|im_start|>assistant\n<think></think>\n<tool_call>\n<function=calculator>"
            in later)
    assert "<|im_start|>assistant\n<think></think>It is 7.<|im_end|>\n" in later
    assert later.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("content", ["Plain answer.", ""])
def test_assistant_without_reasoning_gets_an_empty_think(content):
    text = _render([{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
    assert text.endswith(f"<|im_start|>assistant\n<think></think>{content}<|im_end|>\n")
