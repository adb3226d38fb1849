"""Jobs toolset: starting flow runs, and the wait routine every waiting tool shares."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field
from sqlalchemy import ColumnElement, and_, false, or_, select, true

from datamachine_mcp.abilities.access import ROLE_RANK, Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.job_common import JobOut, child_counts, job_dict, load_job
from datamachine_mcp.abilities.pipeline_common import load_flow, owner_of
from datamachine_mcp.abilities.pipeline_views import notify_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.abilities.uris import FLOW, JOB
from datamachine_mcp.engine import front
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.worker import LIVENESS_KEY
from datamachine_mcp.storage.crypto import SecretUnavailable
from datamachine_mcp.storage.models import Agent, Job, Pipeline
from datamachine_mcp.storage.timeutil import iso, utcnow

MAX_WAIT = 300
# Default wait of run-flow, execute-workflow, run-task and wait-for-job: the result comes back in one call
# when it is quick, and the call always ends before a client that gives up at 60 s (Claude Desktop) does.
DEFAULT_WAIT = 45
WORKER_ALIVE_SECONDS = 60  # a worker heartbeat younger than this means jobs are being claimed
IDEMPOTENCY_PATTERN = r"^[\x20-\x7e]+$"

# A job's pipeline_id / flow_id as an input: an id, or "direct" for ad-hoc workflows.
JobRef = Annotated[int, Field(ge=1)] | Literal["direct"]
BaseStatus = Literal[
    "pending", "processing", "waiting", "completed", "failed", "cancelled", "completed_no_items", "agent_skipped"
]


def ref_condition(column_str: Any, column_key: Any, value: int | str) -> ColumnElement[bool]:
    """Filter on a job's pipeline/flow reference: the integer key, or the "direct" sentinel."""
    return column_str == "direct" if value == "direct" else column_key == value


async def role_condition(ctx: AbilityContext, required: Role) -> ColumnElement[bool]:
    """Jobs on which the principal holds at least ``required`` and whose agent is active: the rows a bulk
    mutation may touch (docs/access.md, Effective role on a resource)."""
    p = ctx.principal
    rank = ROLE_RANK[required]
    if p.agent_id is not None:
        role = "admin" if p.is_admin else await ctx.access.role_on_agent(p.agent_id)
        base = Job.agent_id == p.agent_id if role is not None and ROLE_RANK[role] >= rank else false()
    elif p.is_admin:
        base = true()
    else:
        ids = [agent_id for agent_id, role in (await ctx.access.agent_roles()).items() if ROLE_RANK[role] >= rank]
        base = or_(Job.agent_id.in_(ids), and_(Job.agent_id.is_(None), Job.user_id == p.user_id))
    active = or_(Job.agent_id.is_(None), Job.agent_id.in_(select(Agent.agent_id).where(Agent.status == "active")))
    return and_(base, active)


def uses_sampling(flow_config: dict[str, Any], pipeline_config: dict[str, Any]) -> bool:
    for entry in flow_config.values():
        if isinstance(entry, dict) and entry.get("step_type") == "ai":
            pstep = pipeline_config.get(entry.get("pipeline_step_id", ""), {})
            if pstep.get("provider") == "sampling":
                return True
    return False


async def job_output(ctx: AbilityContext, job: Job, role: str | None, *, engine_data: bool = False) -> dict[str, Any]:
    counts = (await child_counts(ctx, [job.job_id])).get(job.job_id)
    return job_dict(
        job,
        role=role,
        counts=counts,
        include_engine_data=engine_data,
        include_packets=True,
        public_base_url=ctx.runtime.public_base_url,
        gate_token=gate_token(ctx, job),
    )


def gate_token(ctx: AbilityContext, job: Job) -> str | None:
    """The plaintext webhook-gate token of a waiting job (for its resume URL), or None."""
    gate = (job.engine_data or {}).get("webhook_gate")
    if job.status != st.WAITING or job.wait_kind != "webhook_gate" or not isinstance(gate, dict):
        return None
    try:
        return ctx.runtime.box.decrypt(gate.get("token"), "webhook_gate_token")
    except SecretUnavailable:
        return None


async def describe_jobs(
    ctx: AbilityContext, jobs: list[Job], *, engine_data: bool = False, packets: bool = False
) -> list[dict[str, Any]]:
    """Job rows as the Job shape, redacted per the caller's role on each job."""
    counts = await child_counts(ctx, [j.job_id for j in jobs if (j.engine_data or {}).get("batch")])
    roles: dict[tuple[int | None, int], str | None] = {}
    out = []
    for job in jobs:
        key = (job.agent_id, job.user_id)
        if key not in roles:
            roles[key] = await ctx.access.effective_role(await owner_of(ctx, job.agent_id, job.user_id))
        out.append(
            job_dict(
                job,
                role=roles[key],
                counts=counts.get(job.job_id),
                include_engine_data=engine_data,
                include_packets=packets,
                public_base_url=ctx.runtime.public_base_url,
                gate_token=gate_token(ctx, job),
            )
        )
    return out


