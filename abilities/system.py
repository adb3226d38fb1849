"""System toolset: who am I. Health checks and tasks come with the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.principal import level_visible
from datamachine_mcp.abilities.registry import TOOLSETS, ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.abilities.toolsets import ENABLE_HINT, listed, summarize


class WhoamiIn(Input):
    pass


class ToolsetCount(Output):
    toolset: str = Field(description="Toolset name")
    listed: int = Field(description="Its tools listed for this session")
    total: int = Field(description="Its tools in all")


class WhoamiOut(Output):
    user_id: int = Field(description="The user this session acts as")
    agent_id: int | None = Field(description="Agent context (null = none)")
    agent_slug: str | None = Field(description="Slug of the agent context")
    is_admin: bool = Field(description="Global administrator rights")
    capabilities: list[str] | None = Field(description="Token scopes (null = no narrowing)")
    token_prefix: str | None = Field(description="Display prefix of the token used (never the secret)")
    transport: Literal["stdio", "http", "cli"] = Field(description="How this session is connected")
    toolsets: list[ToolsetCount] = Field(description="Per toolset: tools listed for this session, of all it has")
    enabled: list[str] = Field(description="The process's tool selection: core, all, toolset names, tool:<name>")
    enable_hint: str | None = Field(description="How to list the other tools (null when all are listed)")
    read_only: bool = Field(description="Whether mutating tools are hidden in this process")
    server_version: str = Field(description="datamachine-mcp version")


def toolset_counts(ctx: AbilityContext) -> list[ToolsetCount]:
    """Per toolset, the tools this session sees listed (selection, --read-only, its role) and the total."""
    rt = ctx.runtime
    listed_n = dict.fromkeys(TOOLSETS, 0)
    total_n = dict.fromkeys(TOOLSETS, 0)
    for a in rt.catalog.declared.values():  # one pass: whoami is called often and reads no database
        if a.toolset not in total_n:
            continue
        total_n[a.toolset] += 1
        if (
            (a.read_only or not rt.read_only)
            and listed(a, rt.toolsets, rt.tools)
            and level_visible(ctx.principal, a.level, a.toolset)
        ):
            listed_n[a.toolset] += 1
    return [ToolsetCount(toolset=t, listed=listed_n[t], total=total_n[t]) for t in TOOLSETS]


@ability(
    "whoami",
    core=True,
    toolset="system",
    level="any",
    read_only=True,
    idempotent=True,
    description=("Who this session acts as, which toolsets are listed and how to list more."),
)
async def whoami(ctx: AbilityContext, inp: WhoamiIn) -> WhoamiOut:
    p = ctx.principal
    selection = summarize(ctx.runtime.catalog.declared, ctx.runtime.toolsets, ctx.runtime.tools, ctx.runtime.read_only)
    return WhoamiOut(
        user_id=p.user_id,
        agent_id=p.agent_id,
        agent_slug=p.agent_slug,
        is_admin=p.is_admin,
        capabilities=sorted(p.capabilities) if p.capabilities is not None else None,
        token_prefix=p.token_prefix,
        transport=p.transport if p.transport in ("stdio", "http", "cli") else "stdio",
        toolsets=toolset_counts(ctx),
        enabled=selection.enabled,
        enable_hint=ENABLE_HINT if selection.hidden_tools else None,
        read_only=ctx.runtime.read_only,
        server_version=ctx.runtime.version,
    )
