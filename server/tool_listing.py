"""What a process lists: the tools it exposes, their definitions, and the server instructions."""

from __future__ import annotations

from collections.abc import Mapping

import mcp_types as types

from datamachine_mcp.abilities.catalog import Catalog, Declared, catalog_of
from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.abilities.toolsets import instructions_note, listed
from datamachine_mcp.server.icons import TOOLSET_ICONS

INSTRUCTIONS = (
    "Data Machine automation engine. Pipelines are reusable step templates (fetch → ai → publish …); flows "
    "are configured, schedulable instances of a pipeline; running a flow creates a job. Agents own resources "
    "and share them through roles (viewer < operator < admin). Call whoami first to see who you act as. "
    "Errors start with a stable code (e.g. 'flow_not_found: …')."
)


def exposed_abilities(abilities: Mapping[str, Ability], runtime: Runtime) -> Catalog:
    """Tools that exist in this process: ``--toolsets``/``--tools`` and ``--read-only`` remove the others."""
    return Catalog(
        {
            slug: a
            for slug, a in catalog_of(abilities).declared.items()
            if listed(a, runtime.toolsets, runtime.tools) and (a.read_only or not runtime.read_only)
        }
    )


def resource_twins(abilities: Mapping[str, Ability], runtime: Runtime) -> Catalog:
    """Abilities that may serve resource reads: every read-only one, whatever ``--toolsets``/``--tools``/
    ``--read-only`` list as tools (reads follow the caller's role, not the tool selection)."""
    return Catalog({slug: a for slug, a in catalog_of(abilities).declared.items() if a.read_only})


def instructions(abilities: Mapping[str, Ability], runtime: Runtime) -> str:
    declared = catalog_of(abilities).declared
    return f"{INSTRUCTIONS} {instructions_note(declared, runtime.toolsets, runtime.tools)}"


def tool_definition(ability: Declared) -> types.Tool:
    hints = ability.annotations()
    return types.Tool(
        name=ability.slug,
        title=ability.title,
        description=ability.description,
        input_schema=ability.input_schema,
        output_schema=ability.output_schema,
        icons=[TOOLSET_ICONS[ability.toolset]],
        annotations=types.ToolAnnotations(
            title=hints["title"],
            read_only_hint=hints["readOnlyHint"],
            destructive_hint=hints["destructiveHint"],
            idempotent_hint=hints["idempotentHint"],
            open_world_hint=hints["openWorldHint"],
        ),
    )
