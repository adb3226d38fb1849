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


class WhoamiOut(Output):
    user_id: int = Field(description="The user this session acts as")
    agent_id: int | None = Field(description="Agent context (null = none)")
    agent_slug: str | None = Field(description="Slug of the agent context")
    is_admin: bool = Field(description="Global administrator rights")
    capabilities: list[str] | None = Field(description="Token scopes (null = no narrowing)")
    token_prefix: str | None = Field(description="Display prefix of the token used (never the secret)")
    transport: Literal["stdio", "http", "cli"] = Field(description="How this session is connected")
    toolsets: list[str] = Field(description="Toolsets with at least one tool listed for this session")
    enabled: list[str] = Field(description="The process's tool selection: core, all, toolset names, tool:<name>")
    not_listed: list[str] = Field(description="Toolsets with tools this process does not list")
    enable_hint: str | None = Field(description="How to list the other tools (null when all are listed)")
    read_only: bool = Field(description="Whether mutating tools are hidden in this process")
    server_version: str = Field(description="datamachine-mcp version")


def exposed_toolsets(ctx: AbilityContext) -> list[str]:
    rt = ctx.runtime
    out = []
    for toolset in TOOLSETS:
        tools = [
            a
            for a in rt.catalog.declared.values()
            if a.toolset == toolset and (a.read_only or not rt.read_only) and listed(a, rt.toolsets, rt.tools)
        ]
        if any(level_visible(ctx.principal, a.level, a.toolset) for a in tools):
            out.append(toolset)
    return out


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
        toolsets=exposed_toolsets(ctx),
        enabled=selection.enabled,
        not_listed=selection.hidden_toolsets,
        enable_hint=ENABLE_HINT if selection.hidden_tools else None,
        read_only=ctx.runtime.read_only,
        server_version=ctx.runtime.version,
    )
