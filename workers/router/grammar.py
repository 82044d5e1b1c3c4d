"""Structured output: a request's response_format / tool_choice as an llguidance grammar.

The grammar travels in SamplingParams.grammar as the JSON serialization of an llguidance
TopLevelGrammar (`{"grammars": [{"lark_grammar": ...}]}`); the workers mask every sampled
token with it. llguidance (fast Earley parsing over a token trie, Lark grammars with inline
JSON Schema, matcher rollback for speculative drafts) is the library; the router only builds
and validates grammars, off the event loop and cached.

The shapes, in llguidance's Lark dialect (`%json {...}` is an inline JSON Schema):

    start: THINK? "\\n"? BODY
    THINK      free text up to and including `</think>`, when the prompt leaves the reasoning
               open (the output starts inside it; the reasoning itself is never constrained,
               but a reasoning budget bounds its length: once it has that many tokens, only
               `</think>` may follow)
    BODY       response_format json_object:   %json {"type": "object"}
               response_format json_schema:   %json {schema}  (strict: objects closed)
               tool_choice required:          call+   (call, with parallel_tool_calls false)
               tool_choice {"function": f}:   call_f
               tool_choice auto + a format:   call+ | %json {schema}
               only a reasoning budget:       any tokens but `</think>`
    call_f:    "<tool_call>\\n<function=f>\\n" param* "</function>\\n</tool_call>\\n"
    param:     "<parameter=KEY>\\n" VALUE "\\n</parameter>\\n", declared parameters in
               schema order, required ones always, others optional, none undeclared
    VALUE      by the parameter's schema: a string is free text (bounded by min/maxLength;
               one of an enum / const), a boolean True | False and null None (what the chat
               template renders), anything else %json {its schema} (with the function's
               $defs, so references resolve)

JSON inside a grammar is compact with json.dumps' separators (", " and ": "), no other
whitespace: the model cannot stall in whitespace, and typed arguments read back exactly.

Markup is written the way the model sees it: a markup string that is one token of the
vocabulary which llguidance treats as a special token (every added token, whatever its
`special` flag in tokenizer.json: the demo's `<think>` and `<tool_call>` are `special: false`
and still single tokens no text lexeme can match) is a token reference `<[id]>`; markup the
tokenizer spells in pieces is text. `markup_tokens` (tokenization.py) decides which.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from baton.workers.router.tools import FunctionTool, ToolChoice

# llguidance's JSON options for every inline schema (schema["x-guidance"] may override).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
PARAMETER_CLOSE = "</parameter>"
# Every markup string a grammar writes (a token reference where the vocabulary has it whole).
GRAMMAR_MARKUP = (THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<function=", "</function>",
                  "<parameter=", PARAMETER_CLOSE)


class GrammarError(ValueError):
    """The request's schema cannot be compiled; param names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OutputFormat:
    """What a request asks of its output's shape (response_format / text.format)."""

    kind: str  # "text" | "json_object" | "json_schema"
    schema: Mapping[str, Any] | None = None  # json_schema
    name: str | None = None
    param: str = "response_format"  # the request field it came from, for errors
    strict: bool = False  # json_schema strict: objects take no properties beyond the schema's


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed_schema(schema: Any) -> Any:
    """schema with every object that does not say otherwise closed (additionalProperties
    false), as OpenAI's strict mode reads a schema; JSON Schema itself leaves them open."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: closed_schema(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(v) for v in out[key]]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), Mapping):
            out[key] = closed_schema(out[key])
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _lit(text: str) -> str:
    return json.dumps(text)


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~/")


def _regex_escape(text: str) -> str:
    """text as a literal inside a /regex/ of llguidance's Lark."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in _REGEX_META else c for c in text)


def _json(schema: Mapping[str, Any], defs: Mapping[str, Any] | None = None) -> str:
    doc = dict(schema)
    if defs and "$ref" in json.dumps(schema):  # the function's definitions, where referenced
        for key, value in defs.items():
            doc.setdefault(key, value)
    doc["x-guidance"] = {**JSON_OPTIONS, **(doc.get("x-guidance") or {})}
    return "%json " + json.dumps(doc, ensure_ascii=True)


