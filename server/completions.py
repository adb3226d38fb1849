"""``completion/complete``: values for prompt arguments and resource-template variables.

Every suggestion is read through the read abilities as the caller (the runner's scoping, the same as any
read), so a completion never offers an id the caller could not read. A prompt argument gets "12: Feed digest"
(the prompt reads the leading id); a URI variable gets the bare id, which is what the URI needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mcp.shared.uri_template import UriTemplate

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.abilities.runner import invoke
from datamachine_mcp.server.prompts import BY_NAME as PROMPTS

MAX_VALUES = 100  # the protocol's cap per answer
LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class Choice:
    value: str  # what the argument or variable takes
    label: str = ""  # shown after the value for prompt arguments ("12: Feed digest")

    def matches(self, typed: str) -> bool:
        typed = typed.strip().lower()
        return not typed or self.value.lower().startswith(typed) or typed in self.label.lower()


async def _flows(read: Any) -> list[Choice]:
    out = await read("get-flows", {"output_mode": "summary", "per_page": 100})
    rows = (out or {}).get("flows", [])
    return [Choice(str(r["flow_id"]), r["flow_name"]) for r in reversed(rows) if isinstance(r, dict)]


async def _jobs(read: Any) -> list[Choice]:
    out = await read("get-jobs", {"per_page": 50, "hide_children": True})
    return [
        Choice(str(j["job_id"]), ", ".join(x for x in (j["base_status"], j.get("label") or j.get("flow_name")) if x))
        for j in (out or {}).get("jobs", [])
    ]


async def _pipelines(read: Any) -> list[Choice]:
    out = await read("get-pipelines", {"output_mode": "summary", "per_page": 100})
    rows = (out or {}).get("pipelines", [])
    return [Choice(str(r["pipeline_id"]), r["pipeline_name"]) for r in reversed(rows) if isinstance(r, dict)]


async def _agents(read: Any) -> list[Choice]:
    out = await read("list-agents", {"per_page": 100})
    return [Choice(a["agent_slug"], a["agent_name"]) for a in (out or {}).get("agents", [])]


async def _agent_ids(read: Any) -> list[Choice]:
    out = await read("list-agents", {"per_page": 100})
    return [Choice(str(a["agent_id"]), a["agent_slug"]) for a in (out or {}).get("agents", [])]


def _handlers(step_type: str | None) -> Callable[[Any], Awaitable[list[Choice]]]:
    async def handlers(read: Any) -> list[Choice]:
        out = await read("get-handlers", {"step_type": step_type} if step_type else {})
        return [Choice(slug, h["label"]) for slug, h in ((out or {}).get("handlers") or {}).items()]

    return handlers


async def _sessions(read: Any) -> list[Choice]:
    out = await read("list-chat-sessions", {"per_page": 50})
    return [Choice(s["session_id"], s.get("title") or "") for s in (out or {}).get("sessions", [])]


async def _levels(read: Any) -> list[Choice]:
    return [Choice(level) for level in LEVELS]


# Completion source by name: prompt arguments name theirs; URI variables are looked up by their own name.
SOURCES: dict[str, Callable[[Any], Awaitable[list[Choice]]]] = {
    "flow_id": _flows,
    "job_id": _jobs,
    "pipeline_id": _pipelines,
    "agent_slug": _agents,
    "agent_id": _agent_ids,
    "handler_slug": _handlers(None),
    "publish_handler": _handlers("publish"),
    "session_id": _sessions,
    "level": _levels,
}


def source_of(ref: Any, argument: str) -> str | None:
    """The completion source for a prompt argument or a resource-template variable, if any."""
    if getattr(ref, "type", None) == "ref/prompt":
        spec = PROMPTS.get(ref.name)
        arg = next((a for a in spec.arguments if a.name == argument), None) if spec else None
        return arg.completion if arg else None
    try:
        variables = UriTemplate.parse(getattr(ref, "uri", "")).variable_names
    except Exception:  # not a template of ours: nothing to complete
        return None
    return argument if argument in SOURCES and argument in variables else None


async def complete(
    runtime: Runtime,
    readers: Mapping[str, Ability],
    principal: Principal,
    ref: Any,
    argument: str,
    typed: str,
) -> tuple[list[str], int]:
    """``(values, total)`` for what the caller typed so far; nothing for an argument without a source."""
    source = source_of(ref, argument)
    if source is None:
        return [], 0

    async def read(slug: str, args: dict[str, Any]) -> dict[str, Any] | None:
        ability = readers.get(slug)
        if ability is None:  # not served in this process
            return None
        outcome = await invoke(runtime, ability, args, principal, record_denials=False)
        return outcome.output if outcome.ok else None

    labelled = getattr(ref, "type", None) == "ref/prompt"
    choices = [c for c in await SOURCES[source](read) if c.matches(typed)]
    values = [f"{c.value}: {c.label}" if labelled and c.label and c.value.isdigit() else c.value for c in choices]
    return values[:MAX_VALUES], len(values)
