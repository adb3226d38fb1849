"""Resource declarations and reading.

A resource is declared once: its URI (fixed or an RFC 6570 template), names, and the read-only
ability whose structured output is its JSON. Reading a resource invokes that ability through the
same runner as a tool call, so scoping, denials and their audit rows are identical.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from mcp.shared.uri_template import UriTemplate

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.abilities.runner import Outcome, invoke
from datamachine_mcp.engine.errors import CodedError

NOT_FOUND_CODES = frozenset(
    {
        "agent_not_found",
        "pipeline_not_found",
        "flow_not_found",
        "job_not_found",
        "session_not_found",
        "pending_action_not_found",
    }
)


class ResourceNotFound(CodedError):
    """No declared resource matches the URI (``resource_not_found``), or the object it names does not
    exist (the twin's ``<kind>_not_found``). Carries no data: the reply names the URI."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


def unknown(uri: str, detail: str = "") -> ResourceNotFound:
    return ResourceNotFound("resource_not_found", f"Unknown resource: {uri}{detail}")


class ResourceRefused(CodedError):
    """The twin ability refused the read: its code, message and data."""

    def __init__(self, code: str, message: str, data: Mapping[str, Any]) -> None:
        super().__init__(code, message)
        self.data = dict(data)  # the twin's data may hold any key, "code" and "message" included


@dataclass(frozen=True)
class Guard:
    """A read-only ability called before the twin: the object the URI names must exist and be readable.

    Used where the twin alone would answer an unknown or unreadable object with an empty list (e.g. a job's
    log rows through read-logs). Refusals and not-found answers are those of the guard ability.
    """

    ability: str
    args: Callable[[dict[str, Any]], dict[str, Any]]
    exists: Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class ResourceSpec:
    uri: str
    name: str
    title: str
    description: str
    twin: str
    # URI variable -> converter to the twin's input type (int for ids, str otherwise)
    params: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    # Extra fixed arguments for the twin, and a check that the output names an existing object
    fixed: Mapping[str, Any] = field(default_factory=dict)
    exists: Callable[[dict[str, Any]], bool] | None = None
    guard: Guard | None = None

    @cached_property
    def template(self) -> UriTemplate | None:
        return UriTemplate.parse(self.uri) if UriTemplate.is_template(self.uri) else None


_SPECS: list[ResourceSpec] = []


def resource(spec: ResourceSpec) -> ResourceSpec:
    _SPECS.append(spec)
    return spec


def load_all() -> list[ResourceSpec]:
    from datamachine_mcp import resources

    for module in pkgutil.iter_modules(resources.__path__):
        importlib.import_module(f"datamachine_mcp.resources.{module.name}")
    return list(_SPECS)


def match(uri: str, specs: list[ResourceSpec]) -> tuple[ResourceSpec, dict[str, Any]]:
    for spec in specs:
        if spec.template is None and spec.uri == uri:
            return spec, {}
    for spec in specs:
        if spec.template is None:
            continue
        found = spec.template.match(uri)
        if found is None:
            continue
        args: dict[str, Any] = {}
        for name, raw in found.items():
            if not isinstance(raw, str):
                raise unknown(uri)
            convert = spec.params.get(name, str)
            try:
                args[name] = convert(raw)
            except ValueError:
                raise unknown(uri, f" ({name} '{raw}' is not valid)") from None
        return spec, args
    raise unknown(uri)


async def read(
    runtime: Runtime,
    abilities: Mapping[str, Ability],
    specs: list[ResourceSpec],
    uri: str,
    principal: Principal,
    *,
    record_denials: bool = True,
) -> str:
    """The resource's JSON text: exactly its twin's structured output (``record_denials``: see invoke)."""
    spec, args = match(uri, specs)
    twin = abilities.get(spec.twin)
    if twin is None:  # twin excluded by --toolsets/--read-only in this process
        raise unknown(uri)
    if spec.guard is not None:
        guard = abilities.get(spec.guard.ability)
        if guard is None:
            raise unknown(uri)
        checked = _output(
            uri, await invoke(runtime, guard, spec.guard.args(args), principal, record_denials=record_denials)
        )
        if not spec.guard.exists(checked):
            raise unknown(uri)
    output = _output(uri, await invoke(runtime, twin, {**spec.fixed, **args}, principal, record_denials=record_denials))
    if spec.exists is not None and not spec.exists(output):
        raise unknown(uri)
    return json.dumps(output, ensure_ascii=False)


def _output(uri: str, outcome: Outcome) -> dict[str, Any]:
    if outcome.error is not None:
        code = outcome.error["code"]
        if code in NOT_FOUND_CODES:
            raise ResourceNotFound(code, outcome.error["message"])
        raise ResourceRefused(code, outcome.error["message"], outcome.error.get("data") or {})
    return outcome.output or {}
