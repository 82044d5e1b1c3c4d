"""The JSON Schemas a request carries (tool parameters, response_format / text.format):
every keyword's value checked for its type before anything compiles or renders the schema.

A schema comes from the client, and the grammar compiler, the chat template and the tool-call
parser all read it: a keyword of the wrong type (`"minLength": "x"`, `"required": "a"`) is a
400 naming where it is, what it holds and what the keyword takes. The walk is iterative (a
schema may be as deep as the body allows) and visits every sub-schema a keyword holds.
"""

from __future__ import annotations

from typing import Any

from baton.workers.router.errors import bad_request

JSON_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")

_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
           "maxProperties", "minContains", "maxContains")
_NUMBERS = ("minimum", "maximum", "multipleOf")
_STRINGS = ("pattern", "format", "title", "description", "$ref", "$id", "$schema",
            "$comment", "$anchor", "contentEncoding", "contentMediaType")
_BOOLS = ("uniqueItems", "readOnly", "writeOnly", "deprecated")
_SCHEMA = ("additionalProperties", "additionalItems", "unevaluatedProperties",
           "unevaluatedItems", "contains", "not", "propertyNames", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                "dependentSchemas")


def _is_int(v: Any) -> bool:
    # 3.0 is an integer to JSON Schema; True is not.
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, float) and v.is_integer())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_schema(v: Any) -> bool:
    return isinstance(v, (dict, bool))


def _refuse(where: str, key: str, value: Any, allowed: str):
    at = f"{where}.{key}"
    return bad_request(f"{at}: the JSON Schema keyword {key!r} takes {allowed}, got "
                       f"{type(value).__name__} {value!r:.80}", param=at,
                       code="invalid_schema")


def check_schema(schema: Any, where: str) -> None:
    """ApiError 400 for the first keyword in schema (or a sub-schema) whose value has the
    wrong type; where names the schema in the request (e.g. tools[0].function.parameters)."""
    stack: list[tuple[Any, str]] = [(schema, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise bad_request(f"{at}: a JSON Schema is an object or a boolean, got "
                              f"{type(node).__name__} {node!r:.80}", param=at,
                              code="invalid_schema")
        for key, value in node.items():
            if key in _COUNTS:
                if not _is_int(value) or value < 0:
                    raise _refuse(at, key, value, "a non-negative integer")
            elif key in _NUMBERS:
                if not _is_number(value) or (key == "multipleOf" and value <= 0):
                    raise _refuse(at, key, value, "a number" if key != "multipleOf"
                                  else "a number > 0")
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                if not _is_number(value) and not isinstance(value, bool):
                    raise _refuse(at, key, value, "a number (or, draft 4, a boolean)")
            elif key in _STRINGS:
                if not isinstance(value, str):
                    raise _refuse(at, key, value, "a string")
            elif key in _BOOLS:
                if not isinstance(value, bool):
                    raise _refuse(at, key, value, "a boolean")
            elif key == "type":
                kinds = value if isinstance(value, list) else [value]
                if not kinds or not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
                    raise _refuse(at, key, value, f"one of {', '.join(JSON_TYPES)} or a "
                                  "non-empty list of them")
            elif key == "required":
                if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
                    raise _refuse(at, key, value, "a list of property names")
            elif key == "enum":
                if not isinstance(value, list):
                    raise _refuse(at, key, value, "a list of values")
            elif key == "dependentRequired":
                if not isinstance(value, dict) or not all(
                        isinstance(v, list) and all(isinstance(r, str) for r in v)
                        for v in value.values()):
                    raise _refuse(at, key, value, "an object of lists of property names")
            elif key in _SCHEMA:
                if not _is_schema(value):
                    raise _refuse(at, key, value, "a schema (an object or a boolean)")
                stack.append((value, f"{at}.{key}"))
            elif key == "items":
                if isinstance(value, list):  # draft 4-7 tuple form
                    stack.extend((s, f"{at}.items[{i}]") for i, s in enumerate(value))
                elif _is_schema(value):
                    stack.append((value, f"{at}.items"))
                else:
                    raise _refuse(at, key, value, "a schema or a list of schemas")
            elif key in _SCHEMA_LISTS:
                if not isinstance(value, list) or not value:
                    raise _refuse(at, key, value, "a non-empty list of schemas")
                stack.extend((s, f"{at}.{key}[{i}]") for i, s in enumerate(value))
            elif key in _SCHEMA_MAPS:
                if not isinstance(value, dict):
                    raise _refuse(at, key, value, "an object of schemas")
                stack.extend((s, f"{at}.{key}.{name}") for name, s in value.items())
