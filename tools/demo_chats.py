"""The tool-use half of the demo model's training data: seeded synthetic chats in which a user
asks an arithmetic question, the assistant calls `calculator(expression)`, the tool's result
comes back as a `tool` message, and the assistant answers with it.

Chats are OpenAI-shaped messages (assistant `tool_calls` with mapping arguments, `tool`
results, `reasoning_content`) plus the request's `tools`; the trainer renders them with the
checkpoint's own chat template (the Nemotron 3 format), so training text is exactly what the
router renders when it serves a request.

What the model has to learn is copying, not arithmetic: the digits of the question into the
call (digits are single tokens, so a number is copied digit by digit) and the tool's result
into the answer. Results are computed by the real tool (examples/agent.py's calculator).
Integers whose hash falls in a fixed bucket (is_held_out) never appear in a training chat, as
an operand or as an integer result; evaluation questions use only those as operands, so they
test the copying of numbers the model never saw.

Echo chats (make_echo_chat) are the third part of the mix: a user asks, in varied wording, to
have one to three numbers repeated, and the assistant writes them back. No tool, a few dozen
tokens each: the copying alone, many times per step.
"""

from __future__ import annotations

import importlib.util
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

_AGENT_PATH = Path(__file__).resolve().parents[1] / "examples" / "agent.py"


def _load_agent():
    # The tool the model is trained to call is the one the agent example sends and runs.
    spec = importlib.util.spec_from_file_location("baton_example_agent", _AGENT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_agent = _load_agent()
CALCULATOR = _agent.CALCULATOR
calculator = _agent.calculator

# One number in HELD_OUT_BUCKETS never appears in training chats.
HELD_OUT_BUCKETS = 8


def is_held_out(number: int) -> bool:
    """Whether `number` is reserved for evaluation (never in a training chat)."""
    return zlib.crc32(str(number).encode()) % HELD_OUT_BUCKETS == 0


def draw_number(rng: random.Random, held_out: bool = False, low_digits: int = 1,
                high_digits: int = 5) -> int:
    """A number of low..high_digits digits (each length equally likely), from the training or
    the held-out side of the split."""
    while True:
        digits = rng.randint(low_digits, high_digits)
        value = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)
        if is_held_out(value) == held_out:
            return value


# Question wordings per operation; {a} and {b} are the operands in the expression's order.
WORDINGS = {
    "+": [
        "What is {a} plus {b}?", "What's {a} + {b}?", "Add {a} and {b}.", "Calculate {a} + {b}.",
        "What is the sum of {a} and {b}?", "How much is {a} added to {b}?", "{a} + {b} = ?",
        "Please add {b} to {a}.", "Compute {a}+{b}", "what is {a} plus {b}",
        "I had {a} coins and found {b} more. How many coins do I have now?",
        "A shop sold {a} books on Monday and {b} on Tuesday. How many books in total?",
        "Can you tell me the total of {a} and {b}?", "Sum {a} and {b} for me, please.",
    ],
    "-": [
        "What is {a} minus {b}?", "What's {a} - {b}?", "Subtract {b} from {a}.",
        "Calculate {a} - {b}.", "What is the difference between {a} and {b}?",
        "How much is {a} take away {b}?", "{a} - {b} = ?", "Compute {a}-{b}",
        "what is {a} minus {b}", "I had {a} dollars and spent {b}. How much is left?",
        "A tank holds {a} liters and {b} liters leak out. How much remains?",
        "Take {b} away from {a}. What do you get?",
    ],
    "*": [
        "What is {a} times {b}?", "What's {a} * {b}?", "Multiply {a} by {b}.",
        "Calculate {a} * {b}.", "What is the product of {a} and {b}?", "{a} x {b} = ?",
        "Compute {a}*{b}", "what is {a} multiplied by {b}", "How much is {a} times {b}?",
        "There are {a} boxes with {b} apples in each. How many apples are there?",
        "A ticket costs {b} dollars. What do {a} tickets cost?",
        "Can you multiply {a} and {b} for me?",
    ],
    "/": [
        "What is {a} divided by {b}?", "What's {a} / {b}?", "Divide {a} by {b}.",
        "Calculate {a} / {b}.", "What is the quotient of {a} and {b}?", "{a} / {b} = ?",
        "Compute {a}/{b}", "what is {a} over {b}", "How much is {a} divided by {b}?",
        "Share {a} candies equally among {b} children. How many does each child get?",
        "A rope of {a} meters is cut into {b} equal pieces. How long is each piece?",
    ],
}
OPENINGS = ["", "", "", "", "Hi! ", "Hello, ", "Quick question: ", "Hey, ", "Please help: "]
CLOSINGS = ["", "", "", "", " Thanks!", " Thank you.", " Use the calculator."]
SYSTEM_PROMPTS = [None, None, "You are a helpful assistant.",
                  "You are a helpful assistant with access to a calculator.",
                  "Answer briefly."]
