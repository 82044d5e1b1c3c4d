"""Markup in grammars, reasoning budgets and strict schemas, checked with llguidance's own
matcher on real tokenizers: the demo's (`<think>`, `</think>`, `<tool_call>` are added tokens
with `special: false`) and the tiny model's with the markup added as special tokens; thinking
on and off. The texts are what the chat template renders, tokenized as the model sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer as Backend

from baton.workers.router.grammar import GrammarCompiler, OutputFormat, closed_schema
from baton.workers.router.tokenization import CheckpointTokenizer, markup_tokens
from baton.workers.router.tools import ToolChoice, parse_tools

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo"
TINY = ROOT / "examples" / "tiny"
CALCULATOR = parse_tools([{"type": "function", "function": {
    "name": "calculator", "parameters": {"type": "object", "properties": {
        "expression": {"type": "string"}, "digits": {"type": "integer"}},
        "required": ["expression"]}}}])
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"},
                                           "unit": {"type": "object", "properties": {
                                               "name": {"type": "string"}}}},
          "required": ["answer"]}


@pytest.fixture(scope="module")
def demo() -> CheckpointTokenizer:
    return CheckpointTokenizer(DEMO)


def assistant_turn(tok: CheckpointTokenizer, thinking: bool) -> tuple[str, str]:
    """(the generation prompt's end, the answer a model trained on the template writes) for
    one calculator call, as the template renders them."""
    msgs = [{"role": "user", "content": "What is 6 * 7?"}]
    kwargs = {"tools": [t.template_dict() for t in CALCULATOR], "enable_thinking": thinking}
    prompt = tok.render_chat(msgs, kwargs)
    call = {"role": "assistant", "content": "", "reasoning_content": "I will call it.",
            "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "calculator", "arguments": {"expression": "6 * 7", "digits": 2}}}]}
    full = tok.render_chat([*msgs, call], {**kwargs, "add_generation_prompt": False})
    head = "<|im_start|>assistant\n<think>\n"
    answer = full[full.rindex(head) + len(head):].split("<|im_end|>")[0]
    assert answer.startswith("I will call it.")
    if not thinking:  # the prompt closed the reasoning itself
        assert prompt.endswith("</think>")
        answer = answer.split("</think>", 1)[1]
    return prompt, answer


def accepts(compiler, grammar: str, ids: list[int]) -> bool:
    m = LLMatcher(compiler.tokenizer, grammar, log_level=0)
    return m.consume_tokens(ids) and m.is_accepting() and not m.is_error()


def test_single_token_markup_is_a_token_reference_whatever_its_special_flag(demo):
    added = json.loads((DEMO / "tokenizer.json").read_text())["added_tokens"]
    flags = {t["content"]: t["special"] for t in added}
    assert flags["</think>"] is False and flags["<tool_call>"] is False
    compiler = demo.grammar_compiler()
    ids = {m: demo.encode(m, False) for m in ("</think>", "<tool_call>", "</parameter>")}
    assert all(len(v) == 1 for v in ids.values())
    assert {m: compiler.markup[m] for m in ids} == {m: v[0] for m, v in ids.items()}
    # llguidance treats them as special: no text literal matches such a token.
    assert all(compiler.tokenizer.is_special_token(v[0]) for v in ids.values())


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "calculator")])
def test_forced_calls_accept_what_the_demo_template_renders(demo, thinking, choice):
    prompt, answer = assistant_turn(demo, thinking)
    in_reasoning = prompt.rfind("<think>") > prompt.rfind("</think>")
    assert in_reasoning == thinking
    compiler = demo.grammar_compiler()
    g = compiler.compile(None, CALCULATOR, choice, True, in_reasoning)
    ids = demo.encode(answer, False)
    assert demo.encode("<tool_call>", False)[0] in ids
    assert accepts(compiler, g, ids), answer
    assert not accepts(compiler, g, demo.encode(answer.replace("calculator", "calc"), False))


def test_markup_that_is_special_in_tokenizer_json_too(tmp_path):
    """The tiny tokenizer spells the markup in pieces; with it added as special tokens the
    grammar references them, and the think close stays allowed in the reasoning."""
    base = Backend.from_file(str(TINY / "tokenizer.json"))
    base.add_special_tokens(["</think>", "<tool_call>", "</tool_call>"])
    tok = LLTokenizer(base.to_str(), n_vocab=base.get_vocab_size())
    markup = markup_tokens(lambda t: base.encode(t, add_special_tokens=False).ids,
                           tok.is_special_token)
    assert set(markup) == {"</think>", "<tool_call>", "</tool_call>"}
    plain = markup_tokens(lambda t: Backend.from_file(str(TINY / "tokenizer.json")).encode(
        t, add_special_tokens=False).ids, tok.is_special_token)
    assert plain == {}  # spelled in pieces: text
    compiler = GrammarCompiler(tok, markup)
    g = compiler.compile(OutputFormat("json_object"), [], ToolChoice("none"), True, True)
    ids = base.encode('hm, a number\n</think>\n{"a": 1}', add_special_tokens=False).ids
    assert markup["</think>"] in ids
    assert accepts(compiler, g, ids)


@pytest.mark.parametrize("budget", [0, 1, 5, 12])
def test_a_reasoning_budget_forces_the_close_then_the_answer(demo, budget):
    compiler = demo.grammar_compiler()
    close = compiler.markup["</think>"]
    g = compiler.compile(OutputFormat("json_schema", SCHEMA), [], ToolChoice("none"), True,
                         True, reasoning_budget=budget)
    words = demo.encode(" let me think about this for a long while, step by step, carefully", False)
    assert len(words) > 12
    m = LLMatcher(compiler.tokenizer, g, log_level=0)
    assert m.consume_tokens(words[:budget])
    # Spent: only the close may follow.
    assert m.compute_ff_tokens() == [close] or not m.try_consume_tokens([words[budget]])
    assert m.consume_tokens([close] + demo.encode('\n{"answer": 42}', False))
    assert m.is_accepting()
    # Without a format, the budget alone bounds the reasoning; anything may follow.
    free = compiler.compile(None, CALCULATOR, ToolChoice("auto"), True, True,
                            reasoning_budget=budget)
    _, answer = assistant_turn(demo, True)
    after = demo.encode(answer.split("</think>", 1)[1], False)
    assert accepts(compiler, free, words[:budget] + [close] + after)
    m = LLMatcher(compiler.tokenizer, free, log_level=0)
    assert m.consume_tokens(words[:budget]) and not m.try_consume_tokens([words[budget]])
    # No budget and thinking off: nothing to constrain.
    assert compiler.compile(None, CALCULATOR, ToolChoice("auto"), True, False,
                            reasoning_budget=budget) is None


def test_strict_json_schema_closes_objects(demo):
    compiler = demo.grammar_compiler()
    extra = '{"answer": 1, "unit": {"name": "m", "x": 2}}'
    for strict, ok in ((True, False), (False, True)):
        g = compiler.compile(OutputFormat("json_schema", SCHEMA, strict=strict), [],
                             ToolChoice("none"), True, False)
        assert accepts(compiler, g, demo.encode(extra, False)) is ok
        assert accepts(compiler, g, demo.encode('{"answer": 1}', False))
    closed = closed_schema({"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "object", "properties": {}}}}, "additionalProperties": True})
    assert closed["additionalProperties"] is True  # what the schema says stands
    assert closed["properties"]["a"]["items"]["additionalProperties"] is False
