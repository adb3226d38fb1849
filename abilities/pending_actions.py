"""Jobs toolset, approvals: list, read and decide pending actions (docs/engine.md, Waits: approval and webhook gate).

A pending action is a job parked at an ``approval`` step: ``wait_ref`` holds its ``pa_<32 hex>`` id and
``engine_data.approval`` its state, kept (with the decision record) after the job moves on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.job_common import job_ref
from datamachine_mcp.abilities.job_reports import check_agent_filter
from datamachine_mcp.abilities.jobs import engine_of, publish_changes
from datamachine_mcp.abilities.pipeline_common import owner_of
from datamachine_mcp.abilities.questions import decision
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Output, PageOut
from datamachine_mcp.engine import front
from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.crypto import mask
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.timeutil import iso, utcnow

ACTION_PATTERN = r"^pa_[0-9a-f]{32}$"
# Without a decision the server asks the user; a client that cannot be asked gets this.
DECISION_REQUIRED = (
    "decision_required",
    "Give decision (accepted or rejected), with a note: this client cannot ask the user. Ask them, then call again.",
)
APPROVAL_KEYS = (
    "action_id",
    "flow_step_id",
    "next_flow_step_id",
    "description",
    "preview",
    "requested_at",
    "expires_at",
    "status",
)
DECISION_KEYS = ("decided_by_user_id", "decided_by_agent_id", "decided_at", "note")


class PendingAction(Output):
    action_id: str = Field(description="Action id")
    flow_step_id: str | None = Field(description="The approval step")
    next_flow_step_id: str | None = Field(description="Step an acceptance resumes at (null: the job completes)")
    description: str | None = Field(description="What the reviewer is asked to check")
    preview: dict[str, Any] | None = Field(description="{title, body}: the newest input packet, body cut at 2,000")
    requested_at: str | None = Field(description="When the job parked (ISO 8601 UTC)")
    expires_at: str | None = Field(description="When the action times out, or null")
    status: str = Field(description="pending, accepted, rejected, expired or cancelled")
    job_id: int = Field(description="The waiting job")
    flow_id: int | str | None = Field(description='Flow id, or "direct"')
    flow_name: str | None = Field(description="Flow name at run time")
    pipeline_id: int | str | None = Field(description='Pipeline id, or "direct"')
    agent_id: int | None = Field(description="Agent the job runs for")
    job_status: str = Field(description="The job's display status")


class DecidedAction(PendingAction):
    decided_by_user_id: int | None = Field(description="Who decided (null while pending)")
    decided_by_agent_id: int | None = Field(description="Agent context of the decision (null while pending)")
    decided_at: str | None = Field(description="When it was decided (null while pending)")
    note: str | None = Field(description="Reason")


def action_dict(job: Job, *, decided: bool = False) -> dict[str, Any]:
    data = job.engine_data or {}
    raw_approval = data.get("approval")
    approval = raw_approval if isinstance(raw_approval, dict) else {}
    out: dict[str, Any] = {key: mask(approval.get(key)) for key in APPROVAL_KEYS}
    out["action_id"] = approval.get("action_id") or job.wait_ref
    out["status"] = approval.get("status") or "pending"
    out.update(
        job_id=job.job_id,
        flow_id=job_ref(job.flow_id),
        flow_name=(data.get("flow") or {}).get("name") if job.flow_id else None,
        pipeline_id=job_ref(job.pipeline_id),
        agent_id=job.agent_id,
        job_status=st.display(job.status, job.status_reason),
    )
    if decided:
        out.update({key: approval.get(key) for key in DECISION_KEYS})
    return out


async def find_action(ctx: AbilityContext, action_id: str) -> Job:
    """The job of an approval action, current (wait_ref) or past (engine_data.approval.action_id)."""
    job = (
        await ctx.session.execute(select(Job).where(Job.wait_ref == action_id, Job.wait_kind == "approval"))
    ).scalar_one_or_none()
    if job is None:
        # A job that moved on to a webhook gate has a new wait_ref; its decided approval stays in engine_data.
        job = (
            (
                await ctx.session.execute(
                    select(Job)
                    .where(
                        Job.wait_kind.is_not(None),
                        Job.engine_data[("approval", "action_id")].as_string() == action_id,
                    )
                    .order_by(Job.job_id)
                )
            )
            .scalars()
            .first()
        )
    if job is None:
        raise AbilityError(
            "pending_action_not_found",
            f"Pending action {action_id} not found; list-pending-actions shows the open ones.",
            action_id=action_id,
        )
    return job


# --- list-pending-actions ---------------------------------------------------------------------


class ListPendingIn(Input):
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    flow_id: int | None = Field(None, ge=1, description="Flow filter")
    pipeline_id: int | None = Field(None, ge=1, description="Pipeline filter")
    per_page: int = Field(20, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class ListPendingOut(PageOut):
    actions: list[PendingAction] = Field(description="Open approvals, oldest request first")


@ability(
    "list-pending-actions",
    core=True,
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="List approvals waiting for a decision.",
)
async def list_pending_actions(ctx: AbilityContext, inp: ListPendingIn) -> ListPendingOut:
    conds: list[Any] = [
        await ctx.access.scope_filter(Job.agent_id, Job.user_id),
        Job.status == st.WAITING,
        Job.wait_kind == "approval",
    ]
    if inp.agent_id is not None:
        await check_agent_filter(ctx, inp.agent_id)
        conds.append(Job.agent_id == inp.agent_id)
    if inp.flow_id is not None:
        conds.append(Job.flow_key == inp.flow_id)
    if inp.pipeline_id is not None:
        conds.append(Job.pipeline_key == inp.pipeline_id)
    total = int((await ctx.session.execute(select(func.count()).select_from(Job).where(*conds))).scalar() or 0)
    rows = await ctx.session.execute(
        select(Job)
        .where(*conds)
        .order_by(Job.engine_data[("approval", "requested_at")].as_string(), Job.job_id)
        .limit(inp.per_page)
        .offset(inp.offset)
    )
    return ListPendingOut(
        actions=[action_dict(j) for j in rows.scalars()], total=total, per_page=inp.per_page, offset=inp.offset
    )


# --- get-pending-action -----------------------------------------------------------------------


class GetPendingIn(Input):
    action_id: str = Field(pattern=ACTION_PATTERN, description="Action id")


class GetPendingOut(Output):
    action: DecidedAction = Field(description="The action with its decision record")


@ability(
    "get-pending-action",
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Get one approval action and its decision.",
)
async def get_pending_action(ctx: AbilityContext, inp: GetPendingIn) -> GetPendingOut:
    job = await find_action(ctx, inp.action_id)
    await ctx.access.authorize(
        await owner_of(ctx, job.agent_id, job.user_id),
        "viewer",
        mutating=False,
        target={"type": "job", "id": job.job_id},
    )
    action = action_dict(job, decided=True)
    if action["action_id"] != inp.action_id:  # found through history: the job has parked again since
        action["action_id"] = inp.action_id
    return GetPendingOut(action=action)


# --- resolve-pending-action -------------------------------------------------------------------


class ResolveIn(Input):
    action_id: str = Field(pattern=ACTION_PATTERN, description="Action id")
    decision: Literal["accepted", "rejected"] | None = Field(None, description="Omit to ask the user")
    note: str | None = Field(None, max_length=1000, description="Reason")


class ResolveOut(Output):
    action_id: str = Field(description="Action id")
    job_id: int = Field(description="The job")
    decision: Literal["accepted", "rejected"] = Field(description="The decision recorded")
    decided_at: str = Field(description="ISO 8601 UTC")
    job_status: str = Field(description="The job's display status after the decision")
    message: str = Field(description="Human-readable result")


def already_resolved(job: Any, action_id: str) -> AbilityError:
    approval = (job.engine_data or {}).get("approval") or {}
    if approval.get("action_id") != action_id:
        approval = {}  # the job parked at a new approval since; this action's record was superseded
    status = approval.get("status") or "pending"
    if status == "pending":  # recorded as pending, but the job left waiting some other way
        status = "cancelled" if job.status == st.CANCELLED else "expired"
    decided_at = approval.get("decided_at")
    when = f" at {decided_at}" if decided_at else ""
    return AbilityError(
        "pending_action_already_resolved",
        f"Pending action {action_id} is already {status}{when} (job {job.job_id} is "
        f"{st.display(job.status, job.status_reason)}); it cannot be decided again.",
        action_id=action_id,
        job_id=job.job_id,
        status=status,
        decided_at=decided_at,
        decided_by_user_id=approval.get("decided_by_user_id"),
    )


PREVIEW_TITLES = 3
PREVIEW_BODY = 280


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


async def approval_details(ctx: AbilityContext, inp: ResolveIn) -> str | None:
    """For the question: the flow, the approval step (label and what to check) and the packets it holds."""
    job = await find_action(ctx, inp.action_id)
    owner = await owner_of(ctx, job.agent_id, job.user_id)
    await ctx.access.authorize(owner, "operator", mutating=False, target={"type": "job", "id": job.job_id})
    action = action_dict(job)
    if job.wait_ref != inp.action_id or action["status"] != "pending":
        return None  # decided already: the call says so
    flow = f"Flow: {action['flow_name']} (flow {action['flow_id']}, job {job.job_id})" if job.flow_id else ""
    lines = [flow or f"Job {job.job_id} (a direct workflow)"]
    engine = ctx.runtime.engine
    step = (await front.position_of(engine, job)).step if engine is not None else "approval step"
    lines.append(f"{step[0].upper()}{step[1:]}" + (f" — {action['description']}" if action["description"] else ""))
    packets = [p for p in mask(job.packets or []) if isinstance(p, dict)]
    titles = [str((p.get("data") or {}).get("title") or "(untitled)") for p in packets[:PREVIEW_TITLES]]
    if titles:
        more = f" and {len(packets) - len(titles)} more" if len(packets) > len(titles) else ""
        lines.append(f"Awaiting approval: {', '.join(_clip(t, 80) for t in titles)}{more}")
    body = str((action["preview"] or {}).get("body") or "")
    if body:
        lines.append(f"Preview: {_clip(body, PREVIEW_BODY)}")
    return "\n".join(lines)


@ability(
    "resolve-pending-action",
    core=True,
    ask=decision(
        lambda i: f"Approval {i.action_id}: accept (the job resumes) or reject it?",
        missing="decision",
        properties={
            "decision": {
                "type": "string",
                "title": "Decision",
                "enum": ["accepted", "rejected"],
            },
            "note": {
                "type": "string",
                "title": "Reason",
                "description": "Recorded with the decision",
                "maxLength": 1000,
            },
        },
        required=("decision",),
        unsupported=DECISION_REQUIRED,
        details=approval_details,
    ),
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description="Decide an approval: accept (the job resumes) or reject. Without a decision the user is asked.",
)
async def resolve_pending_action(ctx: AbilityContext, inp: ResolveIn) -> ResolveOut:
    if inp.decision is None:  # the server asks before calling when it can; here nobody could be asked
        raise AbilityError(*DECISION_REQUIRED)
    now = utcnow()
    p = ctx.principal
    resumed = False
    async with ctx.transaction() as session:
        job = await find_action(ctx, inp.action_id)
        await ctx.access.authorize(
            await owner_of(ctx, job.agent_id, job.user_id),
            "operator",
            mutating=True,
            target={"type": "job", "id": job.job_id},
        )
        job_id = job.job_id
        approval = dict((job.engine_data or {}).get("approval") or {})
        if job.status != st.WAITING or job.wait_ref != inp.action_id or approval.get("status") != "pending":
            raise already_resolved(job, inp.action_id)
        snap = await ctx.settings()
        try:
            decided = await front.resolve_approval(
                engine_of(ctx),
                session,
                job_id,
                inp.action_id,
                inp.decision,
                note=inp.note,
                user_id=p.user_id,
                agent_id=p.agent_id,
                now=now,
                threshold=str(snap["log_level"]),
                claim_ttl=snap.int("claim_ttl_seconds"),
            )
        except front.AlreadyResolved as gone:
            raise already_resolved(gone.job, inp.action_id) from None
        current, changes, resumed = decided.job, decided.changes, decided.resumed
        job_status = st.display(current.status, current.status_reason)
        await ctx.audit(
            f"approval {inp.action_id} of job {job_id} {inp.decision}; job is {job_status}",
            target=("job", job_id),
            changes=[f"approval: pending -> {inp.decision}", f"status: waiting -> {job_status}"],
            agent_id=current.agent_id,
            job_id=job_id,
            flow_id=current.flow_key,
            pipeline_id=current.pipeline_key,
        )
    await publish_changes(ctx, changes, wake=resumed)
    if resumed:
        message = f"Accepted: job {job_id} resumes at step {approval.get('next_flow_step_id')}."
    elif inp.decision == "accepted":
        message = f"Accepted: job {job_id} completed (the approval was its last step)."
    else:
        message = f"Rejected: job {job_id} is {job_status}."
    return ResolveOut(
        action_id=inp.action_id,
        job_id=job_id,
        decision=inp.decision,
        decided_at=iso(now),
        job_status=job_status,
        message=message,
    )