class _Lark:
    """Rules being written; markup: markup string -> its token id, for the markup that is a
    single token llguidance treats as special (no text lexeme matches such a token)."""

    def __init__(self, markup: Mapping[str, int]) -> None:
        self.markup = dict(markup)
        # Longest first, so that a markup string inside another is not split out of it.
        self._order = sorted(self.markup, key=len, reverse=True)
        self.rules: list[str] = []

    def token(self, markup: str) -> str | None:
        """The token reference of markup, or None where it is text."""
        tid = self.markup.get(markup)
        return None if tid is None else f"<[{tid}]>"

    def lit(self, text: str) -> str:
        """text as a sequence of literals, its markup tokens as token references."""
        parts: list[str] = []
        rest = text
        while rest:
            hits = [(rest.find(m), -len(m), m) for m in self._order if m in rest]
            if not hits:
                parts.append(_lit(rest))
                break
            at, _, m = min(hits)
            if at:
                parts.append(_lit(rest[:at]))
            parts.append(f"<[{self.markup[m]}]>")
            rest = rest[at + len(m):]
        return " ".join(parts) if parts else '""'

    def text_until(self, rule: str, count: str, end: str) -> None:
        """rule: free text (count: a regex repetition of characters) ending in `end`."""
        head, sep, markup = end.rpartition(PARAMETER_CLOSE)
        tok = self.token(PARAMETER_CLOSE) if sep else None
        if tok is None:
            self.add(f"{rule}[lazy]: /(?s:.){count}{_regex_escape(end)}/")
            return
        # The closing markup is a token no text matches: a greedy text lexeme ends right
        # before it (and must end in what comes before it).
        self.add(f"{rule}: {rule}_text {tok} {self.lit(markup)}")
        self.add(f"{rule}_text: /(?s:.){count}{_regex_escape(head)}/")

    def add(self, rule: str) -> None:
        self.rules.append(rule)


def _value_rule(g: _Lark, rule: str, schema: Any, defs: Mapping[str, Any]) -> None:
    end = g.lit("\n</parameter>\n")
    if not isinstance(schema, Mapping):
        schema = {}
    kind = schema.get("type")
    enum = schema.get("enum")
    if "const" in schema and isinstance(schema["const"], str):
        g.add(f"{rule}: {g.lit(schema['const'])} {end}")
    elif isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum) and (
            kind in (None, "string")):
        g.add(f"{rule}: ({' | '.join(g.lit(v) for v in enum)}) {end}")
    elif kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        count = "*" if not lo and hi is None else f"{{{int(lo)},{'' if hi is None else int(hi)}}}"
        g.text_until(rule, count, "\n</parameter>\n")
    elif kind == "boolean":
        g.add(f'{rule}: ("True" | "False") {end}')
    elif kind == "null":
        g.add(f'{rule}: "None" {end}')
    else:
        g.add(f"{rule}: {_json(schema, defs)} {end}")


def _call_rule(g: _Lark, k: int, tool: FunctionTool) -> str:
    params = tool.parameters
    defs = {key: params[key] for key in ("$defs", "definitions") if key in params}
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    parts = []
    for j, (key, schema) in enumerate(props.items()):
        g.add(f"f{k}_p{j}: {g.lit('<parameter=' + key + '>' + chr(10))} f{k}_v{j}")
        _value_rule(g, f"f{k}_v{j}", schema, defs)
        parts.append(f"f{k}_p{j}" + ("" if key in required else "?"))
    if not props and params.get("additionalProperties", True) is not False:
        # A function without declared parameters takes any.
        g.add(f"f{k}_any: {g.lit('<parameter=')} /[A-Za-z0-9_.\\-]{{1,64}}/ "
              f"{_lit('>' + chr(10))} f{k}_anyv")
        g.text_until(f"f{k}_anyv", "*", "\n</parameter>\n")
        parts.append(f"f{k}_any*")
    g.add(f"call{k}: {g.lit(TOOL_CALL_OPEN + chr(10) + '<function=' + tool.name + '>' + chr(10))}"
          f" {' '.join(parts)} {g.lit('</function>' + chr(10) + TOOL_CALL_CLOSE + chr(10))}")
    return f"call{k}"


def _think_rule(g: _Lark, budget: int | None) -> None:
    """think: the reasoning and its `</think>`; budget: at most that many tokens before it."""
    close = g.token(THINK_CLOSE)
    if budget == 0:
        g.add(f"think: {close or _lit(THINK_CLOSE)}")
    elif close is not None:
        # No text lexeme matches the close token: the text ends wherever it comes.
        bound = "" if budget is None else f"[max_tokens={budget}]"
        g.add(f"think: think_text {close}")
        g.add(f"think_text{bound}: /(?s:.)*/")
    elif budget is None:
        g.add(f"think[lazy]: /(?s:.)*{_regex_escape(THINK_CLOSE)}/")
    else:
        # The close is text: the reasoning is text without it, then the close.
        g.add(f"think: think_text {_lit(THINK_CLOSE)}")
        g.add(f"think_text[max_tokens={budget}]: /(?s:.)*/ & "
              f"~/(?s:.)*{_regex_escape(THINK_CLOSE)}(?s:.)*/")


