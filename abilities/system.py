"""System toolset: who am I (abilities.md §12). Health checks and tasks come with the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.registry import TOOLSETS, ability, registered
from datamachine_mcp.abilities.runner import visible
from datamachine_mcp.abilities.schema import Input, Output


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
    toolsets: list[str] = Field(description="Toolsets exposed to this session")
    read_only: bool = Field(description="Whether mutating tools are hidden in this process")
    server_version: str = Field(description="datamachine-mcp version")


def exposed_toolsets(ctx: AbilityContext) -> list[str]:
    rt = ctx.runtime
    out = []
    for toolset in TOOLSETS:
        if rt.toolsets is not None and toolset not in rt.toolsets:
            continue
        tools = [a for a in registered().values() if a.toolset == toolset and (a.read_only or not rt.read_only)]
        if any(visible(a, ctx.principal) for a in tools):
            out.append(toolset)
    return out


@ability(
    "whoami",
    toolset="system",
    level="any",
    read_only=True,
    idempotent=True,
    description=(
        "Show who this session acts as: user, agent, admin flag, token scopes and which toolsets are exposed. "
        "Call it first when unsure what you may do."
    ),
)
async def whoami(ctx: AbilityContext, inp: WhoamiIn) -> WhoamiOut:
    p = ctx.principal
    return WhoamiOut(
        user_id=p.user_id,
        agent_id=p.agent_id,
        agent_slug=p.agent_slug,
        is_admin=p.is_admin,
        capabilities=sorted(p.capabilities) if p.capabilities is not None else None,
        token_prefix=p.token_prefix,
        transport=p.transport if p.transport in ("stdio", "http", "cli") else "stdio",
        toolsets=exposed_toolsets(ctx),
        read_only=ctx.runtime.read_only,
        server_version=ctx.runtime.version,
    )
