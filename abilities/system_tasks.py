"""System toolset: health check and system tasks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import func, select, text

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.jobs import DEFAULT_WAIT, MAX_WAIT, wait_and_describe
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine import front
from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.crypto import SecretUnavailable
from datamachine_mcp.storage.migrate import current_revision
from datamachine_mcp.storage.migrations import HEAD_REVISION
from datamachine_mcp.storage.models import Flow, Job, Setting
from datamachine_mcp.storage.timeutil import parse_datetime, utcnow

CHECKS = ("database", "migrations", "worker", "scheduler", "jobs", "providers", "secrets")
TASK_LABELS = {"retention": "Retention cleanup", "recover_stuck_jobs": "Recover stuck jobs", "echo": "Echo"}
HEARTBEAT_KEY = "worker_heartbeat"


CheckType = Literal["all", "database", "migrations", "worker", "scheduler", "jobs", "providers", "secrets"]


def _all_checks() -> list[CheckType]:
    return ["all"]


class HealthIn(Input):
    types: list[CheckType] = Field(default_factory=_all_checks, min_length=1, description="Checks to run")


class CheckResult(Output):
    status: Literal["ok", "warning", "error"] = Field(description="Outcome of the check")
    message: str = Field(description="What was found")
    details: dict[str, Any] | None = Opt("Specifics (global administrators only)")


class HealthOut(Output):
    healthy: bool = Field(description="No check is in error")
    results: dict[str, CheckResult] = Field(description="Result per check type")
    summary: dict[str, int] = Field(description="Count of ok, warning and error results")
    available: list[str] = Field(description="The check types this server offers")


async def _database(ctx: AbilityContext) -> dict[str, Any]:
    await ctx.session.execute(text("SELECT 1"))
    db = ctx.db
    details: dict[str, Any] = {"backend": db.dialect}
    if db.path is not None:
        details["path"] = str(db.path)
        details["size_bytes"] = db.path.stat().st_size if db.path.exists() else 0
    return {"status": "ok", "message": f"{db.dialect} reachable", "details": details}


async def _migrations(ctx: AbilityContext) -> dict[str, Any]:
    revision = await current_revision(ctx.db)
    if revision == HEAD_REVISION:
        return {"status": "ok", "message": f"schema at head ({revision})", "details": {"revision": revision}}
    return {
        "status": "error",
        "message": f"schema at {revision}, expected {HEAD_REVISION}",
        "details": {"revision": revision},
    }


async def _worker(ctx: AbilityContext) -> dict[str, Any]:
    now = utcnow()
    beats = await ctx.runtime.settings.internal_get(ctx.session, HEARTBEAT_KEY) or {}
    fresh = {
        w: at for w, at in beats.items() if isinstance(at, str) and now - parse_datetime(at) <= timedelta(seconds=60)
    }
    due = (
        await ctx.session.execute(
            select(func.count()).select_from(Job).where(Job.status == st.PENDING, Job.run_at <= now)
        )
    ).scalar() or 0
    details = {"workers": fresh, "due_pending_jobs": due}
    if fresh:
        return {"status": "ok", "message": f"{len(fresh)} worker(s) active in the last 60 s", "details": details}
    if due:
        return {
            "status": "warning",
            "message": f"{due} due job(s) pending and no worker ran in the last 60 s",
            "details": details,
        }
    return {"status": "ok", "message": "no worker ran in the last 60 s, and nothing is due", "details": details}


async def _scheduler(ctx: AbilityContext) -> dict[str, Any]:
    now = utcnow()
    overdue = (
        await ctx.session.execute(
            select(func.count()).select_from(Flow).where(Flow.next_run_at < now - timedelta(minutes=5))
        )
    ).scalar() or 0
    lease = (await ctx.session.execute(select(Setting.value).where(Setting.key == "scheduler_lease"))).scalar() or {}
    details = {
        "overdue_flows": overdue,
        "lease_holder": lease.get("owner"),
        "lease_expires_at": lease.get("expires_at"),
    }
    if overdue:
        return {"status": "warning", "message": f"{overdue} flow(s) overdue by more than 5 minutes", "details": details}
    return {"status": "ok", "message": "no flow is overdue", "details": details}


async def _jobs(ctx: AbilityContext) -> dict[str, Any]:
    now = utcnow()
    snap = await ctx.settings()
    s = ctx.session
    late = (
        await s.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.status == st.PENDING, Job.run_at < now - timedelta(minutes=5))
        )
    ).scalar() or 0
    expired = (
        await s.execute(
            select(func.count()).select_from(Job).where(Job.status == st.PROCESSING, Job.lease_expires_at < now)
        )
    ).scalar() or 0
    active = (await s.execute(select(func.count()).select_from(Job).where(Job.status.in_(st.RUNNING)))).scalar() or 0
    limit = snap.int("max_active_jobs")
    problems = []
    if late:
        problems.append(f"{late} pending job(s) more than 5 minutes late")
    if expired:
        problems.append(f"{expired} processing job(s) with expired leases")
    if limit and active >= 0.9 * limit:
        problems.append(f"{active} active jobs, ≥90% of max_active_jobs ({limit})")
    details = {"late_pending": late, "expired_leases": expired, "active": active, "max_active_jobs": limit}
    if problems:
        return {"status": "warning", "message": "; ".join(problems), "details": details}
    return {"status": "ok", "message": f"{active} active job(s), none stuck", "details": details}


async def _providers(ctx: AbilityContext) -> dict[str, Any]:
    snap = await ctx.settings()
    state = {}
    for name, cfg in snap["ai_providers"].items():
        state[name] = {"api_key": cfg.get("api_key") is not None, "base_url": cfg.get("base_url")}
    configured = [
        n
        for n, v in state.items()
        if v["api_key"]
        or (v["base_url"] and "api.openai.com" not in v["base_url"] and "api.anthropic.com" not in v["base_url"])
    ]
    default = snap["default_provider"] or None
    details = {"providers": state, "default_provider": default, "default_model": snap["default_model"] or None}
    if configured:
        return {"status": "ok", "message": f"configured: {', '.join(configured)}", "details": details}
    return {"status": "warning", "message": "no AI provider has an API key or a custom base URL", "details": details}


async def _secrets(ctx: AbilityContext) -> dict[str, Any]:
    box = ctx.runtime.box
    try:
        if box.decrypt(box.encrypt("canary", "health_canary"), "health_canary") != "canary":
            raise SecretUnavailable("round trip mismatch")
    except SecretUnavailable as exc:
        return {"status": "error", "message": f"secret key unusable: {exc}", "details": {}}
    return {"status": "ok", "message": "secret key loads and decrypts", "details": {}}


RUNNERS = {
    "database": _database,
    "migrations": _migrations,
    "worker": _worker,
    "scheduler": _scheduler,
    "jobs": _jobs,
    "providers": _providers,
    "secrets": _secrets,
}


@ability(
    "system-health-check",
    toolset="system",
    level="any",
    read_only=True,
    idempotent=True,
    description="Check server health.",
)
async def system_health_check(ctx: AbilityContext, inp: HealthIn) -> HealthOut:
    wanted = list(CHECKS) if "all" in inp.types else [t for t in CHECKS if t in inp.types]
    results: dict[str, dict[str, Any]] = {}
    for name in wanted:
        try:
            # A savepoint per check: a failed statement (PostgreSQL aborts the whole transaction)
            # must not turn the remaining checks into errors too.
            async with ctx.session.begin_nested():
                result = await RUNNERS[name](ctx)
        except Exception:  # a failing check is a result, never a traceback
            result = {"status": "error", "message": "check failed", "details": {}}
        if not ctx.principal.is_admin:
            result.pop("details", None)
        results[name] = result
    summary = {k: sum(1 for r in results.values() if r["status"] == k) for k in ("ok", "warning", "error")}
    return HealthOut.model_validate(
        {"healthy": summary["error"] == 0, "results": results, "summary": summary, "available": list(CHECKS)}
    )


class RunTaskIn(Input):
    task_type: Literal["retention", "recover_stuck_jobs", "echo"] = Field(description="Task")
    task_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Task parameters",
    )
    wait_seconds: float = Field(DEFAULT_WAIT, ge=0, le=MAX_WAIT, description="Seconds to wait for the result")


class RunTaskOut(Output):
    task_type: str = Field(description="Task run")
    job_id: int = Field(description="The system job")
    status: str = Field(description="Job status at return")
    message: str = Field(description="Human-readable result")
    result: Any = Opt("The task's result (when waited and final)")
    follow_up: str | None = Opt("When the wait ended first: how to follow the job")


@ability(
    "run-task",
    toolset="system",
    level="global_admin",
    destructive=True,
    transaction="manual",
    error_fields={"task_type": "invalid_task_type"},
    description=("Run retention or stuck-job recovery now."),
)
async def run_task(ctx: AbilityContext, inp: RunTaskIn) -> RunTaskOut:
    now = utcnow()
    label = TASK_LABELS[inp.task_type]
    steps = [
        {
            "step_type": "system_task",
            "label": label,
            "flow_step_settings": {"task_type": inp.task_type, "params": inp.task_params},
        }
    ]
    async with ctx.transaction() as session:
        ctx.access.require_global_admin("Running system tasks")
        snap = await ctx.settings()
        try:
            _, created = await front.run_workflow(
                session,
                steps=steps,
                user_id=ctx.principal.user_id,
                agent_id=None,
                agent_slug=None,
                source="system",
                label=label,
                initial_data={},
                dry_run=False,
                run_at=now,
                idempotency_key=None,
                request={"task_type": inp.task_type, "task_params": inp.task_params},
                max_attempts=snap.int("retry_max_attempts"),
                now=now,
                trigger="system",
                standalone=True,
                threshold=str(snap["log_level"]),
            )
        except Exception as exc:
            raise AbilityError("task_schedule_failed", f"The {inp.task_type} job could not be created: {exc}") from None
        job = created.job
        await ctx.audit(
            f"system task {inp.task_type} started as job {job.job_id}", target=("job", job.job_id), job_id=job.job_id
        )
        job_id, status = job.job_id, job.status
    if ctx.runtime.engine is not None:
        ctx.runtime.engine.wake()
    out: dict[str, Any] = {
        "task_type": inp.task_type,
        "job_id": job_id,
        "status": status,
        "message": f"System task {inp.task_type} queued as job {job_id}.",
    }
    if inp.wait_seconds > 0:
        waited = await wait_and_describe(ctx, job_id, inp.wait_seconds)
        out["status"] = waited["job"]["base_status"]
        if waited["final"]:
            packets = waited["job"].get("packets") or []
            if packets and packets[0].get("type") == "system_task_result":
                out["result"] = (packets[0].get("data") or {}).get("result")
            out["message"] = f"System task {inp.task_type} finished: {waited['job']['status']}."
        else:
            out["follow_up"] = waited["follow_up"]
    return RunTaskOut.model_validate(out)
