"""Declared fields: one description of each spec field serves the parser and the CRD schema.

A dataclass field made with `spec_field(...)` carries its JSON name, documentation and
constraints (enum, minimum, pattern, ...). `parse(cls, obj, path)` reads a JSON-like dict into
the dataclass, raising `SpecError` that names the field path; `openapi_schema(cls)` writes the
OpenAPI v3 schema of the same dataclass. Cross-field rules are `CelRule`s on the class
(`__rules__`): their CEL text goes into the CRD's x-kubernetes-validations and the class's
`check(path)` method enforces the same rule in Python, so both say the same thing.

Type mapping (annotation -> JSON):
    str, int, bool            string, integer, boolean (bool is never taken for int)
    float                     a JSON number; with decimal=True a decimal *string* ("2.5"):
                              Kubernetes API conventions keep floats out of specs
    dict[str, str]            an object of strings (node selectors, labels)
    tuple[X, ...]             an array of X
    X | None                  optional (null reads as absent)
    a dataclass               a nested object (unknown keys are rejected)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?$"


class SpecError(ValueError):
    """Bad input, with the path of the field at fault ("spec.prefill.pools[1].maxReplicas")."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule: CEL for the API server, enforced again in Python by `check`."""

    rule: str
    message: str


def spec_field(json: str, doc: str, *, default: Any = MISSING, default_factory: Any = MISSING,
               enum: tuple[str, ...] | None = None, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False,
               pattern: str | None = None, max_length: int | None = None,
               min_items: int | None = None, max_items: int | None = None,
               decimal: bool = False) -> Any:
    """A dataclass field described for both the parser and the schema."""
    metadata = {"json": json, "doc": doc, "enum": enum, "minimum": minimum, "maximum": maximum,
                "exclusive_minimum": exclusive_minimum, "pattern": pattern,
                "max_length": max_length, "min_items": min_items, "max_items": max_items,
                "decimal": decimal}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return type(value).__name__


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse(cls: type, obj: Any, path: str) -> Any:
    """Reads `obj` (a dict from JSON/YAML) into dataclass `cls`; SpecError names the path."""
    if not isinstance(obj, dict):
        raise SpecError(path, f"must be an object, got {_describe(obj)}")
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if "json" in f.metadata]
    known = {f.metadata["json"] for f in fields}
    for key in obj:
        if key not in known:
            raise SpecError(f"{path}.{key}",
                            f"unknown field; allowed: {', '.join(sorted(known))}")
    values = {}
    for f in fields:
        name = f.metadata["json"]
        if name not in obj:
            if f.default is MISSING and f.default_factory is MISSING:
                raise SpecError(f"{path}.{name}", "is required")
            continue
        values[f.name] = _convert(hints[f.name], obj[name], f"{path}.{name}", f.metadata)
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check(path)
    return instance


