"""Arguments as real clients send them, read before strict validation.

Some clients and models send ``"6"`` for an integer and a JSON-encoded string for an object or an
array (form-based clients do it for every optional argument). This module walks the input model's
declared fields, top level and nested models, and converts exactly those two forms:

- a field that takes an integer (and no free string) accepts a decimal integer string: ``"6"``,
  ``"-3"``; not ``"6.5"``, ``" 6"``, ``"+6"`` or ``"1e3"``. A number field also accepts ``"2.5"``;
- a field that takes an object or an array (and no free string) accepts that JSON text.

Everything else stays strict and goes to pydantic unchanged. The walk also collects, per unknown
key, the declared fields it was probably meant to be (close-match hints for the error message).
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from datamachine_mcp.abilities.json_schema import UNPUBLISHED_KEY

INT_TEXT = re.compile(r"-?[0-9]+")
NUMBER_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# Far beyond any id or offset we take; a longer digit string is left to fail validation as it is.
MAX_INT_DIGITS = 30

Loc = tuple[str | int, ...]


@dataclass
class Kinds:
    """What a declared type accepts, as far as conversion cares."""

    free_str: bool = False  # any string (str, datetime text, Any): never convert
    literals: set[Any] = field(default_factory=set)
    integer: bool = False
    number: bool = False
    obj: bool = False
    array: bool = False
    models: list[type[BaseModel]] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)  # element types of arrays
    values: list[Any] = field(default_factory=list)  # value types of mappings


def kinds_of(tp: Any, out: Kinds | None = None) -> Kinds:
    out = out if out is not None else Kinds()
    origin = get_origin(tp)
    if origin is Annotated:
        return kinds_of(get_args(tp)[0], out)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            kinds_of(arg, out)
        return out
    if origin is Literal:
        out.literals.update(get_args(tp))
        return out
    if tp is Any or tp is object:
        out.free_str = True
        return out
    if origin is not None:
        if isinstance(origin, type) and issubclass(origin, Mapping):
            out.obj = True
            args = get_args(tp)
            if len(args) == 2:
                out.values.append(args[1])
        elif isinstance(origin, type) and issubclass(origin, Sequence | set | frozenset):
            out.array = True
            out.items.extend(get_args(tp)[:1])
        return out
    if not isinstance(tp, type):
        return out
    if tp is bool or tp is type(None):
        return out
    if issubclass(tp, BaseModel):
        out.obj = True
        out.models.append(tp)
    elif issubclass(tp, Enum):
        out.literals.update(member.value for member in tp)
    elif issubclass(tp, int):
        out.integer = True
    elif issubclass(tp, float):
        out.number = True
    elif issubclass(tp, Mapping):
        out.obj = True
    elif issubclass(tp, list | tuple | set | frozenset):
        out.array = True
    else:  # str, datetime (read from text) and anything else that may be a string
        out.free_str = True
    return out


def _from_text(value: str, kinds: Kinds) -> Any:
    if kinds.free_str or value in kinds.literals:
        return value
    if (kinds.integer or kinds.number) and len(value) <= MAX_INT_DIGITS and INT_TEXT.fullmatch(value):
        return int(value)
    if kinds.number and len(value) <= MAX_INT_DIGITS and NUMBER_TEXT.fullmatch(value):
        return float(value)
    head = value.lstrip()[:1]
    if (kinds.obj and head == "{") or (kinds.array and head == "["):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if (kinds.obj and isinstance(decoded, dict)) or (kinds.array and isinstance(decoded, list)):
            return decoded
    return value


@dataclass
class ClientForms:
    """The walk's result: the converted arguments and a hint list per unknown key's location."""

    arguments: dict[str, Any]
    hints: dict[Loc, list[str]]


def suggest(name: str, model: type[BaseModel]) -> list[str]:
    """Declared fields an unknown key was probably meant to be (most likely first, at most three)."""
    specific = getattr(model, "field_hints", {}).get(name)
    if specific:
        return [specific]
    # unpublished fields (legacy spellings accepted only to be refused precisely) are never suggested
    fields = [
        n
        for n, f in model.model_fields.items()
        if not (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(UNPUBLISHED_KEY))
    ]
    lowered = name.lower()
    # "wait" → wait_seconds: a key that is one word of a field name is too short for difflib's ratio.
    words = [n for n in fields if lowered in n.split("_")]
    close = difflib.get_close_matches(lowered, fields, n=3, cutoff=0.6)
    return list(dict.fromkeys(words + close))[:3]


def _walk_model(model: type[BaseModel], data: dict[str, Any], loc: Loc, hints: dict[Loc, list[str]]) -> dict:
    forbids = model.model_config.get("extra") == "forbid"
    out: dict[str, Any] = {}
    for key, value in data.items():
        info = model.model_fields.get(key)
        if info is None:
            if forbids:
                found = suggest(key, model)
                if found:
                    hints[(*loc, key)] = found
            out[key] = value
            continue
        out[key] = _walk(info.annotation, value, (*loc, key), hints)
    return out


def _walk(tp: Any, value: Any, loc: Loc, hints: dict[Loc, list[str]]) -> Any:
    kinds = kinds_of(tp)
    if isinstance(value, str):
        value = _from_text(value, kinds)
    if isinstance(value, dict):
        if len(kinds.models) == 1:
            return _walk_model(kinds.models[0], value, loc, hints)
        if len(kinds.values) == 1:
            return {k: _walk(kinds.values[0], v, (*loc, k), hints) for k, v in value.items()}
    elif isinstance(value, list) and len(kinds.items) == 1:
        return [_walk(kinds.items[0], v, (*loc, i), hints) for i, v in enumerate(value)]
    return value


def client_forms(model: type[BaseModel], arguments: dict[str, Any]) -> ClientForms:
    hints: dict[Loc, list[str]] = {}
    return ClientForms(_walk_model(model, arguments, (), hints), hints)
