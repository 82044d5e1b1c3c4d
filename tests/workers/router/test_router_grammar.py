"""Output grammars (llguidance) checked against texts with llguidance's own matcher, on the
tiny model's tokenizer: what the chat template renders for a call is accepted, what breaks a
schema is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer as Backend

from baton.workers.router.grammar import (
    GrammarCompiler,
    GrammarError,
    OutputFormat,
    build_grammar,
)
from baton.workers.router.tokenization import markup_tokens
from baton.workers.router.tools import FunctionTool, ToolChoice, parse_tools
from baton.workers.text.chat_template import NEMOTRON3_CHAT_TEMPLATE
from baton.workers.text.tokenizer import _compile_template

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}

TOOLS = parse_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"},
            "units": {"type": "string", "enum": ["c", "f"]}, "hourly": {"type": "boolean"},
            "where": {"$ref": "#/$defs/point"}},
        "required": ["city"], "$defs": {"point": {
            "type": "object", "properties": {"lat": {"type": "number"}},
            "required": ["lat"]}}}}},
    {"type": "function", "function": {"name": "anything", "parameters": {}}},
])


@pytest.fixture(scope="module")
def backend() -> Backend:
    return Backend.from_file(str(TINY / "tokenizer.json"))


@pytest.fixture(scope="module")
def lltok(backend) -> LLTokenizer:
    return LLTokenizer(backend.to_str(), n_vocab=512)


def accepts(grammar: str, tok: LLTokenizer, ids: list[int]) -> bool:
    m = LLMatcher(tok, grammar, log_level=0)
    return m.consume_tokens(ids) and m.is_accepting() and not m.is_error()


def accepts_text(grammar, tok, backend, text: str) -> bool:
    return accepts(grammar, tok, backend.encode(text, add_special_tokens=False).ids)


def rendered_calls(*calls: tuple[str, dict]) -> str:
    """What the chat template renders after `<think></think>` for an assistant's calls: the
    text a model trained on it produces."""
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
        for i, (n, a) in enumerate(calls)]}
    text = _compile_template(NEMOTRON3_CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "q"}, message])
    return text.split("<|im_start|>assistant\n<think></think>", 1)[1].split("<|im_end|>")[0]


def test_json_schema(lltok, backend):
    g = GrammarCompiler(lltok).compile(OutputFormat("json_schema", SCHEMA), [],
                                       ToolChoice("none"), True, in_reasoning=False)
    good = {"name": "Ada", "age": 36, "role": "admin", "tags": ["x", "yz"],
            "address": {"city": "London"}}
    assert accepts_text(g, lltok, backend, json.dumps(good))
    for bad in [{**good, "name": "much too long"}, {**good, "role": "root"},
                {**good, "age": -1}, {**good, "tags": ["a", "b", "c", "d"]},
                {k: v for k, v in good.items() if k != "age"}, {**good, "extra": 1}]:
        assert not accepts_text(g, lltok, backend, json.dumps(bad)), bad
    # Compact JSON with json.dumps' separators, nothing else.
    assert not accepts_text(g, lltok, backend, json.dumps(good, separators=(",", ":")))
    assert not accepts_text(g, lltok, backend, json.dumps(good, indent=2))


def test_json_object_and_reasoning_first(lltok, backend):
    g = GrammarCompiler(lltok).compile(OutputFormat("json_object"), [], ToolChoice("none"),
                                       True, in_reasoning=True)
    assert accepts_text(g, lltok, backend, 'I should answer {"x": [1, 2]}.\n</think>\n'
                                           '{"x": [1, 2]}')
    assert not accepts_text(g, lltok, backend, "thinking\n</think>\n[1, 2]")
    assert not accepts_text(g, lltok, backend, '{"x": 1}')  # the reasoning must end first


def test_required_tool_calls_accept_what_the_template_renders(lltok, backend):
    compiler = GrammarCompiler(lltok)
    g = compiler.compile(None, TOOLS, ToolChoice("required"), True, in_reasoning=False)
    one = rendered_calls(("get_weather", {"city": "Paris", "days": 3, "hourly": True,
                                          "where": {"lat": 48.85}}))
    assert one.startswith("\n<tool_call>\n<function=get_weather>\n")
    assert accepts_text(g, lltok, backend, one)
    two = rendered_calls(("get_weather", {"city": "Oslo", "units": "c"}),
                         ("anything", {"x": "1", "why": "because"}))
    assert accepts_text(g, lltok, backend, two)
    for bad in [
        "Sure!" + one,  # text before the call
        rendered_calls(("launch", {"x": 1})),  # an unknown function
        rendered_calls(("get_weather", {"days": 3})),  # a required parameter missing
        rendered_calls(("get_weather", {"city": "Paris", "days": "soon"})),  # a wrong type
        rendered_calls(("get_weather", {"city": "Paris", "units": "kelvin"})),  # not in enum
        rendered_calls(("get_weather", {"city": "x" * 21})),  # over maxLength
        rendered_calls(("get_weather", {"city": "Paris", "mood": "good"})),  # undeclared
        "",  # no call at all
    ]:
        assert not accepts_text(g, lltok, backend, bad), bad
    single = compiler.compile(None, TOOLS, ToolChoice("required"), False, in_reasoning=False)
    assert accepts_text(single, lltok, backend, one)
    assert not accepts_text(single, lltok, backend, two)


def test_named_function_and_auto_with_a_format(lltok, backend):
    compiler = GrammarCompiler(lltok)
    named = compiler.compile(None, TOOLS, ToolChoice("function", "anything"), True, False)
    assert accepts_text(named, lltok, backend, rendered_calls(("anything", {"k": "v"})))
    assert not accepts_text(named, lltok, backend,
                            rendered_calls(("get_weather", {"city": "Rome"})))
    both = compiler.compile(OutputFormat("json_object"), TOOLS, ToolChoice("auto"), True,
                            in_reasoning=True)
    assert accepts_text(both, lltok, backend, "hm\n</think>\n{\"a\": 1}")
    assert accepts_text(both, lltok, backend,
                        "hm\n</think>" + rendered_calls(("get_weather", {"city": "Rome"})))
    assert compiler.compile(None, TOOLS, ToolChoice("auto"), True, False) is None


def test_special_token_markup_is_a_token_reference(backend):
    special = Backend.from_str(backend.to_str())
    special.add_special_tokens(["<tool_call>", "</tool_call>"])
    tok = LLTokenizer(special.to_str(), n_vocab=special.get_vocab_size())
    markup = markup_tokens(lambda t: special.encode(t, add_special_tokens=False).ids,
                           tok.is_special_token)
    assert markup == {"<tool_call>": special.token_to_id("<tool_call>"),
                      "</tool_call>": special.token_to_id("</tool_call>")}
    g = GrammarCompiler(tok, markup).compile(None, TOOLS, ToolChoice("required"), True,
                                             in_reasoning=False)
    assert f"<[{markup['<tool_call>']}]>" in json.loads(g)["grammars"][0]["lark_grammar"]
    text = rendered_calls(("get_weather", {"city": "Paris"}))
    ids = special.encode(text, add_special_tokens=False).ids
    assert special.token_to_id("<tool_call>") in ids
    assert accepts(g, tok, ids)


@pytest.mark.parametrize("fmt, tools, choice, param", [
    (OutputFormat("json_schema", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
     [], ToolChoice("none"), "response_format"),
    (OutputFormat("json_schema", {"type": "strange"}, param="text.format"), [],
     ToolChoice("none"), "text.format"),
    # A tool built directly: parse_tools refuses this schema before any grammar is built.
    (None, [FunctionTool("f", None, {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": "low"}}})],
     ToolChoice("required"), "tools[0].parameters.properties.x"),
])
def test_schemas_that_cannot_compile_name_their_field(lltok, fmt, tools, choice, param):
    with pytest.raises(GrammarError) as info:
        GrammarCompiler(lltok).compile(fmt, tools, choice, True, in_reasoning=False)
    assert info.value.param == param and param in str(info.value)


def test_grammars_are_llguidance_top_level_grammars():
    g = build_grammar(OutputFormat("json_object"), [], ToolChoice("none"), True, False)
    assert list(json.loads(g)) == ["grammars"]
    assert build_grammar(None, [], ToolChoice("auto"), True, True) is None
