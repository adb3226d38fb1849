"""Shared pieces of the pipeline tools: the step-seed input, the owner of a new pipeline
and step renumbering, used by create-pipeline, the step tools, import-pipelines and the workflow checks.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.json_schema import UNPUBLISHED
from datamachine_mcp.abilities.pipeline_common import ordered_steps
from datamachine_mcp.abilities.schema import Input
from datamachine_mcp.storage.models import Agent


class StepSeedIn(Input):
    """A pipeline-step seed: label, AI fields, handler defaults; other keys are kept (as in ``pipeline_config``)."""

    model_config = ConfigDict(extra="allow")

    label: str | None = Field(None, max_length=255, description="Label")
    handler_slug: str | None = Field(None, max_length=100, description="Default handler")
    # Another spelling of handler_slug: accepted, not published.
    handler: str | None = Field(
        None, max_length=100, description="Alias of handler_slug", json_schema_extra=UNPUBLISHED
    )
    handler_config: dict[str, Any] | None = Field(None, description="Its default config")
    system_prompt: str | None = Field(None, max_length=50000, description="ai: system prompt")
    provider: str | None = Field(None, max_length=50, description="ai: openai, anthropic or sampling")
    model: str | None = Field(None, max_length=100, description="ai: model")
    temperature: float | None = Field(None, ge=0, le=2, description="ai: temperature")
    max_tokens: int | None = Field(None, ge=1, le=32000, description="ai: reply token cap")
    skip_marker: str | None = Field(None, max_length=50, description="ai: skip-item reply prefix")


def seed_of(model: Input) -> dict[str, Any]:
    """The fields the caller set, without ``None`` values (a step seed as a dict)."""
    return {k: v for k, v in model.model_dump(exclude_unset=True).items() if v is not None}


async def agent_or_error(ctx: AbilityContext, agent_id: int) -> Agent:
    agent = await ctx.session.get(Agent, agent_id)
    if agent is None:
        raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
    return agent


async def new_resource_owner(
    ctx: AbilityContext, agent_id: int | None, *, shared: bool = False, what: str = "pipeline"
) -> tuple[int | None, int]:
    """(agent_id, user_id) of a new pipeline, with admin on it checked (docs/access.md, New resources).

    The ``agent_id`` input, else the principal's agent, else the caller's user; ``shared`` (global
    administrators) makes a user-0 resource without an agent.
    """
    p = ctx.principal
    if shared:
        ctx.access.require_global_admin(f"Creating a shared {what} (shared: true)", target={"type": "user", "id": 0})
        if agent_id is not None:
            raise AbilityError(
                "invalid_input",
                f"A shared {what} belongs to no agent: omit agent_id, or omit shared to create it for the agent.",
                errors=[{"field": "agent_id", "message": "not allowed with shared: true"}],
            )
        await ctx.access.authorize(
            Owner(agent_id=None, user_id=0), "admin", mutating=True, target={"type": "user", "id": 0}
        )
        return None, 0
    target = agent_id if agent_id is not None else p.agent_id
    if target is not None:
        agent = await agent_or_error(ctx, target)
        await ctx.access.authorize(agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": target})
        return target, p.user_id
    await ctx.access.authorize(
        Owner(agent_id=None, user_id=p.user_id), "admin", mutating=True, target={"type": "user", "id": p.user_id}
    )
    return None, p.user_id


def renumber(config: dict[str, Any]) -> dict[str, Any]:
    """A pipeline_config with execution_order 0..n-1 in the current order (new step dicts)."""
    return {s["pipeline_step_id"]: {**s, "execution_order": i} for i, s in enumerate(ordered_steps(config))}
