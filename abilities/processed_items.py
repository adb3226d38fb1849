"""Processed-items toolset: the dedup ledger of flow steps (docs/engine.md, Dedup and claims).

Rows take their owner from their flow. Reads answer "nothing processed" for a flow step id that does
not parse or whose flow does not exist; an existing flow the caller cannot read is
``agent_access_denied``. The database work lives in ``engine.dedup`` (shared with the fetch engine);
the owner lookup and input checks the tools share in ``abilities.processed_common``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.access import Owner, Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_common import flows_of, load_flow, load_pipeline, parse_flow_step_id
from datamachine_mcp.abilities.processed_common import (
    CANDIDATES_DESC,
    FSID_DESC,
    ITEM_DESC,
    OWNER_AND_ITEM,
    OWNER_AND_STEPS,
    SOURCE_DESC,
    Candidate,
    authorize_read,
    candidates,
    readable,
    required,
    step_not_found,
)
from datamachine_mcp.abilities.questions import confirmation
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output, ts
from datamachine_mcp.engine import dedup
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.timeutil import utcnow

# --- mark-processed ---------------------------------------------------------------------------


class MarkProcessedIn(Input):
    flow_step_id: str = Field(max_length=255, description="{pipeline_step_id}_{flow_id}")
    source_type: str = Field(max_length=50, description=SOURCE_DESC)
    item_identifier: str = Field(max_length=2048, description=ITEM_DESC)
    job_id: int | None = Field(None, ge=1, description="Job that processed it")


class MarkProcessedOut(Output):
    flow_step_id: str = Field(description="Flow step id")
    source_type: str = Field(description="Source type")
    item_identifier: str = Field(description="Identifier as stored (sha256:<hex> when longer than 255 characters)")
    job_id: int | None = Field(description="Job recorded on the row")
    processed_at: str = Field(description="When it was marked (ISO 8601 UTC)")
    created: bool = Field(description="A new row was inserted (false: an existing row or claim was updated)")


@ability(
    "mark-processed",
    core=True,
    toolset="processed-items",
    level="operator",
    idempotent=True,
    description="Record an item as processed for a flow step so fetches skip it.",
)
async def mark_processed(ctx: AbilityContext, inp: MarkProcessedIn) -> MarkProcessedOut:
    fsid, source, ident = required(inp.flow_step_id, inp.source_type, inp.item_identifier)
    parsed = parse_flow_step_id(fsid)
    if parsed is None:
        raise step_not_found(fsid, "it is not of the form {pipeline_step_id}_{flow_id}")
    flow_id = parsed[1]
    row = (await ctx.session.execute(OWNER_AND_STEPS, {"fid": flow_id})).first()
    if row is None:
        raise step_not_found(fsid, f"flow {flow_id} does not exist")
    agent_id, user_id, status, slug, pipeline_id, flow_config = row
    if fsid not in (flow_config or {}):
        raise step_not_found(fsid, f"flow {flow_id} has no such step")
    owner = Owner(agent_id=agent_id, user_id=user_id, agent_status=status, agent_slug=slug)
    await ctx.access.authorize(owner, "operator", mutating=True, target={"type": "flow", "id": flow_id})
    if inp.job_id is not None:
        job_flow = (await ctx.session.execute(select(Job.flow_key).where(Job.job_id == inp.job_id))).first()
        if job_flow is None:
            raise AbilityError("job_not_found", f"Job {inp.job_id} not found.", job_id=inp.job_id)
        if job_flow[0] != flow_id:
            raise AbilityError(
                "job_flow_mismatch",
                f"Job {inp.job_id} does not belong to flow {flow_id}; give a job of this flow or omit job_id.",
                job_id=inp.job_id,
                flow_id=flow_id,
                job_flow_id=job_flow[0],
            )
    now = utcnow()
    item, created = await dedup.mark_processed(
        ctx.session,
        flow_step_id=fsid,
        flow_id=flow_id,
        source_type=source,
        identifier=ident,
        job_id=inp.job_id,
        now=now,
    )
    await ctx.audit(
        f"item marked processed for flow step {fsid} ({source})",
        target=("flow_step", fsid),
        changes=["processed_items"],
        agent_id=agent_id,
        flow_id=flow_id,
        pipeline_id=pipeline_id,
        job_id=item.job_id,
        created=created,
    )
    return MarkProcessedOut(
        flow_step_id=fsid,
        source_type=source,
        item_identifier=item.item_identifier,
        job_id=item.job_id,
        processed_at=ts(item.processed_timestamp) or "",
        created=created,
    )


# --- check-processed-item / processed-items-get-processed-at --------------------------------------


class ItemIn(Input):
    flow_step_id: str = Field(max_length=255, description=FSID_DESC)
    source_type: str = Field(max_length=50, description=SOURCE_DESC)
    item_identifier: str = Field(max_length=2048, description=ITEM_DESC)


class CheckOut(Output):
    is_processed: bool = Field(description="A processed row exists (in-flight claims do not count)")
    processed_at: str | None = Field(description="When it was processed (ISO 8601 UTC), else null")


async def _processed_at(ctx: AbilityContext, inp: ItemIn) -> Any:
    """The item's processed time in one query with its flow's owner; None for unknown steps and flows."""
    fsid, source, ident = required(inp.flow_step_id, inp.source_type, inp.item_identifier)
    parsed = parse_flow_step_id(fsid)
    if parsed is None:
        return None
    params = {"fid": parsed[1], "fsid": fsid, "source": source, "item": dedup.normalize_identifier(ident)}
    row = (await ctx.session.execute(OWNER_AND_ITEM, params)).first()
    if row is None:
        return None
    await authorize_read(ctx, parsed[1], *row[:4])
    return row[4]


@ability(
    "check-processed-item",
    core=True,
    toolset="processed-items",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Check whether an item was processed for a flow step.",
)
async def check_processed_item(ctx: AbilityContext, inp: ItemIn) -> CheckOut:
    stamp = await _processed_at(ctx, inp)
    return CheckOut(is_processed=stamp is not None, processed_at=ts(stamp))


class ProcessedAtOut(Output):
    processed_at: int | None = Field(description="When it was last processed (Unix seconds), else null")
    processed_at_iso: str | None = Field(description="The same time as ISO 8601 UTC, else null")


@ability(
    "processed-items-get-processed-at",
    toolset="processed-items",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Get when an item was processed for a flow step (null: never).",
)
async def get_processed_at(ctx: AbilityContext, inp: ItemIn) -> ProcessedAtOut:
    stamp = await _processed_at(ctx, inp)
    return ProcessedAtOut(processed_at=int(stamp.timestamp()) if stamp else None, processed_at_iso=ts(stamp))


# --- has-processed-history ----------------------------------------------------------------------


class HistoryIn(Input):
    flow_step_id: str = Field(max_length=255, description=FSID_DESC)


class HistoryOut(Output):
    has_history: bool = Field(description="The step has processed at least one item")
    processed_count: int = Field(description="Number of processed items of the step")


@ability(
    "has-processed-history",
    toolset="processed-items",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Check whether a flow step has processed any item yet.",
)
async def has_processed_history(ctx: AbilityContext, inp: HistoryIn) -> HistoryOut:
    fsid, _, _ = required(inp.flow_step_id)
    count = await dedup.processed_count(ctx.session, fsid) if await readable(ctx, fsid) else 0
    return HistoryOut(has_history=count > 0, processed_count=count)


# --- clear-processed-items ----------------------------------------------------------------------


class ClearIn(Input):
    clear_type: Literal["pipeline", "flow"] = Field(description="Scope")
    target_id: int = Field(ge=1, description="Pipeline or flow id")


class ClearOut(Output):
    deleted_count: int = Field(description="Processed rows and inactive claims deleted")
    skipped_claimed: int = Field(description="Active claims kept (a running job still holds them)")
    clear_type: Literal["pipeline", "flow"] = Field(description="Scope used")
    target_id: int = Field(description="Pipeline id or flow id")
    message: str = Field(description="Human-readable result")


@ability(
    "clear-processed-items",
    ask=confirmation(
        lambda i: (
            f"Forget the processed items of {i.clear_type} {i.target_id}? They will be fetched and processed again."
        )
    ),
    toolset="processed-items",
    level="admin",
    destructive=True,
    idempotent=True,
    description=("Forget the processed items of a flow or pipeline so they are fetched again."),
    error_fields={"clear_type": "clear_type_invalid", "target_id": "target_id_invalid"},
    missing_uses_code=("target_id",),
)
async def clear_processed_items(ctx: AbilityContext, inp: ClearIn) -> ClearOut:
    role: Role = "admin"
    if inp.clear_type == "flow":
        flow = await load_flow(ctx, inp.target_id, role, mutating=True)
        flow_ids, agent_id, pipeline_id, flow_id = [flow.flow_id], flow.agent_id, flow.pipeline_id, flow.flow_id
    else:
        pipeline = await load_pipeline(ctx, inp.target_id, role, mutating=True)
        flow_ids = [f.flow_id for f in await flows_of(ctx, pipeline.pipeline_id)]
        agent_id, pipeline_id, flow_id = pipeline.agent_id, pipeline.pipeline_id, None
    deleted, skipped = await dedup.clear_flows(ctx.session, flow_ids, utcnow())
    message = f"Deleted {deleted} processed items for {inp.clear_type} {inp.target_id}"
    if skipped:
        message += f"; kept {skipped} item(s) claimed by running jobs"
    if deleted:
        await ctx.audit(
            f"{deleted} processed items cleared for {inp.clear_type} {inp.target_id}",
            target=(inp.clear_type, inp.target_id),
            changes=["processed_items"],
            agent_id=agent_id,
            flow_id=flow_id,
            pipeline_id=pipeline_id,
            deleted_count=deleted,
            skipped_claimed=skipped,
        )
    return ClearOut(
        deleted_count=deleted,
        skipped_claimed=skipped,
        clear_type=inp.clear_type,
        target_id=inp.target_id,
        message=message,
    )


# --- find-stale / find-never-processed ----------------------------------------------------------


class FindStaleIn(Input):
    flow_step_id: str = Field(max_length=255, description=FSID_DESC)
    source_type: str = Field(max_length=50, description=SOURCE_DESC)
    candidate_identifiers: list[Candidate] = Field(max_length=5000, description=CANDIDATES_DESC)
    # capped like the retention settings (100 years): a cutoff must still be a date
    max_age_days: int = Field(ge=1, le=36500, description="Age threshold (days, 1-36500)")
    limit: int = Field(100, ge=1, le=5000, description="Maximum returned")


class FindStaleOut(Output):
    stale_ids: list[str] = Field(
        description="Identifiers processed longer ago than max_age_days, oldest first, as given"
    )
    count: int = Field(description="Number of identifiers returned")


@ability(
    "processed-items-find-stale",
    toolset="processed-items",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Of the given identifiers, those processed over max_age_days ago.",
    error_fields={"candidate_identifiers": "candidate_identifiers_invalid", "max_age_days": "max_age_days_invalid"},
)
async def find_stale(ctx: AbilityContext, inp: FindStaleIn) -> FindStaleOut:
    fsid, source, _ = required(inp.flow_step_id, inp.source_type)
    if not await readable(ctx, fsid):
        return FindStaleOut(stale_ids=[], count=0)
    wanted = candidates(inp.candidate_identifiers)
    times = await dedup.processed_times(ctx.session, fsid, source, wanted)
    cutoff = utcnow() - timedelta(days=inp.max_age_days)
    order = {key: i for i, key in enumerate(wanted)}
    stale = sorted((key for key, stamp in times.items() if stamp < cutoff), key=lambda k: (times[k], order[k]))
    ids = [wanted[key] for key in stale[: inp.limit]]
    return FindStaleOut(stale_ids=ids, count=len(ids))


class FindNeverIn(Input):
    flow_step_id: str = Field(max_length=255, description=FSID_DESC)
    source_type: str = Field(max_length=50, description=SOURCE_DESC)
    candidate_identifiers: list[Candidate] = Field(max_length=5000, description=CANDIDATES_DESC)
    limit: int = Field(100, ge=1, le=5000, description="Maximum returned")


class FindNeverOut(Output):
    never_processed: list[str] = Field(description="Identifiers never processed, in input order, duplicates removed")
    count: int = Field(description="Number of identifiers returned")


@ability(
    "processed-items-find-never-processed",
    toolset="processed-items",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Of the given identifiers, those never processed.",
    error_fields={"candidate_identifiers": "candidate_identifiers_invalid"},
)
async def find_never_processed(ctx: AbilityContext, inp: FindNeverIn) -> FindNeverOut:
    fsid, source, _ = required(inp.flow_step_id, inp.source_type)
    wanted = candidates(inp.candidate_identifiers)
    done: set[str] = set()
    if await readable(ctx, fsid):
        done = set(await dedup.processed_times(ctx.session, fsid, source, wanted))
    ids = [given for key, given in wanted.items() if key not in done][: inp.limit]
    return FindNeverOut(never_processed=ids, count=len(ids))
