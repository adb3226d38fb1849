"""The ability registry: each ability declared once (docs/architecture.md, The ability registry).

A declaration carries everything the server needs to publish a tool (name, title, description,
input and output schemas, annotations) and everything the runner needs to call it (required
level, transaction mode, handler). Listing, documentation and permission checks all read it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, Field, TypeAdapter, create_model

from datamachine_mcp.abilities.json_schema import inline_refs, lean, untitled
from datamachine_mcp.abilities.principal import Level
from datamachine_mcp.abilities.questions import CONFIRM_FIELD, Question
from datamachine_mcp.abilities.schema import Input

TOOLSETS = ("agents", "pipelines", "flows", "jobs", "processed-items", "logs", "chat", "settings", "system")
MAX_DESCRIPTION = 200

Handler = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True, eq=False)
class Ability:
    slug: str
    title: str
    description: str
    toolset: str
    input_model: type[Input]
    output_type: Any
    level: Level
    handler: Handler
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    open_world: bool = False
    # field -> DM error code used instead of invalid_input when that field's value is invalid
    error_fields: Mapping[str, str] = field(default_factory=dict)
    # mapped fields whose absence uses their code too (otherwise a missing field is invalid_input)
    missing_uses_code: tuple[str, ...] = ()
    # "auto": the runner wraps the call in one transaction; "manual": the handler opens short
    # transactions itself (tools that wait or call out must not hold one)
    transaction: Literal["auto", "manual"] = "auto"
    order: tuple[str, int] = ("", 0)
    # In the small default tool list (--toolsets core): together these cover a whole journey.
    core: bool = False
    # Output path -> resource URI template: the result links to that resource (see ``link_targets``).
    links: Mapping[str, str] = field(default_factory=dict)
    # What the server asks the user before running the call (abilities/questions.py), if anything.
    ask: Question | None = None

    @cached_property
    def output_adapter(self) -> TypeAdapter[Any]:
        return TypeAdapter(self.output_type)

    @cached_property
    def input_schema(self) -> dict[str, Any]:
        return lean(self.input_model.model_json_schema())

    @cached_property
    def output_schema(self) -> dict[str, Any]:
        schema = untitled(inline_refs(self.output_adapter.json_schema(mode="serialization")))
        if "type" not in schema:  # a union of shapes: MCP requires an object at the root
            schema = {"type": "object", **schema}
        return dict(schema)

    def annotations(self) -> dict[str, Any]:
        return tool_hints(self)

    def dump_output(self, value: Any) -> dict[str, Any]:
        """Validate a handler's return value against the output type and dump it as JSON data."""
        if not isinstance(value, BaseModel):
            value = self.output_adapter.validate_python(value)
        return self.output_adapter.dump_python(value, mode="json")


def tool_hints(declared: Any) -> dict[str, Any]:
    """The MCP tool annotations of a declaration (an ``Ability`` or its cached listing)."""
    return {
        "title": declared.title,
        "readOnlyHint": declared.read_only,
        "destructiveHint": declared.destructive,
        "idempotentHint": declared.idempotent,
        "openWorldHint": declared.open_world,
    }


_REGISTRY: dict[str, Ability] = {}


def default_title(slug: str) -> str:
    words = slug.replace("-", " ")
    return words[:1].upper() + words[1:]


def ability(
    slug: str,
    *,
    toolset: str,
    level: Level,
    description: str,
    read_only: bool = False,
    destructive: bool = False,
    idempotent: bool = False,
    open_world: bool = False,
    title: str | None = None,
    error_fields: Mapping[str, str] | None = None,
    missing_uses_code: tuple[str, ...] = (),
    transaction: Literal["auto", "manual"] = "auto",
    output: Any = None,
    core: bool = False,
    links: Mapping[str, str] | None = None,
    ask: Question | None = None,
) -> Callable[[Handler], Handler]:
    """Declare an ability. Input and output types come from the handler's annotations."""

    def register(fn: Handler) -> Handler:
        if slug in _REGISTRY:
            raise ValueError(f"ability {slug!r} declared twice")
        if toolset not in TOOLSETS:
            raise ValueError(f"ability {slug!r}: unknown toolset {toolset!r}")
        if len(description) > MAX_DESCRIPTION:
            raise ValueError(f"ability {slug!r}: description longer than {MAX_DESCRIPTION} characters")
        hints = get_type_hints(fn)
        params = [name for name in fn.__code__.co_varnames[: fn.__code__.co_argcount]]
        input_model = hints[params[1]]
        if ask is not None and ask.kind == "confirmation":
            input_model = _with_confirm(input_model)
        _check_described(slug, input_model)
        _REGISTRY[slug] = Ability(
            slug=slug,
            title=title or default_title(slug),
            description=description,
            toolset=toolset,
            input_model=input_model,
            output_type=output if output is not None else hints["return"],
            level=level,
            handler=fn,
            read_only=read_only,
            destructive=destructive,
            idempotent=idempotent,
            open_world=open_world,
            error_fields=dict(error_fields or {}),
            missing_uses_code=missing_uses_code,
            transaction=transaction,
            # Import order varies (other layers import some modules early); source position does not.
            order=(fn.__module__, fn.__code__.co_firstlineno),
            core=core,
            links=dict(links or {}),
            ask=ask,
        )
        return fn

    return register


def link_targets(ability: Ability, output: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(uri_template, value)`` for each of the ability's links present in ``output``.

    A path is dotted field names; ``name[]`` steps into a list only when it holds exactly one entry
    (a single-object read such as get-jobs with job_id), so list results carry no links.
    """
    out: list[tuple[str, Any]] = []
    for path, template in ability.links.items():
        node: Any = output
        for part in path.split("."):
            if part.endswith("[]"):
                node = node.get(part[:-2]) if isinstance(node, Mapping) else None
                node = node[0] if isinstance(node, list) and len(node) == 1 else None
            else:
                node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, bool):
            out.append((template, node))
    return out


def _with_confirm(model: type[Input]) -> type[Input]:
    """The input model plus ``confirm``: a confirmed call is not asked again (declared once, by ``ask=``)."""
    extended: type[Input] = create_model(
        model.__name__,
        __base__=model,
        __module__=model.__module__,
        **{CONFIRM_FIELD: (bool, Field(False, description="Skip asking the user"))},  # type: ignore[call-overload]
    )
    return extended


def _check_described(slug: str, model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        if not info.description:
            raise ValueError(f"ability {slug!r}: input field {name!r} has no description")


def load_all() -> dict[str, Ability]:
    """Import every module of the package (declarations register themselves) and return the registry."""
    from datamachine_mcp import abilities

    for module in pkgutil.iter_modules(abilities.__path__):
        importlib.import_module(f"datamachine_mcp.abilities.{module.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda kv: _listing_key(kv[1])))


def _listing_key(a: Ability) -> tuple[int, bool, str, int]:
    """Toolset order, then the toolset's own module (agents.py for agents, …), then source order."""
    module, line = a.order
    primary = module.rsplit(".", 1)[-1] == a.toolset.replace("-", "_")
    return TOOLSETS.index(a.toolset), not primary, module, line


def registered() -> dict[str, Ability]:
    """The abilities declared so far (``load_all`` imports them all)."""
    return _REGISTRY
