"""Tool definitions, tool_choice and tool-call history in requests (chat and Responses).

`parse_tools` validates OpenAI function tools (chat's `{"type": "function", "function":
{...}}` or the Responses API's flat `{"type": "function", "name": ...}`) into `FunctionTool`s;
`parse_tool_choice` validates tool_choice against them; `assistant_tool_calls` turns the
tool calls of an assistant message in the history into what the chat template renders
(function.arguments as a mapping: clients send the JSON string they received). Every
problem is a 400 naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from baton.workers.router.errors import bad_request, invalid_type
from baton.workers.router.request_body import decode_json_text
from baton.workers.router.schema_check import check_schema

# OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: Mapping[str, Any]  # a JSON Schema of an object; {} when the tool takes any
    strict: bool = False

    def template_dict(self) -> dict[str, Any]:
        """The tool as the chat template renders it (OpenAI's chat shape)."""
        fn: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto" | "none" | "required" | "function"
    function: str | None = None  # mode "function": the one function to call

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"


def _tool(i: int, tool: Any, param: str) -> FunctionTool:
    where = f"{param}[{i}]"
    if not isinstance(tool, dict):
        raise invalid_type(where, tool, "an object")
    if tool.get("type") != "function":
        raise bad_request(f"{where}.type: only function tools are supported, got "
                          f"{tool.get('type')!r}", param=f"{where}.type",
                          code="unsupported_value")
    if "function" in tool:  # chat completions nest the function
        fn, where = tool["function"], f"{where}.function"
        if not isinstance(fn, dict):
            raise invalid_type(where, fn, "an object")
    else:  # the Responses API puts its fields on the tool itself
        fn = tool
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"{where}.name: must be 1-64 letters, digits, '_', '.' or '-', got "
                          f"{name!r:.80}", param=f"{where}.name", code="invalid_value")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_type(f"{where}.description", description, "a string")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise invalid_type(f"{where}.parameters", parameters, "a JSON Schema object")
    kind = parameters.get("type")
    if kind is not None and kind != "object":
        raise bad_request(f"{where}.parameters.type: a function's parameters are an object, "
                          f"got {kind!r}", param=f"{where}.parameters", code="invalid_value")
    props = parameters.get("properties")
    if props is not None and (not isinstance(props, dict)
                              or not all(isinstance(v, dict) for v in props.values())):
        raise invalid_type(f"{where}.parameters.properties", props,
                          "an object of JSON Schemas")
    required = parameters.get("required")
    if required is not None and (not isinstance(required, list)
                                 or not all(isinstance(r, str) for r in required)):
        raise invalid_type(f"{where}.parameters.required", required, "a list of names")
    check_schema(parameters, f"{where}.parameters")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_type(f"{where}.strict", strict, "a boolean")
    return FunctionTool(name, description, parameters, bool(strict))


def parse_tools(value: Any, param: str = "tools") -> list[FunctionTool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_type(param, value, "a list of tools")
    tools = [_tool(i, t, param) for i, t in enumerate(value)]
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.name in seen:
            raise bad_request(f"{param}[{i}]: a second function named {t.name!r}",
                              param=f"{param}[{i}]", code="invalid_value")
        seen.add(t.name)
    return tools


def parse_tool_choice(value: Any, tools: list[FunctionTool]) -> ToolChoice:
    """tool_choice: "auto" (the default with tools), "none" (the default without),
    "required", or a named function in either API's shape."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise bad_request(f"tool_choice: must be one of {', '.join(TOOL_CHOICES)} or a "
                              f"function, got {value!r:.80}", param="tool_choice",
                              code="invalid_value")
        if value == "required" and not tools:
            raise bad_request("tool_choice: 'required' needs tools", param="tool_choice",
                              code="invalid_value")
        return ToolChoice(value)
    if not isinstance(value, dict) or value.get("type") != "function":
        raise bad_request(f"tool_choice: expected a string or {{'type': 'function', ...}}, "
                          f"got {value!r:.80}", param="tool_choice", code="invalid_value")
    fn = value.get("function", value)  # chat nests {"function": {"name"}}; Responses does not
    name = fn.get("name") if isinstance(fn, dict) else None
    known = [t.name for t in tools]
    if name not in known:
        raise bad_request(f"tool_choice: no tool named {name!r:.80} in tools (known: "
                          f"{', '.join(known) or 'none'})", param="tool_choice",
                          code="invalid_value")
    return ToolChoice("function", name)


def arguments_mapping(arguments: Any, where: str) -> dict[str, Any]:
    """A call's arguments as a mapping: the JSON string OpenAI clients send, or a mapping."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        value = decode_json_text(arguments, where) if arguments.strip() else {}
        if isinstance(value, dict):
            return value
    raise bad_request(f"{where}: must be a JSON object (as a string), got {arguments!r:.80}",
                      param=where, code="invalid_value")


def assistant_tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """messages[i].tool_calls for the chat template (arguments parsed)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise invalid_type(where, calls, "a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise invalid_type(at, call, "an object")
        if call.get("type", "function") != "function":
            raise bad_request(f"{at}.type: only function calls are supported, got "
                              f"{call.get('type')!r:.80}", param=f"{at}.type",
                              code="unsupported_value")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise invalid_type(f"{at}.function", fn, "an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_type(f"{at}.function.name", name, "a non-empty string")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise invalid_type(f"{at}.id", call_id, "a string")
        out.append({"id": call_id, "type": "function", "function": {
            "name": name, "arguments": arguments_mapping(fn.get("arguments"),
                                                         f"{at}.function.arguments")}})
    return out
