"""Shared pieces of the processed-items tools: field descriptions, required strings, the flow step's
owner lookup and read check, candidate identifier lists."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from sqlalchemy import bindparam, select

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_common import parse_flow_step_id
from datamachine_mcp.engine import dedup
from datamachine_mcp.storage.models import Agent, Flow

FSID_DESC = "{pipeline_step_id}_{flow_id}"
SOURCE_DESC = "Handler slug, e.g. rss"
ITEM_DESC = "Item id in its source (GUID, URL…)"
CANDIDATES_DESC = "Identifiers to check"
Candidate = Annotated[str, Field(max_length=2048)]

# A flow's owner (its columns and its agent's status and slug) in one query, on table columns so
# that it runs on SQLAlchemy's Core path (these tools are called once per item by some clients).
_F, _A = Flow.__table__.c, Agent.__table__.c
OWNER = (
    select(_F.agent_id, _F.user_id, _A.status, _A.agent_slug)
    .select_from(Flow.__table__.outerjoin(Agent.__table__, _A.agent_id == _F.agent_id))
    .where(_F.flow_id == bindparam("fid"))
)
# mark-processed also needs the step list; check-processed-item gets the item's processed time in the
# same round trip (returned to the caller only after the access check on the owner passed).
OWNER_AND_STEPS = OWNER.add_columns(_F.pipeline_id, _F.flow_config)
OWNER_AND_ITEM = OWNER.add_columns(dedup.PROCESSED_AT.scalar_subquery())


def _trimmed(value: str, code: str, field: str) -> str:
    text = value.strip()
    if not text:
        raise AbilityError(code, f"{field} is required; give a non-empty {field}.", field=field)
    return text


def required(flow_step_id: str, source_type: str | None = None, item: str | None = None) -> tuple[str, str, str]:
    """Trim the required strings; empty ones are refused in the order flow step, source, item."""
    fsid = _trimmed(flow_step_id, "flow_step_id_required", "flow_step_id")
    source = _trimmed(source_type, "source_type_required", "source_type") if source_type is not None else ""
    ident = _trimmed(item, "item_identifier_required", "item_identifier") if item is not None else ""
    return fsid, source, ident


async def readable(ctx: AbilityContext, flow_step_id: str) -> bool:
    """Whether the step's flow exists (False = answer "nothing processed"); raises if it is unreadable."""
    parsed = parse_flow_step_id(flow_step_id)
    if parsed is None:
        return False
    flow_id = parsed[1]
    row = (await ctx.session.execute(OWNER, {"fid": flow_id})).first()
    if row is None:
        return False
    await authorize_read(ctx, flow_id, *row)
    return True


async def authorize_read(
    ctx: AbilityContext, flow_id: int, agent_id: Any, user_id: int, status: Any, slug: Any
) -> None:
    owner = Owner(agent_id=agent_id, user_id=user_id, agent_status=status, agent_slug=slug)
    await ctx.access.authorize(owner, "viewer", mutating=False, target={"type": "flow", "id": flow_id})


def step_not_found(flow_step_id: str, why: str) -> AbilityError:
    return AbilityError(
        "flow_step_not_found",
        f"Flow step '{flow_step_id}' not found: {why}. Use get-flow-steps to list a flow's step ids.",
        flow_step_id=flow_step_id,
    )


def candidates(values: list[str]) -> dict[str, str]:
    """``{normalised identifier: identifier as given}``: trimmed for lookup, first occurrence kept, empties dropped."""
    out: dict[str, str] = {}
    for given in values:
        text = given.strip()
        if text:
            out.setdefault(dedup.normalize_identifier(text), given)
    return out
