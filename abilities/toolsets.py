"""Which tools a process lists: the ``--toolsets`` / ``--tools`` selection.

``core`` (the default) is a small list covering a whole journey, for clients that carry every tool
definition in every turn; ``all`` lists every tool; toolset names add whole toolsets; single tools are
added by name. The selection narrows the tool list only: resources (reads) are offered whatever the
selection, and the caller's role decides what each read returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from difflib import get_close_matches

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


@dataclass(frozen=True)
class SelectionSummary:
    enabled: list[str]  # the selection as given: profiles and toolset names, then single tools
    hidden_tools: int


def summarize(
    abilities: Mapping[str, Declared], toolsets: frozenset[str] | None, tools: Iterable[str], read_only: bool
) -> SelectionSummary:
    extra = sorted(frozenset(tools))
    enabled = [ALL] if toolsets is None else [n for n in (*PROFILES, *TOOLSETS) if n in toolsets]
    hidden = [a for a in abilities.values() if (a.read_only or not read_only) and not listed(a, toolsets, extra)]
    return SelectionSummary(
        enabled=enabled + [f"tool:{t}" for t in extra],
        hidden_tools=len(hidden),
    )


def instructions_note(abilities: Mapping[str, Declared], toolsets: frozenset[str] | None, tools: Iterable[str]) -> str:
    """The part of the server instructions that says what is listed and how to list the rest."""
    summary = summarize(abilities, toolsets, tools, read_only=False)
    text = f"Toolsets: {CORE} (default), {ALL}, {', '.join(TOOLSETS)}. Enabled: {', '.join(summary.enabled)}."
    if summary.hidden_tools:
        text += f" {summary.hidden_tools} tools are not listed. {ENABLE_HINT}"
    return text


def unknown_tool_text(
    name: str, abilities: Mapping[str, Declared], toolsets: frozenset[str] | None, tools: Iterable[str], read_only: bool
) -> str:
    """Why ``name`` is not a tool here: hidden by the selection (how to list it) or a typo (close matches)."""
    ability = abilities.get(name)
    if ability is not None and read_only and not ability.read_only:
        return (
            f"Unknown tool: {name}. It changes data and this server runs with --read-only: "
            "restart it without --read-only to use it."
        )
    if ability is not None:
        return (
            f"Unknown tool: {name}. It is in the {ability.toolset} toolset, not listed by this server: restart it "
            f"with --tools {name} (env DATAMACHINE_TOOLS) or --toolsets core,{ability.toolset}."
        )
    offered = [s for s, a in abilities.items() if listed(a, toolsets, tools) and (a.read_only or not read_only)]
    close = get_close_matches(name, offered, n=3, cutoff=0.6) or get_close_matches(name, list(abilities), n=3)
    if close:
        return f"Unknown tool: {name}. Did you mean {' or '.join(close)}?"
    return f"Unknown tool: {name}. tools/list shows the tools this server offers."
