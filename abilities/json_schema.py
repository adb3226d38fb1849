"""Shaping the JSON schemas pydantic generates into what tools publish.

Input schemas are sent with every ``tools/list`` and paid for in every turn of an assistant, so they
are made lean without changing what they accept from a client that follows them: no ``title`` keys,
no ``default: null`` (nor ``false`` on a flag), no ``anyOf [X, null]`` where leaving the field out means the same, no model
docstrings below the root, no ``additionalProperties: true`` (the default), no fields that exist only
to be refused; sub-schemas repeated inside one tool become ``$defs``. Output schemas are made
self-contained and lose their ``title`` keys (pydantic's field and model names, which say nothing the
property names do not): a client validates every result against them, and checking the titles
costs it a third of that work.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

# A field whose explicit null means something other than leaving it out (e.g. "reset to the
# default") keeps null in its published type: ``Field(None, json_schema_extra=KEEP_NULL)``.
KEEP_NULL_KEY = "x-keep-null"
KEEP_NULL: dict[str, Any] = {KEEP_NULL_KEY: True}
# A field accepted only to be refused with a precise error (a legacy or misplaced key) is not published:
# a client that follows the schema never sends it. ``Field(None, json_schema_extra=UNPUBLISHED)``.
UNPUBLISHED_KEY = "x-unpublished"
UNPUBLISHED: dict[str, Any] = {UNPUBLISHED_KEY: True}
# A sub-schema of at least this many bytes repeated in one tool is published once under $defs.
MIN_SHARED_BYTES = 120

_SCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains")


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace local ``$ref``s by their definitions (none of our models is recursive).

    Self-contained schemas are read correctly by every client; ``share_repeated`` adds back the few
    definitions worth sharing.
    """
    defs = schema.pop("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.rsplit("/", 1)[1]
                if name in seen:  # recursion: keep the reference (and its definitions)
                    schema.setdefault("$defs", defs)
                    return node
                target = dict(resolve(defs[name], (*seen, name)))
                extra = {k: v for k, v in node.items() if k != "$ref"}
                target.update({k: resolve(v, seen) for k, v in extra.items()})
                return target
            return {k: resolve(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, seen) for v in node]
        return node

    return resolve(schema, ())


def lean(schema: dict[str, Any]) -> dict[str, Any]:
    """The published input schema: the same contract in fewer bytes (see the module docstring)."""
    out = _lean_node(inline_refs(schema), property_of=None)
    out.pop("description", None)  # the tool's description says it
    return share_repeated(out)


def _lean_node(node: dict[str, Any], *, property_of: dict[str, Any] | None) -> dict[str, Any]:
    node = dict(node)
    node.pop("title", None)
    keep_null = bool(node.pop(KEEP_NULL_KEY, False))
    if "default" in node and (node["default"] is None or (node["default"] is False and node.get("type") == "boolean")):
        del node["default"]  # null, and false for a flag, is what leaving the field out says
    options = node.get("anyOf")
    if isinstance(options, list) and not keep_null and property_of is not None:
        rest = [o for o in options if o != {"type": "null"}]
        if len(rest) < len(options):  # an optional field: absent and null mean the same
            if len(rest) == 1:
                del node["anyOf"]
                node = {**rest[0], **node}
            else:
                node["anyOf"] = rest
    node.pop("title", None)  # also a merged union member's model name
    if node.get("additionalProperties") is True:
        del node["additionalProperties"]  # the JSON Schema default
    if isinstance(node.get("properties"), dict):
        hidden = {name for name, sub in node["properties"].items() if sub.get(UNPUBLISHED_KEY)}
        node["properties"] = {k: v for k, v in node["properties"].items() if k not in hidden}
        if hidden and "required" in node:
            node["required"] = [r for r in node["required"] if r not in hidden]
    if property_of is None and "properties" in node:
        # Not a property (array items, union members, the root): a model docstring, not a field's meaning.
        node.pop("description", None)
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            node[key] = {
                name: _lean_node(sub, property_of=node if key == "properties" else None)
                for name, sub in node[key].items()
            }
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            node[key] = [_lean_node(sub, property_of=None) if isinstance(sub, dict) else sub for sub in node[key]]
    for key in _SCHEMA_VALUES:
        if isinstance(node.get(key), dict):
            node[key] = _lean_node(node[key], property_of=None)
    return node


def untitled(node: Any) -> Any:
    """``node`` without ``title`` keywords anywhere (a property named ``title`` stays)."""
    if isinstance(node, list):
        return [untitled(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: untitled(sub) for name, sub in value.items()}
        elif key != "title" or not isinstance(value, str):
            out[key] = untitled(value)
    return out


def _dump(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def share_repeated(schema: dict[str, Any]) -> dict[str, Any]:
    """Publish each object sub-schema that occurs more than once in ``schema`` once, under ``$defs``.

    Only objects with properties qualify (the step and config shapes), and only when sharing saves bytes.
    """
    seen: Counter[str] = Counter()
    nodes: dict[str, dict[str, Any]] = {}

    def visit(node: Any, root: bool = False) -> None:
        if isinstance(node, dict):
            if not root and "properties" in node:
                key = _dump({k: v for k, v in node.items() if k != "description"})
                seen[key] += 1
                nodes.setdefault(key, node)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema, root=True)
    shared = {key for key, n in seen.items() if n > 1 and len(key) >= MIN_SHARED_BYTES}
    if not shared:
        return schema
    names: dict[str, str] = {}
    defs: dict[str, Any] = dict(schema.get("$defs", {}))
    for i, key in enumerate(sorted(shared, key=len, reverse=True)):
        name = f"s{i + 1}"
        names[key] = name
        defs[name] = {k: v for k, v in nodes[key].items() if k != "description"}

    def replace(node: Any, top: bool = False) -> Any:
        if isinstance(node, dict):
            if not top and "properties" in node:
                key = _dump({k: v for k, v in node.items() if k != "description"})
                if key in names:
                    ref: dict[str, Any] = {"$ref": f"#/$defs/{names[key]}"}
                    if "description" in node:
                        ref["description"] = node["description"]
                    return ref
            return {k: replace(v) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v) for v in node]
        return node

    out = replace(schema, top=True)
    out["$defs"] = {name: replace(body, top=True) for name, body in defs.items()}
    return out
