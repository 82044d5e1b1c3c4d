"""The trained demo model through baton's engine: it answers arithmetic questions with
numbers it never saw by calling the calculator (the prompt rendered by the checkpoint's chat
template with the tool, as the router renders it), and speculation never changes its greedy
output."""

from __future__ import annotations

from pathlib import Path

import demo_chats
import demo_corpus
import demo_eval
import pytest
import torch

from baton.workers.model import load_model
from baton.workers.text.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"

@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, dtype=torch.float32), load_tokenizer(DEMO)


def test_parse_tool_calls():
    text = ("<tool_call>\n<function=calculator>\n<parameter=expression>\n12 * 3\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=f>\n<parameter=a>\nx\ny\n"
            "</parameter>\n<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>")
    assert demo_eval.parse_tool_calls(text) == [("calculator", {"expression": "12 * 3"}),
                                                ("f", {"a": "x\ny", "b": "2"})]
    assert demo_eval.parse_tool_calls("The answer is 4.") == []


def test_calculator_agent_on_unseen_numbers(demo):
    model, tokenizer = demo
    engine = demo_eval.make_engine(model, tokenizer)
    questions = demo_chats.held_out_questions(seed=7, count=10)
    results = [demo_eval.run_agent(engine, tokenizer, q) for q in questions]
    wrong = [(r.question.text, r.expression, r.answer) for r in results if not r.correct]
    assert len(wrong) <= 1, wrong


def test_speculation_keeps_greedy_output(demo):
    model, tokenizer = demo
    source = demo_corpus.read_source(demo_corpus.held_out_files()[0])
    prompts = [tokenizer.encode(source)[:96]]
    figures = demo_eval.speculation_figures(model, tokenizer, prompts, max_tokens=24)
    assert figures[1]["outputs"] == figures[0]["outputs"] == figures[2]["outputs"]
    assert figures[2]["drafted"] > 0 and figures[2]["accepted"] > 0