def _convert(tp: Any, value: Any, path: str, md: dict) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise SpecError(path, "must not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SpecError(path, f"must be a list, got {_describe(value)}")
        if md.get("min_items") is not None and len(value) < md["min_items"]:
            raise SpecError(path, f"must have at least {md['min_items']} item(s), "
                                  f"got {len(value)}")
        if md.get("max_items") is not None and len(value) > md["max_items"]:
            raise SpecError(path, f"must have at most {md['max_items']} item(s), "
                                  f"got {len(value)}")
        return tuple(_convert(item_tp, v, f"{path}[{i}]", {}) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(path, f"must be an object of strings, got {_describe(value)}")
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SpecError(f"{path}.{k}", f"must be a string, got {_describe(v)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, f"must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"must be an integer, got {_describe(value)}")
        _check_range(value, path, md)
        return value
    if tp is float:
        if md.get("decimal"):
            if not isinstance(value, str) or not re.match(DECIMAL_PATTERN, value):
                raise SpecError(path, f"must be a decimal string such as \"2.5\", "
                                      f"got {_describe(value)}")
            number = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(path, f"must be a number, got {_describe(value)}")
            number = float(value)
            if not math.isfinite(number):
                raise SpecError(path, f"must be a finite number, got {_describe(value)}")
        _check_range(number, path, md)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(path, f"must be a string, got {_describe(value)}")
        if md.get("enum") and value not in md["enum"]:
            raise SpecError(path, f"must be one of {', '.join(md['enum'])}, got {value!r}")
        if md.get("max_length") is not None and len(value) > md["max_length"]:
            raise SpecError(path, f"must be at most {md['max_length']} characters, "
                                  f"got {len(value)} ({value!r})")
        if md.get("pattern") and not re.match(md["pattern"], value):
            raise SpecError(path, f"must match {md['pattern']}, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported field type {tp!r}")


def _check_range(number: float, path: str, md: dict) -> None:
    low, high = md.get("minimum"), md.get("maximum")
    if low is not None:
        if md.get("exclusive_minimum") and not number > low:
            raise SpecError(path, f"must be > {low}, got {number:g}")
        if number < low:
            raise SpecError(path, f"must be >= {low}, got {number:g}")
    if high is not None and number > high:
        raise SpecError(path, f"must be <= {high}, got {number:g}")


def dump(instance: Any) -> Any:
    """The JSON form of a parsed dataclass (camelCase keys; decimals back to strings)."""
    return _dump_value(instance, {})


def _dump_value(value: Any, md: dict) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if "json" not in f.metadata:
                continue
            out[f.metadata["json"]] = _dump_value(getattr(value, f.name), f.metadata)
        return out
    if isinstance(value, tuple):
        return [_dump_value(v, {}) for v in value]
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, float) and md.get("decimal"):
        return format_decimal(value)
    return value


def format_decimal(number: float) -> str:
    """The shortest decimal string for a parsed decimal field ("2.5", "10")."""
    text = repr(float(number))
    if "e" in text or "E" in text:
        text = f"{number:.12f}".rstrip("0")
    return text[:-2] if text.endswith(".0") else text.rstrip(".")


def openapi_schema(cls: type) -> dict:
    """The OpenAPI v3 (structural) schema of dataclass `cls`."""
    hints = _hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        if "json" not in f.metadata:
            continue
        md = f.metadata
        prop = _type_schema(hints[f.name], md)
        prop["description"] = md["doc"]
        # Scalar defaults only: the parser fills nested objects' defaults field by field, and
        # the API server does the same once the object is present.
        if f.default is not MISSING and f.default is not None:
            prop["default"] = _dump_value(f.default, md)
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(md["json"])
        properties[md["json"]] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    rules = cls.__dict__.get("__rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": r.rule, "message": r.message}
                                              for r in rules]
    return schema


def _type_schema(tp: Any, md: dict) -> dict:
    # Optional fields are simply omitted; the API server prunes nulls of non-nullable fields,
    # and the parser reads a null as absent, so both agree.
    inner, _ = _unwrap_optional(tp)
    return _plain_type_schema(inner, md)


def _plain_type_schema(tp: Any, md: dict) -> dict:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return openapi_schema(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        schema = {"type": "array", "items": _type_schema(item_tp, {})}
        if md.get("min_items") is not None:
            schema["minItems"] = md["min_items"]
        if md.get("max_items") is not None:
            schema["maxItems"] = md["max_items"]
        return schema
    if origin is dict:
        return {"type": "object", "additionalProperties": {"type": "string"}}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        schema = {"type": "integer"}
        _range_schema(schema, md)
        return schema
    if tp is float:
        if md.get("decimal"):
            return {"type": "string", "pattern": DECIMAL_PATTERN}
        schema = {"type": "number"}
        _range_schema(schema, md)
        return schema
    if tp is str:
        schema = {"type": "string"}
        if md.get("enum"):
            schema["enum"] = list(md["enum"])
        if md.get("pattern"):
            schema["pattern"] = md["pattern"]
        if md.get("max_length") is not None:
            schema["maxLength"] = md["max_length"]
        return schema
    raise TypeError(f"unsupported field type {tp!r}")


def _range_schema(schema: dict, md: dict) -> None:
    if md.get("minimum") is not None:
        schema["minimum"] = md["minimum"]
        if md.get("exclusive_minimum"):
            schema["exclusiveMinimum"] = True
    if md.get("maximum") is not None:
        schema["maximum"] = md["maximum"]