def engine_of(ctx: AbilityContext) -> Any:
    """The process's engine services (every runtime opened by the server has them)."""
    engine = ctx.runtime.engine
    if engine is None:
        raise AbilityError("engine_unavailable", "This process has no engine attached; jobs cannot be changed.")
    return engine


async def publish_changes(ctx: AbilityContext, changes: front.Changes, *, wake: bool = False) -> None:
    """After commit: announce the changed jobs and flows; ``wake`` starts claimable work at once."""
    await front.announce(ctx.runtime.engine, changes, wake=wake)


async def wait_and_describe(
    ctx: AbilityContext, job_id: int, seconds: float, *, stop_on_waiting: bool = False, engine_data: bool = False
) -> dict[str, Any]:
    """The shared wait routine of run-flow, execute-workflow, run-task and wait-for-job.

    A wait that ends before the job does says so in ``follow_up``: where the job is and how to follow
    it (docs/architecture.md, Waiting for a job).
    """
    engine = ctx.runtime.engine
    if engine is None:
        raise AbilityError("engine_unavailable", "This process has no engine attached; waits are not possible.")
    result = await front.wait_for_job(engine, job_id, seconds, stop_on_waiting=stop_on_waiting, progress=ctx.progress)
    if result.job is None:
        raise AbilityError("job_not_found", f"Job {job_id} not found (it was deleted while waiting).", job_id=job_id)
    async with ctx.reading():
        role = await ctx.access.effective_role(await owner_of(ctx, result.job.agent_id, result.job.user_id))
        job = await ctx.session.get(Job, job_id)
        described = await job_output(ctx, job or result.job, role, engine_data=engine_data)
    out: dict[str, Any] = {
        "job": described,
        "final": result.final,
        "timed_out": result.timed_out,
        "waited_seconds": round(result.waited_seconds, 3),
    }
    if not result.final:
        where = await front.position_of(engine, job or result.job)
        idle = described["base_status"] == st.PENDING and not await worker_alive(ctx)
        out["follow_up"] = follow_up(
            job_id, described["status"], where.step, result.waited_seconds, where.retrying, no_worker=idle
        )
    return out


async def worker_alive(ctx: AbilityContext) -> bool:
    """Whether any worker (in this or another process) ran recently: workers record a heartbeat at least
    every 15 s under an internal settings key, the one system-health-check reads."""
    async with ctx.reading():
        beats = await ctx.runtime.settings.internal_get(ctx.session, LIVENESS_KEY) or {}
    recent = iso(utcnow() - timedelta(seconds=WORKER_ALIVE_SECONDS))
    return any(isinstance(at, str) and at >= recent for at in beats.values())


def follow_up(
    job_id: int, status: str, step: str, waited: float, retrying: str | None = None, *, no_worker: bool = False
) -> str:
    """What to tell a caller whose wait ended before the job: it runs on (or when it retries), and how
    to follow it."""
    if no_worker:
        return (
            f"Job {job_id} is still pending after {waited:.0f} s ({step}): no worker has run in the last "
            f"{WORKER_ALIVE_SECONDS} s (this server runs none with --no-worker). Start one with "
            f"`datamachine-mcp worker` on the same database; the job runs then. Read {JOB.format(job_id=job_id)}."
        )
    text = (
        f"Job {job_id} is not finished after {waited:.0f} s ({status}, {step}); "
        f"{f'it is {retrying}' if retrying else 'it keeps running'}. "
        f'Follow it with wait-for-job {{"job_id": {job_id}}} or read {JOB.format(job_id=job_id)}.'
    )
    if status.startswith(st.WAITING):
        text += " It waits for an approval (resolve-pending-action) or a webhook."
    return text


async def wait_into(ctx: AbilityContext, out: dict[str, Any], job_id: int, seconds: float) -> None:
    """run-flow / execute-workflow with wait_seconds: wait, then put the job, final, timed_out, the status
    it reached and the follow-up hint into ``out`` (nothing when ``seconds`` is 0)."""
    if seconds <= 0:
        return
    waited = await wait_and_describe(ctx, job_id, seconds)
    out.update(
        job=waited["job"], final=waited["final"], timed_out=waited["timed_out"], status=waited["job"]["base_status"]
    )
    if "follow_up" in waited:
        out["follow_up"] = waited["follow_up"]


# --- run-flow -------------------------------------------------------------------------------------


class RunFlowIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    initial_data: dict[str, Any] = Field(default_factory=dict, description="Run inputs (engine data)")
    dry_run: bool = Field(False, description="Publish/update only preview")
    wait_seconds: float = Field(DEFAULT_WAIT, ge=0, le=MAX_WAIT, description="Seconds to wait for the result")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=191,
        pattern=IDEMPOTENCY_PATTERN,
        description="Same key, same job",
    )