# Reasoning stays short (a few tokens of every exchange) and does not name the operation: the
# model decides it in the call, right after copying the first operand, where the question's
# operator (a symbol, or the word next to the numbers) is at hand. Reasoning that named it
# ("I will call the calculator to divide.") moved the decision to where nothing in the
# question lines up with it, and the model trained that way called `50501 / 7523` for
# "Compute 50501+7523": the call copied the reasoning's operation, not the question's.
CALL_REASONING = [
    "I need the calculator for this.",
    "Let me use the calculator.",
    "I will call the calculator.",
]
ANSWER_REASONING = ["I have the result.", "The tool answered."]
ANSWERS = [
    "The answer is {r}.", "{e} = {r}", "{e} = {r}.", "It is {r}.", "The result is {r}.",
    "That comes to {r}.", "{r}", "The calculator says {e} = {r}.",
]


@dataclass
class Question:
    """An arithmetic question and the call that answers it."""

    text: str
    expression: str
    a: int
    b: int
    op: str

    @property
    def result(self) -> str:
        return calculator(self.expression)


def make_question(rng: random.Random, held_out: bool = False) -> Question:
    """A question in one of the WORDINGS with operands from the training (or held-out) side."""
    op = rng.choice("+-*/")
    a = draw_number(rng, held_out)
    b = draw_number(rng, held_out, high_digits=3 if op in "*/" else 5)
    while op == "/" and b == 0:
        b = draw_number(rng, held_out, high_digits=3)
    result = calculator(f"{a} {op} {b}")
    if not held_out and re.fullmatch(r"-?\d+", result) and is_held_out(int(result)):
        return make_question(rng, held_out)  # no held-out number in a training chat at all
    wording = rng.choice(WORDINGS[op])
    text = rng.choice(OPENINGS) + wording.format(a=a, b=b) + rng.choice(CLOSINGS)
    return Question(text.strip(), f"{a} {op} {b}", a, b, op)


def _call(index: int, expression: str) -> dict:
    return {"id": f"call_{index}", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": expression}}}


def _exchange(rng: random.Random, question: Question, index: int, thinking: bool,
              keep_call_reasoning: bool) -> list[dict]:
    """The user turn, the call, the tool result and the answer of one question."""
    call = {"role": "assistant", "content": None, "tool_calls": [_call(index, question.expression)]}
    answer = {"role": "assistant",
              "content": rng.choice(ANSWERS).format(e=question.expression, r=question.result)}
    if thinking:
        if keep_call_reasoning:
            call["reasoning_content"] = rng.choice(CALL_REASONING)
        answer["reasoning_content"] = rng.choice(ANSWER_REASONING)
    return [{"role": "user", "content": question.text}, call,
            {"role": "tool", "tool_call_id": f"call_{index}", "content": question.result},
            answer]


@dataclass
class Chat:
    """One training conversation: what the template renders."""

    messages: list[dict]
    tools: list[dict]
    enable_thinking: bool


def make_chat(rng: random.Random, held_out: bool = False) -> Chat:
    """One to six questions in a conversation. With thinking on (the generation prompt's
    default), assistant turns carry short reasoning; clients often send the call turn back
    without it, so some chats drop it there (the template then renders `<think></think>`)."""
    thinking = rng.random() < 0.8
    messages: list[dict] = []
    system = rng.choice(SYSTEM_PROMPTS)
    if system:
        messages.append({"role": "system", "content": system})
    # Several questions per chat share the cost of the (long) system turn with the tools.
    turns = rng.choices([1, 2, 3, 4, 5, 6], weights=[1, 1, 2, 2, 2, 2])[0]
    for index in range(turns):
        messages += _exchange(rng, make_question(rng, held_out), index, thinking,
                              keep_call_reasoning=rng.random() < 0.7)
    return Chat(messages, [CALCULATOR], thinking)


ECHO_WORDINGS = [
    "Repeat after me: {x}", "Say {x}.", "Please write {x} back to me.", "Echo {x}",
    "Copy this exactly: {x}", "Type {x}", "Can you repeat {x}?", "Write down {x} for me.",
    "Read back {x}", "My number is {x}. Say it back.",
]


def make_echo_chat(rng: random.Random, held_out: bool = False) -> Chat:
    """A short chat without tools in which the assistant repeats what the user wrote: one to
    three numbers, some joined by operators. Dense copying (a few tokens of context per copied
    digit) that the tool chats need and give little of. (The shipped run used them with
    lr 1e-3; how much they add on their own was not measured apart.)"""
    numbers = [str(draw_number(rng, held_out)) for _ in range(rng.randint(1, 3))]
    x = numbers[0]
    for number in numbers[1:]:
        x += rng.choice([" ", ", ", " + ", " - ", " * ", " / "]) + number
    wording = rng.choice(ECHO_WORDINGS)
    answer = rng.choice(["{x}", "{x}", "{x}.", "Sure: {x}"]).format(x=x)
    return Chat([{"role": "user", "content": wording.format(x=x)},
                 {"role": "assistant", "content": answer}], [], rng.random() < 0.8)


def echo_chats(seed: int, held_out: bool = False):
    """An endless, reproducible stream of echo chats."""
    rng = random.Random(seed)
    while True:
        yield make_echo_chat(rng, held_out)


def chats(seed: int, held_out: bool = False):
    """An endless, reproducible stream of chats."""
    rng = random.Random(seed)
    while True:
        yield make_chat(rng, held_out)


def held_out_questions(seed: int, count: int) -> list[Question]:
    """`count` evaluation questions whose numbers no training chat contains."""
    rng = random.Random(seed)
    return [make_question(rng, held_out=True) for _ in range(count)]
