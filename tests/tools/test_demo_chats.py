"""The synthetic calculator chats: a real tool, reproducible chats in the Nemotron 3 format,
and held-out numbers that no training chat contains."""

from __future__ import annotations

import itertools
import random
import re

import demo_chats
import pytest

from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE
from baton.workers.text.tokenizer import ByteTokenizer


@pytest.mark.parametrize("expression, value", [
    ("12 * (3 + 4)", "84"), ("7 / 2", "3.5"), ("1 / 3", "0.333333"), ("10 / 4", "2.5"),
    ("5 - 12", "-7"), ("6 / 3", "2"), ("-2 + 0.5", "-1.5"), ("99999 * 999", "99899001"),
])
def test_calculator_computes(expression, value):
    assert demo_chats.calculator(expression) == value


@pytest.mark.parametrize("expression", ["2 ** 3", "__import__('os')", "x + 1", "3 +", "'a' * 3"])
def test_calculator_refuses_anything_but_arithmetic(expression):
    assert demo_chats.calculator(expression).startswith("error: ")


def test_calculator_names_division_by_zero():
    assert demo_chats.calculator("1 / 0") == "error: division by zero"


def numbers_in(chat: demo_chats.Chat) -> set[int]:
    """Every integer written anywhere in the chat (decimal results aside)."""
    found = set()
    for message in chat.messages:
        texts = [message.get("content") or ""]
        texts += [c["function"]["arguments"]["expression"] for c in message.get("tool_calls", [])]
        for text in texts:
            found |= {int(n) for n in re.findall(r"(?<![\d.])-?\d+(?![\d.])", text)}
    return found


def test_chats_are_reproducible_and_never_hold_a_held_out_number():
    first = list(itertools.islice(demo_chats.chats(seed=3), 50))
    again = list(itertools.islice(demo_chats.chats(seed=3), 50))
    assert [c.messages for c in first] == [c.messages for c in again]
    assert [c.messages for c in first] != [
        c.messages for c in itertools.islice(demo_chats.chats(seed=4), 50)]
    seen = set()
    for chat in itertools.islice(demo_chats.chats(seed=0), 2000):
        seen |= numbers_in(chat)
    assert len(seen) > 3000
    assert not [n for n in seen if demo_chats.is_held_out(n)]


def test_held_out_questions_use_only_held_out_numbers():
    questions = demo_chats.held_out_questions(seed=1, count=200)
    for q in questions:
        assert demo_chats.is_held_out(q.a) and demo_chats.is_held_out(q.b)
        assert str(q.a) in q.text and str(q.b) in q.text
        assert q.expression == f"{q.a} {q.op} {q.b}"
    assert {q.op for q in questions} == set("+-*/")


def test_every_wording_names_both_operands():
    for op, wordings in demo_chats.WORDINGS.items():
        for wording in wordings:
            text = wording.format(a=4321, b=87)
            assert "4321" in text and "87" in text, (op, wording)


def test_chats_render_as_nemotron3_tool_calls():
    renderer = ByteTokenizer(chat_template=NEMOTRON3_CHAT_TEMPLATE)
    chat = demo_chats.make_chat(random.Random(5))
    text = renderer.apply_chat_template(chat.messages, add_generation_prompt=False,
                                        tools=chat.tools)
    assert "<name>calculator</name>" in text.split("<|im_end|>")[0]
    calls = [m for m in chat.messages if m.get("tool_calls")]
    results = [m for m in chat.messages if m["role"] == "tool"]
    assert calls and len(calls) == len(results)
    for call, result in zip(calls, results):
        expression = call["tool_calls"][0]["function"]["arguments"]["expression"]
        assert ("<tool_call>\n<function=calculator>\n<parameter=expression>\n"
                f"{expression}\n</parameter>\n</function>\n</tool_call>\n<|im_end|>") in text
        assert result["content"] == demo_chats.calculator(expression)
        assert f"<tool_response>\n{result['content']}\n</tool_response>" in text


def test_echo_chats_repeat_the_users_numbers_and_hold_no_held_out_one():
    first = list(itertools.islice(demo_chats.echo_chats(seed=2), 300))
    assert [c.messages for c in first] == [
        c.messages for c in itertools.islice(demo_chats.echo_chats(seed=2), 300)]
    seen = set()
    for chat in first:
        user, assistant = chat.messages
        assert (user["role"], assistant["role"]) == ("user", "assistant") and not chat.tools
        numbers = re.findall(r"\d+", user["content"])
        assert 1 <= len(numbers) <= 3
        # The answer writes the user's numbers (and operators) in order: a copy, nothing else.
        assert re.findall(r"\d+", assistant["content"]) == numbers
        seen |= {int(n) for n in numbers}
    assert not [n for n in seen if demo_chats.is_held_out(n)]
    held = itertools.islice(demo_chats.echo_chats(seed=2, held_out=True), 100)
    assert all(demo_chats.is_held_out(int(n)) for c in held
               for n in re.findall(r"\d+", c.messages[0]["content"]))


def test_call_reasoning_leaves_the_operation_to_the_call():
    # The operation is decided in the call, after the first operand is copied; reasoning that
    # named it taught the call to copy the reasoning's operation instead of the question's.
    words = re.compile(r"add|plus|sum|subtract|minus|differen|multipl|times|product|divid|"
                       r"quotient|over|[-+*/]")
    reasoned = 0
    for chat in itertools.islice(demo_chats.chats(seed=4), 200):
        for message in chat.messages:
            if message.get("tool_calls") and message.get("reasoning_content"):
                reasoned += 1
                assert not words.search(message["reasoning_content"]), message
    assert reasoned > 100
