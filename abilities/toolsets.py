"""Which tools a process lists: the ``--toolsets`` / ``--tools`` selection.

``core`` (the default) is a small list covering a whole journey, for clients that carry every tool
definition in every turn; ``all`` lists every tool; toolset names add whole toolsets; single tools are
added by name. The selection narrows the tool list only: a resource is offered whenever its twin's
toolset is selected, and ``core`` or ``all`` select every toolset for reading resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from datamachine_mcp.abilities.catalog import Declared
from datamachine_mcp.abilities.registry import TOOLSETS

CORE = "core"
ALL = "all"
PROFILES = (CORE, ALL)
ENABLE_HINT = (
    "Restart the server with --toolsets all (env DATAMACHINE_TOOLSETS=all), --toolsets core,<toolset>,... "
    "or --tools <tool>,... (env DATAMACHINE_TOOLS) to list more tools."
)


class SelectionError(ValueError):
    """An unknown toolset or tool name in the process configuration."""


def parse_toolsets(raw: str | None) -> frozenset[str] | None:
    """``core`` (default), ``all`` (None: no narrowing) or a comma list of toolset names and ``core``."""
    names = frozenset(part.strip() for part in (raw or CORE).split(",") if part.strip()) or frozenset({CORE})
    unknown = sorted(names - set(TOOLSETS) - set(PROFILES))
    if unknown:
        raise SelectionError(
            f"unknown toolsets: {', '.join(unknown)} (choose core, all or any of {', '.join(TOOLSETS)})"
        )
    return None if ALL in names else names


def parse_tools(raw: str | None, abilities: Mapping[str, Declared]) -> frozenset[str]:
    """Single tools added to the selection (``--tools``), checked against the registry."""
    names = frozenset(part.strip() for part in (raw or "").split(",") if part.strip())
    unknown = sorted(names - set(abilities))
    if unknown:
        raise SelectionError(f"unknown tools: {', '.join(unknown)} (see the README's tool list for the names)")
    return names


def listed(ability: Declared, toolsets: frozenset[str] | None, tools: Iterable[str] = ()) -> bool:
    """Whether the selection lists ``ability`` as a tool."""
    return (
        toolsets is None
        or ability.toolset in toolsets
        or (CORE in toolsets and ability.core)
        or ability.slug in frozenset(tools)
    )


def readable(ability: Declared, toolsets: frozenset[str] | None, tools: Iterable[str] = ()) -> bool:
    """Whether ``ability`` may serve resource reads (as a twin) under the selection."""
    return toolsets is None or CORE in toolsets or listed(ability, toolsets, tools)


@dataclass(frozen=True)
class SelectionSummary:
    enabled: list[str]  # the selection as given: profiles and toolset names, then single tools
    hidden_toolsets: list[str]  # toolsets with tools this selection does not list
    hidden_tools: int


def summarize(
    abilities: Mapping[str, Declared], toolsets: frozenset[str] | None, tools: Iterable[str], read_only: bool
) -> SelectionSummary:
    extra = sorted(frozenset(tools))
    enabled = [ALL] if toolsets is None else [n for n in (*PROFILES, *TOOLSETS) if n in toolsets]
    hidden = [a for a in abilities.values() if (a.read_only or not read_only) and not listed(a, toolsets, extra)]
    return SelectionSummary(
        enabled=enabled + [f"tool:{t}" for t in extra],
        hidden_toolsets=[t for t in TOOLSETS if any(a.toolset == t for a in hidden)],
        hidden_tools=len(hidden),
    )


def instructions_note(abilities: Mapping[str, Declared], toolsets: frozenset[str] | None, tools: Iterable[str]) -> str:
    """The part of the server instructions that says what is listed and how to list the rest."""
    summary = summarize(abilities, toolsets, tools, read_only=False)
    text = f"Toolsets: {CORE} (default), {ALL}, {', '.join(TOOLSETS)}. Enabled: {', '.join(summary.enabled)}."
    if summary.hidden_tools:
        text += f" {summary.hidden_tools} tools are not listed. {ENABLE_HINT}"
    return text
