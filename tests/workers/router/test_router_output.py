"""Output processing on golden Nemotron 3 texts: content, reasoning and tool calls.

Every golden text is fed three ways: as one piece, byte by byte (a byte-level tokenizer), and
token by token with the shipped tiny model's real tokenizer (markup split across tokens). The
streamed deltas must fold to exactly the expected message each time, and keep OpenAI's stream
shape (a call's id and name first, then its argument fragments).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from baton.workers.router.output import ChoiceOutput, Delta, Message
from baton.workers.router.tool_calls import typed_argument
from baton.workers.text.tokenizer import ByteTokenizer, load_tokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny"

TOOLS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "units": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]},
    "search": {"type": "object", "properties": {
        "query": {"type": "string"}, "filters": {"type": "object"}, "limit": {"type": "number"},
        "exact": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
        "extra": {}, "maybe": {"type": ["integer", "null"]}}},
    "run_code": {"type": "object", "properties": {"code": {"type": "string"}}},
}


def call(name: str, **params) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>\n"


WEATHER = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
          "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n"

# (name, output text, in_reasoning, backend finish, expected content, reasoning, calls, finish)
GOLDEN = [
    ("plain answer", "The answer is 42.", None, "stop", "The answer is 42.", None, [], "stop"),
    ("reasoning then answer", "Let me think.\nIt is 6*7.\n</think>\nThe answer is 42.", True,
     "stop", "The answer is 42.", "Let me think.\nIt is 6*7.", [], "stop"),
    ("reasoning then one call", "The user wants weather.\n</think>\n" + WEATHER, True, "stop",
     "", "The user wants weather.", [("get_weather", {"city": "Paris", "days": 3})],
     "tool_calls"),
    ("several calls", WEATHER + call("get_weather", city="Zürich 🌍", units="c")
     + call("search", query="rain"), False, "stop", "", None,
     [("get_weather", {"city": "Paris", "days": 3}),
      ("get_weather", {"city": "Zürich 🌍", "units": "c"}), ("search", {"query": "rain"})],
     "tool_calls"),
    ("JSON-valued parameters", call("search", query="  spaced \"quoted\" ",
                                    filters='{"lang": "en", "years": [2020, 2021]}',
                                    limit="2.5", exact="True", tags='["a", "b"]',
                                    extra='{"k": null}', maybe="None"), None, "stop", "", None,
     [("search", {"query": "  spaced \"quoted\" ", "filters": {"lang": "en",
                                                             "years": [2020, 2021]},
                  "limit": 2.5, "exact": True, "tags": ["a", "b"], "extra": {"k": None},
                  "maybe": None})], "tool_calls"),
    ("untyped and mistyped values stay strings", call("search", extra="plain words",
                                                      limit="lots"), None, "stop", "", None,
     [("search", {"extra": "plain words", "limit": "lots"})], "tool_calls"),
    ("text before a call", "I'll look it up.\n\n" + WEATHER, False, "stop",
     "I'll look it up.", None, [("get_weather", {"city": "Paris", "days": 3})],
     "tool_calls"),
    ("multi-line code value", call("run_code", code='def f():\n    return "x"\n'), None,
     "stop", "", None, [("run_code", {"code": 'def f():\n    return "x"\n'})], "tool_calls"),
    ("a call cut off inside a string value",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", None, "length", "", None,
     [("get_weather", {"city": "Par"})], "length"),
    ("a call cut off inside a typed value",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
     "<parameter=days>\n1", None, "length", "", None, [("get_weather", {"city": "Paris"})],
     "length"),
    ("a call cut off in its header", "Sure.\n<tool_call>\n<function=get_wea", None, "length",
     "Sure.\n<tool_call>\n<function=get_wea", None, [], "length"),
    ("an unknown function is content", "<tool_call>\n<function=launch>\n<parameter=x>\n1\n"
     "</parameter>\n</function>\n</tool_call>", None, "stop",
     "<tool_call>\n<function=launch>\n<parameter=x>\n1\n</parameter>\n</function>\n"
     "</tool_call>", None, [], "stop"),
    ("a stray tag mid-sentence is content", "Use the <tool_call> tag, then " + WEATHER, None,
     "stop", "Use the <tool_call> tag, then", None,
     [("get_weather", {"city": "Paris", "days": 3})], "tool_calls"),
    ("missing closing tags", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
     "</function>\n</tool_call>", None, "stop", "", None, [("get_weather", {"city": "Paris"})],
     "tool_calls"),
    ("text that is no markup ends a call", "<tool_call>\n<function=get_weather>\n"
     "<parameter=city>\nParis\n</parameter>\noops</function>", None, "stop",
     "oops</function>", None, [("get_weather", {"city": "Paris"})], "tool_calls"),
    ("reasoning never closed", "Still thinking about it...\n", True, "length", "",
     "Still thinking about it...", [], "length"),
    ("an answer that opens its own reasoning", "<think>\nhmm\n</think>\n\nHello.", False,
     "stop", "Hello.", "hmm", [], "stop"),
    ("text after the calls", WEATHER + "\nDone.", None, "stop", "Done.", None,
     [("get_weather", {"city": "Paris", "days": 3})], "tool_calls"),
]


def _tiny():
    return load_tokenizer(TINY)


TOKENIZATIONS = {
    "one piece": None,
    "byte by byte": ByteTokenizer(),
    "tiny tokenizer": "tiny",
}


class WholeText:
    """A tokenizer with one token: the whole text (the non-streamed extreme)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.text * sum(1 for i in ids if i == 7)


