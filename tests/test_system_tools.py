"""system-health-check and run-task."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

import datamachine_mcp.abilities.system_tasks as system_tasks
from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.engine.retention import LAST_RUN_KEY
from datamachine_mcp.storage.crypto import SecretUnavailable
from datamachine_mcp.storage.migrations import HEAD_REVISION
from datamachine_mcp.storage.models import Flow, Job, LogEntry
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call, changed_tables, connect, fail, log_rows, table_rows
from tests.test_scheduler import until

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

CHECKS = ["database", "migrations", "worker", "scheduler", "jobs", "providers", "secrets"]
USER2 = Principal(user_id=2, transport="http")
ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {}}}


@pytest.fixture
async def engine(runtime) -> AsyncIterator[EngineHost]:
    host = EngineHost(runtime.engine, concurrency=2, poll_seconds=0.1)
    await host.start()
    try:
        yield host
    finally:
        await host.stop(grace=5)


async def health(client: Any, *types: str) -> dict[str, Any]:
    return await call(client, "system-health-check", {"types": list(types)} if types else {})


async def new_flow(client: Any) -> dict[str, Any]:
    return await call(client, "create-pipeline", {"pipeline_name": "P", "workflow": {"steps": [ECHO]}})


# --- system-health-check -----------------------------------------------------------------------


async def test_health_check_on_a_fresh_server(runtime, owner, db_backend):
    out = await health(owner)
    assert out["available"] == CHECKS
    assert list(out["results"]) == CHECKS
    status = {k: (v["status"], v["message"]) for k, v in out["results"].items()}
    assert status == {
        "database": ("ok", f"{db_backend} reachable"),
        "migrations": ("ok", f"schema at head ({HEAD_REVISION})"),
        "worker": ("ok", "no worker ran in the last 60 s, and nothing is due"),
        "scheduler": ("ok", "no flow is overdue"),
        "jobs": ("ok", "0 active job(s), none stuck"),
        "providers": ("warning", "no AI provider has an API key or a custom base URL"),
        "secrets": ("ok", "secret key loads and decrypts"),
    }
    assert out["healthy"] is True  # warnings do not make a server unhealthy
    assert out["summary"] == {"ok": 6, "warning": 1, "error": 0}
    db = out["results"]["database"]["details"]
    assert db["backend"] == db_backend
    if db_backend == "sqlite":
        assert db["path"] == str(runtime.db.path) and db["size_bytes"] > 0
    else:
        assert "path" not in db
    assert out["results"]["migrations"]["details"] == {"revision": HEAD_REVISION}
    assert out["results"]["worker"]["details"] == {"workers": {}, "due_pending_jobs": 0}
    assert out["results"]["providers"]["details"]["providers"]["openai"]["api_key"] is False

    # a subset, reported in the table's order; "all" wins over a subset
    sub = await health(owner, "jobs", "database")
    assert list(sub["results"]) == ["database", "jobs"] and sub["summary"] == {"ok": 2, "warning": 0, "error": 0}
    assert list((await health(owner, "secrets", "all"))["results"]) == CHECKS


async def test_details_only_for_global_admins(runtime, owner):
    async with connect(runtime, USER2) as user:
        out = await health(user)
    assert list(out["results"]) == CHECKS
    assert all(set(r) == {"status", "message"} for r in out["results"].values())
    assert all("details" in r for r in (await health(owner))["results"].values())


async def test_health_check_reports_problems(runtime, owner, engine):
    now = utcnow()
    made = await new_flow(owner)
    # a worker ran recently (the engine fixture): ok, with the worker's id in the details
    await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 10})
    out = await health(owner, "worker")
    assert out["results"]["worker"]["status"] == "ok"
    assert out["results"]["worker"]["message"] == "1 worker(s) active in the last 60 s"
    assert list(out["results"]["worker"]["details"]["workers"]) == [runtime.engine.worker_id]
    await engine.stop(grace=5)

    # the worker's last sign of life is older than 60 s and a job is due → warning
    async with runtime.db.write() as s:
        await runtime.settings.internal_set(
            s, system_tasks.HEARTBEAT_KEY, {runtime.engine.worker_id: (now - timedelta(seconds=61)).isoformat()}
        )
    await call(owner, "update-settings", {"settings": {"max_active_jobs": 2}})
    late = (await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"]
    stuck = (await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"]
    async with runtime.db.write() as s:
        await s.execute(update(Job).where(Job.job_id == late).values(run_at=now - timedelta(minutes=6)))
        await s.execute(
            update(Job)
            .where(Job.job_id == stuck)
            .values(status="processing", lease_owner="gone:1:00000000", lease_expires_at=now - timedelta(seconds=1))
        )
        await s.execute(
            update(Flow).where(Flow.flow_id == made["flow_id"]).values(next_run_at=now - timedelta(minutes=6))
        )
    out = await health(owner)
    results = out["results"]
    assert results["worker"]["status"] == "warning"
    assert results["worker"]["message"] == "1 due job(s) pending and no worker ran in the last 60 s"
    assert results["scheduler"]["status"] == "warning"
    assert results["scheduler"]["message"] == "1 flow(s) overdue by more than 5 minutes"
    assert results["scheduler"]["details"]["overdue_flows"] == 1
    assert results["jobs"]["status"] == "warning"
    assert results["jobs"]["message"] == (
        "1 pending job(s) more than 5 minutes late; 1 processing job(s) with expired leases; "
        "2 active jobs, ≥90% of max_active_jobs (2)"
    )
    assert results["jobs"]["details"] == {"late_pending": 1, "expired_leases": 1, "active": 2, "max_active_jobs": 2}
    assert out["healthy"] is True and out["summary"] == {"ok": 3, "warning": 4, "error": 0}

    # a provider key configured → ok
    await call(owner, "update-settings", {"settings": {"ai_providers": {"openai": {"api_key": "sk-test-123"}}}})
    providers = (await health(owner, "providers"))["results"]["providers"]
    assert (providers["status"], providers["message"]) == ("ok", "configured: openai")
    assert providers["details"]["providers"]["openai"]["api_key"] is True
    assert "sk-test" not in str(providers)


async def test_failing_checks_are_errors_without_tracebacks(runtime, owner, monkeypatch):
    async def broken(_ctx: Any) -> dict[str, Any]:
        raise RuntimeError("boom with internals")

    async def bad_sql(ctx: Any) -> dict[str, Any]:
        await ctx.session.execute(text("SELECT * FROM no_such_table"))
        return {"status": "ok", "message": "unreachable"}

    monkeypatch.setitem(system_tasks.RUNNERS, "scheduler", broken)
    monkeypatch.setitem(system_tasks.RUNNERS, "migrations", bad_sql)
    out = await health(owner)
    for name in ("migrations", "scheduler"):
        assert out["results"][name] == {"status": "error", "message": "check failed", "details": {}}
    assert "boom" not in str(out)
    # the other checks still run normally after a check's failed statement
    assert out["results"]["database"]["status"] == "ok"
    assert out["results"]["jobs"]["status"] == "ok"
    assert out["results"]["worker"]["status"] == "ok"
    assert out["healthy"] is False and out["summary"] == {"ok": 4, "warning": 1, "error": 2}

    # an unusable secret key is an error with its reason
    def no_key(*_a: Any, **_k: Any) -> Any:
        raise SecretUnavailable("key file missing")

    monkeypatch.setattr(runtime.box, "decrypt", no_key)
    secrets = (await health(owner, "secrets"))["results"]["secrets"]
    assert (secrets["status"], secrets["message"]) == ("error", "secret key unusable: key file missing")


async def test_health_check_bad_input(runtime, owner):
    before = await table_rows(runtime)
    for args in ({"types": ["bogus"]}, {"types": []}, {"types": "all"}, {"verbose": True}):
        err = await fail(owner, "system-health-check", args, "invalid_input")
        assert err["data"]["errors"][0]["field"].split(".")[0] in ("types", "verbose")
    assert await table_rows(runtime) == before


# --- run-task ----------------------------------------------------------------------------------


async def test_run_task_echo_runs_as_a_standalone_system_job(runtime, owner, engine):
    out = await call(owner, "run-task", {"task_type": "echo", "task_params": {"ping": [1, 2]}, "wait_seconds": 10})
    assert out["task_type"] == "echo" and out["status"] == "completed"
    assert out["result"] == {"ping": [1, 2]}
    assert out["message"] == "System task echo finished: completed."
    async with runtime.db.read() as s:
        job = await s.get(Job, out["job_id"])
    assert (job.source, job.run_trigger, job.pipeline_id, job.flow_id, job.user_id) == (
        "system",
        "system",
        None,
        None,
        1,
    )
    assert job.label == "Echo"
    audits = [r for r in await log_rows(runtime) if (r["context"] or {}).get("ability") == "run-task"]
    assert len(audits) == 1 and audits[0]["message"] == f"run-task: system task echo started as job {out['job_id']}"


async def test_run_task_without_waiting_queues_the_job(runtime, owner):
    out = await call(owner, "run-task", {"wait_seconds": 0, "task_type": "echo"})
    assert out["status"] == "pending" and "result" not in out
    assert out["message"] == f"System task echo queued as job {out['job_id']}."


async def test_run_task_retention_and_recovery(runtime, owner, engine):
    # the maintenance loop runs retention once at start; let it finish (its last act is logging the
    # counts) before seeding an old row, which that run would otherwise delete
    async def retention_ran() -> bool:
        async with runtime.db.read() as s:
            stamped = bool(await runtime.settings.internal_get(s, LAST_RUN_KEY))
            logged = (await s.execute(select(LogEntry.id).where(LogEntry.message.like("Retention:%")))).first()
            return stamped and logged is not None

    await until(retention_ran)
    now = utcnow()
    async with runtime.db.write() as s:
        s.add(LogEntry(level="info", message="ancient", created_at=now - timedelta(days=400)))
    dry = await call(
        owner, "run-task", {"task_type": "retention", "task_params": {"dry_run": True}, "wait_seconds": 10}
    )
    assert dry["status"] == "completed" and dry["result"]["dry_run"] is True
    assert dry["result"]["deleted"]["logs"] == 1
    async with runtime.db.read() as s:
        assert (await s.execute(select(LogEntry.id).where(LogEntry.message == "ancient"))).scalar() is not None

    done = await call(owner, "run-task", {"task_type": "retention", "wait_seconds": 10})
    assert done["status"] == "completed" and done["result"]["dry_run"] is False
    assert done["result"]["deleted"]["logs"] == 1
    async with runtime.db.read() as s:
        assert (await s.execute(select(LogEntry.id).where(LogEntry.message == "ancient"))).scalar() is None

    # recover_stuck_jobs with the tool's filters: older_than_minutes voids the lease of a job whose
    # step started long ago (its holder is gone), and the job is requeued
    made = await new_flow(owner)
    async with runtime.db.write() as s:
        stuck = Job(
            user_id=1,
            pipeline_id=str(made["pipeline_id"]),
            flow_id=str(made["flow_id"]),
            pipeline_key=made["pipeline_id"],
            flow_key=made["flow_id"],
            status="processing",
            attempts=1,
            max_attempts=3,
            lease_owner="gone:1:00000000",
            lease_expires_at=now + timedelta(hours=1),
            current_step_id=made["flow_step_ids"][0],
            packets=[],
            engine_data={},
            created_at=now - timedelta(minutes=10),
            updated_at=now - timedelta(minutes=10),
            run_at=now - timedelta(minutes=10),
        )
        s.add(stuck)
        await s.flush()
        job_id = stuck.job_id
    params = {"flow_id": made["flow_id"], "older_than_minutes": 5}
    out = await call(owner, "run-task", {"task_type": "recover_stuck_jobs", "task_params": params, "wait_seconds": 10})
    assert out["status"] == "completed"
    result = out["result"]
    assert (result["leases_voided"], result["requeued"], result["failed"]) == (1, 1, 0)
    assert result["jobs"] == [
        {"job_id": job_id, "previous_status": "processing", "new_status": "pending", "action": "requeued"}
    ]


async def test_run_task_errors(runtime, owner, monkeypatch):
    before = await table_rows(runtime)
    err = await fail(owner, "run-task", {"wait_seconds": 0, "task_type": "reboot"}, "invalid_task_type")
    assert err["data"]["errors"][0]["field"] == "task_type"
    for args in (
        {},
        {"task_type": "echo", "wait_seconds": 301},
        {"task_type": "echo", "wait_seconds": -1},
        {"task_type": "echo", "task_params": [1]},
        {"task_type": "echo", "extra": 1},
    ):
        await fail(owner, "run-task", args, "invalid_input")
    assert await table_rows(runtime) == before

    # non-admins: permission_denied, and only the denial's warning row is written
    async with connect(runtime, USER2) as user:
        err = await fail(user, "run-task", {"wait_seconds": 0, "task_type": "echo"}, "permission_denied")
    assert err["data"]["required_role"] == "global_admin"
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1

    # the job cannot be created → task_schedule_failed, nothing written
    async def refuse(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("database full")

    monkeypatch.setattr(system_tasks.front, "run_workflow", refuse)
    before = await table_rows(runtime)
    err = await fail(owner, "run-task", {"wait_seconds": 0, "task_type": "retention"}, "task_schedule_failed")
    assert err["message"] == "The retention job could not be created: database full"
    assert await table_rows(runtime) == before