class RunFlowOut(Output):
    flow_id: int = Field(description="Flow id")
    job_id: int | None = Field(description="The job (null when the run was skipped)")
    status: str | None = Field(description="Job status at return")
    first_step: str | None = Field(description="flow_step_id of the first step")
    replayed: bool = Field(description="An existing job was returned for this idempotency_key")
    skipped: bool = Field(description="No job was created (e.g. empty drain queue)")
    reason: str | None = Opt("Why the run was skipped")
    job: JobOut | None = Opt("The job (with packets), when waited")
    final: bool | None = Opt("The job reached a final status (when waited)")
    timed_out: bool | None = Opt("wait_seconds passed first (when waited)")
    follow_up: str | None = Opt("When the wait ended first: how to follow the job")


@ability(
    "run-flow",
    core=True,
    links={"job_id": JOB, "flow_id": FLOW},
    toolset="jobs",
    level="operator",
    open_world=True,
    transaction="manual",
    description="Run a flow now; waits up to wait_seconds for the result, else says how to follow the job.",
)
async def run_flow(ctx: AbilityContext, inp: RunFlowIn) -> RunFlowOut:
    now = utcnow()
    async with ctx.transaction() as session:
        flow = await load_flow(ctx, inp.flow_id, "operator", mutating=True)
        pipeline = await session.get(Pipeline, flow.pipeline_id)
        assert pipeline is not None
        snap = await ctx.settings()
        key = f"client:{ctx.principal.user_id}:{inp.idempotency_key}" if inp.idempotency_key else None
        engine = ctx.runtime.engine
        affinity = None
        if uses_sampling(flow.flow_config or {}, pipeline.pipeline_config or {}) and engine is not None:
            affinity = engine.worker_id
        start = await front.run_flow(
            session,
            flow=flow,
            pipeline=pipeline,
            initial_data=inp.initial_data,
            dry_run=inp.dry_run,
            idempotency_key=key,
            max_attempts=snap.int("retry_max_attempts"),
            now=now,
            affinity=affinity,
            origin_session_id=ctx.principal.session_id,
            threshold=str(snap["log_level"]),
        )
        first = start.first_step
        if start.created is None:
            return RunFlowOut(
                flow_id=flow.flow_id,
                job_id=None,
                status=None,
                first_step=first,
                replayed=False,
                skipped=True,
                reason=start.skipped_reason,
            )
        created = start.created
        job = created.job
        if not created.replayed:
            await ctx.audit(
                f"job {job.job_id} created for flow {flow.flow_id}",
                target=("job", job.job_id),
                agent_id=flow.agent_id,
                job_id=job.job_id,
                flow_id=flow.flow_id,
                pipeline_id=flow.pipeline_id,
                dry_run=inp.dry_run,
            )
            notify_flow(ctx, flow)
            ctx.notify_updated(f"datamachine://jobs/{job.job_id}")
        job_id, status = job.job_id, job.status
    await ctx.flush_events()
    if ctx.runtime.engine is not None and not created.replayed:
        ctx.runtime.engine.wake()
    out: dict[str, Any] = {
        "flow_id": inp.flow_id,
        "job_id": job_id,
        "status": status,
        "first_step": first,
        "replayed": created.replayed,
        "skipped": False,
    }
    await wait_into(ctx, out, job_id, inp.wait_seconds)
    return RunFlowOut.model_validate(out)


# --- wait-for-job ---------------------------------------------------------------------------------


class WaitForJobIn(Input):
    job_id: int = Field(ge=1, description="Job")
    timeout_seconds: float = Field(DEFAULT_WAIT, ge=0, le=MAX_WAIT, description="Seconds to wait; 0 = now")
    stop_on_waiting: bool = Field(False, description="Also return when waiting")
    include_engine_data: bool = Field(False, description="Add engine_data")


class WaitForJobOut(Output):
    job: JobOut = Field(
        description="The job with packets: the result after success, the failed step's input after failure"
    )
    final: bool = Field(description="The job reached a final status")
    timed_out: bool = Field(description="timeout_seconds passed before the job became final")
    waited_seconds: float = Field(description="Seconds spent waiting")
    follow_up: str | None = Opt("When the wait ended first: how to follow the job")


@ability(
    "wait-for-job",
    core=True,
    links={"job.job_id": JOB},
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    transaction="manual",
    description="Wait until a job is final and return it with its result packets.",
)
async def wait_for_job_tool(ctx: AbilityContext, inp: WaitForJobIn) -> WaitForJobOut:
    async with ctx.reading():
        await load_job(ctx, inp.job_id, "viewer", mutating=False)
    waited = await wait_and_describe(
        ctx,
        inp.job_id,
        inp.timeout_seconds,
        stop_on_waiting=inp.stop_on_waiting,
        engine_data=inp.include_engine_data,
    )
    return WaitForJobOut.model_validate(waited)