def run(text: str, how: str, in_reasoning, backend_finish="stop", stop=(), max_calls=None,
        tools=TOOLS):
    """(deltas, message, finish_reason) of text fed the given way."""
    tok = TOKENIZATIONS[how]
    if tok is None:
        tok, ids, prompt = WholeText(text), [7], []
    elif tok == "tiny":
        tok = _tiny()
        ids = tok.encode(text, add_special_tokens=False)
        prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        assert tok.decode(ids) == text
    else:
        ids, prompt = list(text.encode()), []
    counter = itertools.count()
    out = ChoiceOutput(tok, prompt, stop=stop, reasoning=in_reasoning, tools=tools,
                       max_tool_calls=max_calls, new_id=lambda: f"call_{next(counter)}")
    deltas: list[Delta] = []
    for i in ids:
        deltas += out.push(i)
        if out.stopped:
            break
    deltas += out.finish()
    message = Message()
    for d in deltas:
        message.add(d)
    return deltas, message, out.finish_reason(backend_finish)


@pytest.mark.parametrize("how", list(TOKENIZATIONS))
@pytest.mark.parametrize("case", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_texts(case, how):
    _, text, in_reasoning, backend, content, reasoning, calls, finish = case
    deltas, message, reason = run(text, how, in_reasoning, backend)
    assert message.content == content
    assert message.reasoning == reasoning
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in message.tool_calls]
    assert got == calls
    for c, (_, args) in zip(message.tool_calls, calls):
        # The exact string a client gets: json.dumps of the arguments, keys in call order.
        assert c["function"]["arguments"] == json.dumps(args, ensure_ascii=False)
    assert reason == finish
    # Stream shape: each call's first delta has its id and name and no arguments; the later
    # ones have neither id nor name; every delta carries exactly one thing.
    seen = set()
    for d in deltas:
        assert sum(bool(x) for x in (d.content, d.reasoning, d.tool_call)) == 1, d
        if d.tool_call is not None:
            first = d.tool_call.index not in seen
            seen.add(d.tool_call.index)
            assert (d.tool_call.id is not None) == first == (d.tool_call.name is not None)
            assert not (first and d.tool_call.arguments)
    assert [c["id"] for c in message.tool_calls] == [f"call_{i}" for i in range(len(calls))]


def test_streams_in_pieces():
    """Byte by byte, the content, reasoning and a string argument arrive in many deltas."""
    deltas, message, _ = run("Some reasoning here.\n</think>\nA long answer text.\n"
                             + call("run_code", code="print('hello world')"),
                             "byte by byte", True)
    kinds = [("c" if d.content else "r" if d.reasoning else "t") for d in deltas]
    assert kinds.count("r") > 5 and kinds.count("c") > 5 and kinds.count("t") > 5
    assert message.content == "A long answer text."


def test_stop_strings_apply_to_content_only():
    text = "Reason with STOP inside.\n</think>\nFirst part STOP second part"
    _, message, reason = run(text, "byte by byte", True, stop=["STOP"])
    assert message.reasoning == "Reason with STOP inside."
    assert (message.content, reason) == ("First part ", "stop")
    # A stop string inside a call's arguments is markup, not content.
    _, message, reason = run(call("run_code", code="x = 'STOP'"), "byte by byte", None,
                             stop=["STOP"])
    assert json.loads(message.tool_calls[0]["function"]["arguments"]) == {"code": "x = 'STOP'"}
    assert reason == "tool_calls"
    # Content a stop-string prefix held back is released before a call that follows it.
    _, message, _ = run("wait ST\n" + WEATHER, "byte by byte", None, stop=["STOP"])
    assert message.content == "wait ST" and len(message.tool_calls) == 1


def test_one_call_when_parallel_calls_are_off():
    deltas, message, reason = run(WEATHER + WEATHER + "trailing", "tiny tokenizer", None,
                                  max_calls=1)
    assert len(message.tool_calls) == 1 and message.content == "" and reason == "tool_calls"


def test_without_tools_markup_is_content():
    _, message, reason = run(WEATHER, "tiny tokenizer", None, tools=None)
    assert message.content == WEATHER and not message.tool_calls and reason == "stop"


def test_completion_text_is_untouched():
    text = "  <think>not parsed</think>\n<tool_call>\n"
    _, message, _ = run(text, "byte by byte", None, tools=None)
    assert message.content == text and message.reasoning is None


@pytest.mark.parametrize("text, schema, value", [
    ("3", {"type": "integer"}, 3),
    ("3.0", {"type": "integer"}, 3),
    ("3.5", {"type": "integer"}, "3.5"),
    ("-2.5e3", {"type": "number"}, -2500.0),
    ("1e400", {"type": "number"}, "1e400"),
    ("NaN", {"type": "number"}, "NaN"),
    ("false", {"type": "boolean"}, False),
    ("True", {"type": "boolean"}, True),
    ("null", {"type": "null"}, None),
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("{\"a\": 1}", {"type": "object"}, {"a": 1}),
    ("{bad", {"type": "object"}, "{bad"),
    (" 42 ", {"type": "string"}, " 42 "),
    ("c", {"enum": ["c", "f"]}, "c"),
    ("42", None, 42),
    ("None", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
    ("words", {}, "words"),
])
def test_typed_arguments(text, schema, value):
    assert typed_argument(text, schema) == value