def build_grammar(fmt: OutputFormat | None, tools: Sequence[FunctionTool],
                  tool_choice: ToolChoice, parallel_tool_calls: bool, in_reasoning: bool,
                  markup: Mapping[str, int] | None = None,
                  reasoning_budget: int | None = None) -> str | None:
    """The TopLevelGrammar JSON constraining this output, or None when it is unconstrained
    (module docstring for the shapes). markup: markup string -> token id where it is one
    special token; reasoning_budget: the most tokens the reasoning may take (it applies when
    the output starts inside the reasoning)."""
    json_body = fmt is not None and fmt.kind in ("json_object", "json_schema")
    constrains_calls = tool_choice.mode in ("required", "function")
    bounded = in_reasoning and reasoning_budget is not None
    if not json_body and not constrains_calls and not bounded:
        return None
    g = _Lark(markup or {})
    bodies = []
    if constrains_calls or (json_body and tool_choice.mode == "auto" and tools):
        chosen = [(k, t) for k, t in enumerate(tools)
                  if tool_choice.mode != "function" or t.name == tool_choice.function]
        calls = [_call_rule(g, k, t) for k, t in chosen]
        g.add(f"call: {' | '.join(calls)}")
        many = parallel_tool_calls and tool_choice.mode != "function"
        bodies.append("call+" if many else "call")
    if json_body and tool_choice.mode != "required" and tool_choice.mode != "function":
        schema = fmt.schema if fmt.kind == "json_schema" else {"type": "object"}
        if fmt.strict:
            schema = closed_schema(schema)
        g.add(f"json_body: {_json(schema)}")
        bodies.append("json_body")
    start = "start: "
    if in_reasoning:
        _think_rule(g, reasoning_budget)
        start += "think "
    if bodies:
        start += f"{_lit(chr(10))}? ({' | '.join(bodies)})"
    else:
        # Only the reasoning is bounded: after it, anything (markup tokens included).
        close = g.token(THINK_CLOSE)
        g.add(f"answer: <[^{close[2:-2]}]>*" if close else "answer: /(?s:.)*/")
        start += "answer"
    lark = "\n".join([start, *g.rules]) + "\n"
    return json.dumps({"grammars": [{"lark_grammar": lark}]})


def _first_error(grammar: str, tokenizer: Any) -> str | None:
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return messages[0] if is_error else None


def _check_schema(schema: Mapping[str, Any], param: str) -> None:
    from llguidance import LLMatcher

    doc = json.loads(_json(schema).removeprefix("%json "))
    error = _first_error(LLMatcher.grammar_from_json_schema(doc), None)
    if error is not None:
        raise GrammarError(f"{param}: the JSON Schema cannot be compiled: {error}", param)


def _check_tools(tools: Sequence[FunctionTool], param: str) -> None:
    """Every tool parameter the grammar inlines as JSON must compile (the rest is text);
    param: where a tool's parameters are, with {i} for its index."""
    for i, tool in enumerate(tools):
        params = tool.parameters
        defs = {key: params[key] for key in ("$defs", "definitions") if key in params}
        for key, schema in (params.get("properties") or {}).items():
            if schema.get("type") in ("string", "boolean", "null") or "const" in schema:
                continue
            doc = dict(schema)
            for name, value in defs.items():
                doc.setdefault(name, value)
            _check_schema(doc, param.format(i=i) + f".properties.{key}")


class GrammarCompiler:
    """Builds and validates output grammars for one model (blocking: run it off the loop).

    tokenizer: the model's llguidance LLTokenizer (token references need it), or None.
    markup: markup string -> token id, for the markup that is one special token of that
    tokenizer (tokenization.markup_tokens). Grammars already validated are remembered (the
    same tools and schema recur in agent loops), up to cache_size of them.
    """

    def __init__(self, tokenizer: Any = None, markup: Mapping[str, int] | None = None,
                 cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.markup = dict(markup or {})
        self._validated = lru_cache(maxsize=cache_size)(self._error)

    def _error(self, grammar: str) -> str | None:
        return _first_error(grammar, self.tokenizer)

    def compile(self, fmt: OutputFormat | None, tools: Sequence[FunctionTool],
                tool_choice: ToolChoice, parallel_tool_calls: bool, in_reasoning: bool,
                tools_param: str = "tools[{i}].parameters",
                reasoning_budget: int | None = None) -> str | None:
        """The request's grammar (None: unconstrained); GrammarError names the field whose
        schema llguidance cannot compile (tools_param: where a tool's parameters are in the
        request, {i} its index)."""
        grammar = build_grammar(fmt, tools, tool_choice, parallel_tool_calls, in_reasoning,
                                self.markup, reasoning_budget)
        if grammar is None:
            return None
        error = self._validated(grammar)
        if error is None:
            return grammar
        # Find the part to blame, so that the 400 names the field.
        if fmt is not None and fmt.kind == "json_schema":
            _check_schema(fmt.schema, fmt.param)
        _check_tools(tools, tools_param)
        raise GrammarError(f"the output grammar cannot be compiled: {error}", "tool_choice")
