"""Flow schedules: pause-flow, resume-flow, schedule-flow and get-scheduling-intervals (docs/engine.md, Scheduling)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.flow_common import flow_target
from datamachine_mcp.abilities.flow_ops import normalize_schedule, set_schedule
from datamachine_mcp.abilities.pipeline_common import flows_of, load_flow, load_pipeline, owner_of
from datamachine_mcp.abilities.pipeline_views import mask_schedule, notify_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.storage.models import Agent, Flow
from datamachine_mcp.storage.timeutil import iso, utcnow

# --- pause-flow / resume-flow -----------------------------------------------------------------


class FlowScopeIn(Input):
    flow_id: int | None = Field(None, ge=1, description="One flow")
    pipeline_id: int | None = Field(None, ge=1, description="All flows of a pipeline")
    agent_id: int | None = Field(None, ge=1, description="All flows of an agent")


class PausedFlow(Output):
    flow_id: int = Field(description="Flow id")
    status: Literal["paused", "already_paused", "agent_access_denied", "agent_inactive", "pause_error"] = Field(
        description="What happened to this flow"
    )
    message: str | None = Opt("Why the flow was not paused")


class PauseFlowOut(Output):
    paused: int = Field(description="Flows paused by this call")
    skipped: int = Field(description="Flows that were already paused")
    errors: int = Field(description="Flows that could not be paused")
    partial: bool = Field(description="Some but not all targeted flows failed")
    flows: list[PausedFlow] = Field(description="Result per flow, by flow_id")


class ResumedFlow(Output):
    flow_id: int = Field(description="Flow id")
    status: Literal["resumed", "not_paused", "agent_access_denied", "agent_inactive", "resume_error"] = Field(
        description="What happened to this flow"
    )
    next_run: str | None = Opt("Next scheduled run after resuming (ISO 8601 UTC)")


class ResumeFlowOut(Output):
    resumed: int = Field(description="Flows resumed by this call")
    skipped: int = Field(description="Flows that were not paused")
    errors: int = Field(description="Flows that could not be resumed")
    partial: bool = Field(description="Some but not all targeted flows failed")
    flows: list[ResumedFlow] = Field(description="Result per flow, by flow_id")


async def _scope_flows(ctx: AbilityContext, inp: FlowScopeIn) -> tuple[list[Flow], bool, tuple[str, int], int | None]:
    """The targeted flows (locked), whether it is the single form, the audit target and its agent."""
    given = [n for n in ("flow_id", "pipeline_id", "agent_id") if getattr(inp, n) is not None]
    if len(given) != 1:
        raise AbilityError(
            "invalid_flow_scope",
            "Give exactly one of flow_id, pipeline_id or agent_id" + (f" (got {', '.join(given)})." if given else "."),
            given=given,
        )
    if inp.flow_id is not None:
        flow = await load_flow(ctx, inp.flow_id, "operator", mutating=True, lock=True)
        return [flow], True, ("flow", flow.flow_id), flow.agent_id
    if inp.pipeline_id is not None:
        pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
        return (
            await flows_of(ctx, pipeline.pipeline_id, lock=True),
            False,
            ("pipeline", inp.pipeline_id),
            pipeline.agent_id,
        )
    assert inp.agent_id is not None
    agent = await ctx.session.get(Agent, inp.agent_id)
    if agent is None:
        raise AbilityError("agent_not_found", f"Agent {inp.agent_id} not found.", agent_id=inp.agent_id)
    await ctx.access.authorize(
        agent_owner(agent), "viewer", mutating=False, target={"type": "agent", "id": agent.agent_id}
    )
    stmt = ctx.db.for_update(select(Flow).where(Flow.agent_id == agent.agent_id).order_by(Flow.flow_id))
    return list((await ctx.session.execute(stmt)).scalars()), False, ("agent", agent.agent_id), agent.agent_id


async def _operable(ctx: AbilityContext, flow: Flow, cache: dict[Any, Owner]) -> tuple[str, str] | None:
    """None when the caller may operate the flow, else (status, message)."""
    key = (flow.agent_id, flow.user_id)
    if key not in cache:
        cache[key] = await owner_of(ctx, flow.agent_id, flow.user_id)
    try:
        await ctx.access.authorize(cache[key], "operator", mutating=True, target=flow_target(flow.flow_id))
    except AccessDenied as err:
        return "agent_access_denied", err.message
    except AbilityError as err:
        return err.code, err.message
    return None


async def _for_each_flow(
    ctx: AbilityContext,
    inp: FlowScopeIn,
    act: Callable[[Flow, datetime], dict[str, Any]],
    *,
    done: str,
    skipped: str,
    code: str,
    refusal_message: bool,
) -> dict[str, Any]:
    """pause-flow / resume-flow: ``act`` on each targeted flow the caller may operate (its result entry;
    status ``done`` when it changed the flow), then the output counts (``done`` also names that count).
    Fails with ``code`` when every targeted flow failed, else audits and announces the changed flows."""
    flows, single, target, agent_id = await _scope_flows(ctx, inp)
    now = utcnow()
    results: list[dict[str, Any]] = []
    changed: list[Flow] = []
    owners: dict[Any, Owner] = {}
    for flow in flows:
        if not single:
            refusal = await _operable(ctx, flow, owners)
            if refusal is not None:
                entry = {"flow_id": flow.flow_id, "status": refusal[0]}
                results.append({**entry, "message": refusal[1]} if refusal_message else entry)
                continue
        result = act(flow, now)
        if result["status"] == done:
            changed.append(flow)
        results.append(result)
    counts = {done: sum(r["status"] == done for r in results), "skipped": sum(r["status"] == skipped for r in results)}
    counts["errors"] = len(results) - counts[done] - counts["skipped"]
    out = {**counts, "partial": 0 < counts["errors"] < len(results), "flows": results}
    if results and counts["errors"] == len(results):
        raise AbilityError(code, f"None of the {len(results)} targeted flow(s) could be {done}.", **out)
    if changed:
        await ctx.audit(
            f"{len(changed)} flow(s) {done}",
            target=target,
            changes=["scheduling_config.enabled"],
            agent_id=agent_id,
            flow_id=changed[0].flow_id if single else None,
            flow_ids=[f.flow_id for f in changed],
        )
        for flow in changed:
            notify_flow(ctx, flow)
    return out


def _pause(flow: Flow, now: datetime) -> dict[str, Any]:
    config = flow.scheduling_config or {"interval": "manual"}
    if config.get("enabled") is False:
        return {"flow_id": flow.flow_id, "status": "already_paused"}
    flow.scheduling_config = sched.pause(config)
    flow.next_run_at = None
    flow.updated_at = now
    return {"flow_id": flow.flow_id, "status": "paused"}


def _resume(flow: Flow, now: datetime) -> dict[str, Any]:
    config = flow.scheduling_config or {"interval": "manual"}
    if config.get("enabled") is not False:
        return {"flow_id": flow.flow_id, "status": "not_paused"}
    try:
        new_config, next_run = sched.resume(config, flow_id=flow.flow_id, now=now)
    except (sched.ScheduleError, KeyError, ValueError, TypeError):
        return {"flow_id": flow.flow_id, "status": "resume_error"}
    flow.scheduling_config = new_config
    flow.next_run_at = next_run
    flow.updated_at = now
    entry: dict[str, Any] = {"flow_id": flow.flow_id, "status": "resumed"}
    if next_run is not None:
        entry["next_run"] = iso(next_run)
    return entry


@ability(
    "pause-flow",
    core=True,
    toolset="flows",
    level="operator",
    idempotent=True,
    description=("Pause the schedule of a flow, a pipeline's or an agent's flows."),
)
async def pause_flow(ctx: AbilityContext, inp: FlowScopeIn) -> PauseFlowOut:
    out = await _for_each_flow(
        ctx, inp, _pause, done="paused", skipped="already_paused", code="flow_pause_failed", refusal_message=True
    )
    return PauseFlowOut.model_validate(out)


@ability(
    "resume-flow",
    toolset="flows",
    level="operator",
    idempotent=True,
    description="Resume paused flows (one, a pipeline's or an agent's).",
)
async def resume_flow(ctx: AbilityContext, inp: FlowScopeIn) -> ResumeFlowOut:
    # ResumedFlow has no message field: a refused flow shows only its status.
    out = await _for_each_flow(
        ctx, inp, _resume, done="resumed", skipped="not_paused", code="flow_resume_failed", refusal_message=False
    )
    return ResumeFlowOut.model_validate(out)


# --- schedule-flow ----------------------------------------------------------------------------


class ScheduleFlowIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    interval_or_timestamp: str | int = Field(
        description="manual, an interval key (hourly…), a cron expression or Unix seconds (one run)"
    )


class ScheduleFlowOut(Output):
    flow_id: int = Field(description="Flow id")
    schedule_type: Literal["manual", "one_time", "cron", "recurring"] = Field(description="Kind of schedule")
    scheduled_time: str | None = Field(description="Next run (ISO 8601 UTC); null when manual or paused")
    scheduling_config: dict[str, Any] = Field(description="The stored schedule")
    scheduling_unchanged: bool = Field(description="True when the schedule already was this one")


def interpret_schedule_value(value: str | int, previous: dict[str, Any]) -> dict[str, Any]:
    """schedule-flow's single value as client keys; enabled, a cron's timezone and allow_overlap are kept."""
    if isinstance(value, int):
        raw: dict[str, Any] = {"interval": "one_time", "timestamp": value}
    else:
        text = value.strip()
        if text == "manual":
            raw = {"interval": "manual"}
        elif text.isdigit():
            raw = {"interval": "one_time", "timestamp": int(text)}
        elif sched.looks_like_cron(text):
            raw = {"interval": "cron", "cron_expression": text}
            if isinstance(previous.get("timezone"), str):
                raw["timezone"] = previous["timezone"]
        else:
            raw = {"interval": text}
    if isinstance(raw.get("timestamp"), int) and raw["timestamp"] <= 0:
        raise AbilityError("invalid_timestamp", "A one-time run needs a positive Unix timestamp.")
    if previous.get("enabled") is False:
        raw["enabled"] = False
    if isinstance(previous.get("allow_overlap"), bool):
        raw["allow_overlap"] = previous["allow_overlap"]  # a flag of the flow, not part of the value
    return raw


@ability(
    "schedule-flow",
    core=True,
    toolset="flows",
    level="admin",
    idempotent=True,
    description=("Set a flow's schedule: manual, an interval (hourly…), a cron expression or a one-time Unix time."),
)
async def schedule_flow(ctx: AbilityContext, inp: ScheduleFlowIn) -> ScheduleFlowOut:
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    previous = sched.client_keys(flow.scheduling_config)
    client = normalize_schedule(interpret_schedule_value(inp.interval_or_timestamp, previous))
    now = utcnow()
    changed = set_schedule(flow, client, now=now)
    if changed:
        flow.updated_at = now
        await ctx.audit(
            f"flow {flow.flow_id} scheduled ({client['interval']})",
            target=("flow", flow.flow_id),
            changes=["scheduling_config"],
            agent_id=flow.agent_id,
            flow_id=flow.flow_id,
            pipeline_id=flow.pipeline_id,
        )
        notify_flow(ctx, flow)
    interval = client["interval"]
    kind = interval if interval in ("manual", "one_time", "cron") else "recurring"
    return ScheduleFlowOut(
        flow_id=flow.flow_id,
        schedule_type=kind,
        scheduled_time=iso(flow.next_run_at),
        scheduling_config=mask_schedule(flow.scheduling_config),
        scheduling_unchanged=not changed,
    )


# --- get-scheduling-intervals -----------------------------------------------------------------


class NoInput(Input):
    pass


class IntervalOut(Output):
    value: str = Field(description="Value for scheduling_config.interval")
    label: str = Field(description="Display label")
    seconds: int | None = Field(description="Period in seconds (null for manual, one_time and cron)")


class IntervalsOut(Output):
    intervals: list[IntervalOut] = Field(description="manual, one_time, cron, then the interval keys by period")
    aliases: dict[str, str] = Field(description="Accepted aliases and the key each is stored as")


@ability(
    "get-scheduling-intervals",
    toolset="flows",
    level="any",
    read_only=True,
    idempotent=True,
    description=("List the schedule interval values."),
)
async def get_scheduling_intervals(ctx: AbilityContext, inp: NoInput) -> IntervalsOut:
    return IntervalsOut.model_validate({"intervals": sched.describe_intervals(), "aliases": dict(sched.ALIASES)})
