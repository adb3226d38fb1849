"""fail-job, cancel-job, retry-job, delete-jobs and recover-stuck-jobs.

See docs/engine.md, Manual controls and Recovery and maintenance.
"""

from __future__ import annotations

import json
from datetime import timedelta

import anyio
import pytest

from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import utcnow
from tests import jobs_support
from tests.conftest import call, connect, count, log_rows, table_rows
from tests.fake_servers import FakeResponse, serve
from tests.jobs_support import (
    USER2,
    USER3,
    approval_step,
    audit_rows,
    denied,
    dirs,
    fetch_step,
    files_flow,
    grant,
    items_of,
    job_row,
    make_agent,
    make_flow,
    publish_step,
    run,
    settings,
    sql,
    unchanged,
    wait_job,
    wait_until,
    write_items,
)

pytestmark = pytest.mark.anyio
engine = jobs_support.engine  # fixture

RSS = """<?xml version="1.0"?><rss version="2.0"><channel><title>T</title>
<item><title>Slow news</title><link>https://example.com/a</link><guid>a-1</guid><description>Hi</description></item>
</channel></rss>"""


async def pending_job(client, runtime, **kw) -> tuple[dict, int]:
    """A flow and one pending run of it (no engine running, so it stays pending)."""
    made = await files_flow(client, runtime, **kw)
    job = await run(client, made["flow_id"])
    return made, job["job_id"]


async def waiting_job(client, runtime, *, names=("alpha",), max_items=1, **approval):
    """fetch → approval → publish; runs until the job (or its children) park at the approval."""
    inbox, outbox = dirs(runtime)
    write_items(inbox, *names)
    made = await make_flow(client, [fetch_step(inbox, max_items), approval_step(**approval), publish_step(outbox)])
    job_id = (await run(client, made["flow_id"]))["job_id"]
    return made, job_id


async def status_of(runtime, job_id: int) -> str:
    row = await job_row(runtime, job_id)
    assert row is not None
    return row.status if not row.status_reason else f"{row.status} - {row.status_reason}"


# --- fail-job -----------------------------------------------------------------------------------


async def test_fail_pending_job_accounts_and_audits(runtime, owner):
    made, job_id = await pending_job(owner, runtime)
    out = await call(owner, "fail-job", {"job_id": job_id, "reason": "operator says no"})
    assert out == {
        "job_id": job_id,
        "previous_status": "pending",
        "new_status": "failed - operator says no",
        "changed": True,
        "children_cancelled": 0,
        "message": f"Job {job_id} is now failed - operator says no.",
    }
    job = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]
    assert job["base_status"] == "failed" and job["status_reason"] == "operator says no"
    assert job["completed_at"] is not None
    assert job["error"]["reason"] == "operator says no" and job["error"]["class"] == "manual"
    health = await call(owner, "get-flow-health", {"flow_id": made["flow_id"]})
    assert health["consecutive_failures"] == 1
    audits = await audit_rows(runtime, "fail-job")
    assert len(audits) == 1 and audits[0]["job_id"] == job_id
    assert audits[0]["message"] == f"fail-job: job {job_id} failed - operator says no"


async def test_fail_again_is_a_noop_keeping_the_reason(runtime, owner):
    _, job_id = await pending_job(owner, runtime)
    await call(owner, "fail-job", {"job_id": job_id})
    before = await table_rows(runtime)
    out = await call(owner, "fail-job", {"job_id": job_id, "reason": "other"})
    assert out["changed"] is False and out["new_status"] == "failed - manual"
    assert out["message"] == f"Job {job_id} is already failed"
    assert await table_rows(runtime) == before


async def test_fail_job_errors_write_nothing(runtime, owner):
    _, job_id = await pending_job(owner, runtime)
    await call(owner, "cancel-job", {"job_id": job_id})
    err = await unchanged(runtime, owner, "fail-job", {"job_id": job_id}, "invalid_job_status")
    assert err["message"] == (
        f"Job {job_id} has status 'cancelled - manual'; only pending, processing or waiting jobs can be failed."
    )
    await unchanged(runtime, owner, "fail-job", {"job_id": 999}, "job_not_found")
    for args, field in (
        ({"job_id": "1.0"}, "job_id"),
        ({"job_id": 0}, "job_id"),
        ({}, "job_id"),
        ({"job_id": job_id, "reason": ""}, "reason"),
        ({"job_id": job_id, "reason": "x" * 501}, "reason"),
        ({"job_id": job_id, "colour": 1}, "colour"),
    ):
        err = await unchanged(runtime, owner, "fail-job", args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field


async def test_fail_waiting_job_releases_claims_and_cancels_the_approval(runtime, owner, engine):
    made, job_id = await waiting_job(owner, runtime)
    waited = await wait_job(owner, job_id, stop_on_waiting=True)
    assert waited["job"]["base_status"] == "waiting"
    action_id = waited["job"]["wait"]["action_id"]
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("claimed", job_id)]
    out = await call(owner, "fail-job", {"job_id": job_id})
    assert out["previous_status"] == "waiting" and out["new_status"] == "failed - manual"
    # the claim is released (row deleted), so the next run fetches the item again
    assert await items_of(runtime) == []
    action = (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]
    assert action["status"] == "cancelled" and action["job_status"] == "failed - manual"
    again = (await run(owner, made["flow_id"]))["job_id"]
    assert (await wait_job(owner, again, stop_on_waiting=True))["job"]["base_status"] == "waiting"
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("claimed", again)]


async def test_fail_batch_parent_cancels_children(runtime, owner, engine):
    _, parent = await waiting_job(owner, runtime, names=("alpha", "beta"), max_items=2)

    async def children_waiting():
        rows = (await call(owner, "get-jobs", {"parent_job_id": parent}))["jobs"]
        return len(rows) == 2 and all(r["base_status"] == "waiting" for r in rows)

    await wait_until(children_waiting)
    assert len(await items_of(runtime)) == 2
    out = await call(owner, "fail-job", {"job_id": parent})
    assert out["previous_status"] == "processing" and out["children_cancelled"] == 2
    children = (await call(owner, "get-jobs", {"parent_job_id": parent}))["jobs"]
    assert [c["status"] for c in children] == ["cancelled - parent_failed"] * 2
    for child in children:
        approval = (await call(owner, "get-jobs", {"job_id": child["job_id"]}))["jobs"][0]["engine_data"]["approval"]
        assert approval["status"] == "cancelled"
    parent_job = (await call(owner, "get-jobs", {"job_id": parent}))["jobs"][0]
    assert parent_job["status"] == "failed - manual"
    assert parent_job["child_counts"] == {"total": 2, "cancelled": 2}
    assert await items_of(runtime) == []


async def test_fail_and_cancel_roles(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    await grant(owner, bot, 3, "operator")
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    async with connect(runtime, USER2) as viewer:
        assert (await call(viewer, "get-jobs", {"job_id": job_id}))["total"] == 1
        for tool in ("fail-job", "cancel-job", "retry-job"):
            err = await denied(runtime, viewer, tool, {"job_id": job_id})
            assert err["data"]["required_role"] == "operator" and err["data"]["effective_role"] == "viewer"
    async with connect(runtime, USER3) as operator:
        assert (await call(operator, "cancel-job", {"job_id": job_id}))["changed"] is True
    # an inactive agent's jobs change for nobody, global administrators included
    second = (await run(owner, made["flow_id"]))["job_id"]
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    await unchanged(runtime, owner, "fail-job", {"job_id": second}, "agent_inactive")
    await unchanged(runtime, owner, "cancel-job", {"job_id": second}, "agent_inactive")


# --- cancel-job ---------------------------------------------------------------------------------


async def test_cancel_pending_job_and_repeat(runtime, owner):
    made, job_id = await pending_job(owner, runtime)
    out = await call(owner, "cancel-job", {"job_id": job_id, "reason": "not today"})
    assert out["new_status"] == "cancelled - not today" and out["changed"] is True
    # cancelled runs leave flow health alone
    health = await call(owner, "get-flow-health", {"flow_id": made["flow_id"]})
    assert health["consecutive_failures"] == 0
    before = await table_rows(runtime)
    again = await call(owner, "cancel-job", {"job_id": job_id})
    assert again["changed"] is False and again["new_status"] == "cancelled - not today"
    assert again["message"] == f"Job {job_id} is already cancelled"
    assert await table_rows(runtime) == before


async def test_cancel_job_errors(runtime, owner):
    _, job_id = await pending_job(owner, runtime)
    await call(owner, "fail-job", {"job_id": job_id})
    err = await unchanged(runtime, owner, "cancel-job", {"job_id": job_id}, "invalid_job_status")
    assert "only pending, waiting or processing jobs can be cancelled" in err["message"]
    await unchanged(runtime, owner, "cancel-job", {"job_id": 404}, "job_not_found")
    await unchanged(runtime, owner, "cancel-job", {"job_id": job_id, "reason": "y" * 501}, "invalid_input")


async def test_cancel_during_a_slow_step_abandons_the_worker(runtime, owner, engine):
    """The worker's lease is gone after cancel-job: its heartbeat cancels the step, nothing is published."""
    await settings(owner, lease_ttl_seconds=15)  # heartbeat every 3.75 s
    _, outbox = dirs(runtime)
    with serve() as server:
        feed = server.script("/feed.xml", FakeResponse(200, RSS, {"Content-Type": "application/rss+xml"}, delay=9))
        steps = [
            {"step_type": "fetch", "handler_slugs": ["rss"], "handler_configs": {"rss": {"feed_url": feed}}},
            publish_step(outbox),
        ]
        made = await make_flow(owner, steps)
        job_id = (await run(owner, made["flow_id"]))["job_id"]
        await wait_until(lambda: _requested(server))
        assert (await job_row(runtime, job_id)).status == "processing"
        started = anyio.current_time()
        out = await call(owner, "cancel-job", {"job_id": job_id})
        assert out["previous_status"] == "processing" and out["new_status"] == "cancelled - manual"
        row = await job_row(runtime, job_id)
        assert row.lease_owner is None and row.lease_expires_at is None

        async def abandoned():
            return any("lease lost, step abandoned" in r["message"] for r in await log_rows(runtime))

        await wait_until(abandoned, seconds=8)
        assert anyio.current_time() - started < 8  # at the heartbeat, before the feed answered
    row = await job_row(runtime, job_id)
    assert row.status == "cancelled" and row.status_reason == "manual"
    assert "step_results" not in (row.engine_data or {})
    assert list(outbox.iterdir()) == [] and await items_of(runtime) == []


async def _requested(server) -> bool:
    return bool(server.to("/feed.xml"))


async def test_cancel_waiting_approval_blocks_the_decision(runtime, owner, engine):
    _, job_id = await waiting_job(owner, runtime)
    action_id = (await wait_job(owner, job_id, stop_on_waiting=True))["job"]["wait"]["action_id"]
    await call(owner, "cancel-job", {"job_id": job_id})
    err = await unchanged(
        runtime,
        owner,
        "resolve-pending-action",
        {"action_id": action_id, "decision": "accepted"},
        "pending_action_already_resolved",
    )
    assert err["data"]["status"] == "cancelled"
    assert await items_of(runtime) == []
    assert (await call(owner, "list-pending-actions", {}))["total"] == 0


# --- retry-job ----------------------------------------------------------------------------------


async def failing_publish(client, runtime, *, names=("alpha",), max_items=1):
    """fetch → publish into a path that is a file, so the publish step fails (not retryable)."""
    inbox, _ = dirs(runtime)
    write_items(inbox, *names)
    bad = runtime.data_dir / "files" / "bad"
    made = await make_flow(client, [fetch_step(inbox, max_items), publish_step(bad)])
    bad.write_text("in the way")
    return made, bad


async def test_retry_resumes_at_the_failed_step_with_its_input(runtime, owner, engine):
    made, bad = await failing_publish(owner, runtime)
    failed = (await run(owner, made["flow_id"], wait=10))["job"]
    job_id = failed["job_id"]
    assert failed["status"] == "failed - file_write_failed"
    publish_fsid = made["flow_step_ids"][1]
    assert failed["current_step_id"] == publish_fsid
    assert [p["data"]["title"] for p in failed["packets"]] == ["Alpha"]  # the failed step's input
    assert await items_of(runtime) == []  # the claim was released
    # fix the target, and remove the source file: a resumed job must not fetch again
    bad.unlink()
    bad.mkdir()
    (runtime.data_dir / "files" / "in" / "alpha.md").unlink()
    out = await call(owner, "retry-job", {"job_id": job_id})
    assert out == {
        "job_id": job_id,
        "previous_status": "failed - file_write_failed",
        "status": "pending",
        "resume_step": publish_fsid,
        "parent_reopened": None,
        "message": f"Job {job_id} is pending again and resumes at step {publish_fsid}.",
    }
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("claimed", job_id)]  # re-claimed
    done = await wait_job(owner, job_id)
    assert done["job"]["status"] == "completed" and done["job"]["error"] is None
    assert [p.name for p in bad.iterdir()] == [f"alpha-{job_id}.md"]
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("processed", job_id)]
    engine_data = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]["engine_data"]
    assert engine_data["retry"]["manual_retries"] == 1
    assert len(await audit_rows(runtime, "retry-job")) == 1


async def test_retry_child_reopens_the_failed_parent(runtime, owner, engine):
    made, bad = await failing_publish(owner, runtime, names=("alpha", "beta"), max_items=2)
    parent = (await run(owner, made["flow_id"], wait=15))["job"]
    assert parent["status"] == "failed - All 2 child jobs failed"
    children = (await call(owner, "get-jobs", {"parent_job_id": parent["job_id"], "order": "ASC"}))["jobs"]
    err = await unchanged(runtime, owner, "retry-job", {"job_id": parent["job_id"]}, "invalid_job_status")
    assert "retry its failed children" in err["message"]
    bad.unlink()
    bad.mkdir()
    out = await call(owner, "retry-job", {"job_id": children[0]["job_id"]})
    assert out["parent_reopened"] == parent["job_id"]
    reopened = (await call(owner, "get-jobs", {"job_id": parent["job_id"]}))["jobs"][0]
    assert reopened["base_status"] in ("processing", "completed")
    done = await wait_job(owner, parent["job_id"])
    assert done["job"]["status"] == "completed"
    assert done["job"]["child_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert (await call(owner, "get-run-metrics", {"job_id": parent["job_id"]}))["metrics"]["batch_results"] == {
        "completed": 1,
        "failed": 1,
        "skipped": 0,
        "cancelled": 0,
        "total": 2,
    }


async def test_retry_item_conflict_writes_nothing(runtime, owner, engine):
    made, _ = await failing_publish(owner, runtime)
    job_id = (await run(owner, made["flow_id"], wait=10))["job_id"]
    # meanwhile the item is marked processed for the flow step
    item = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]["packets"][0]["metadata"]
    await call(
        owner,
        "mark-processed",
        {"flow_step_id": item["flow_step_id"], "source_type": "files", "item_identifier": item["item_identifier"]},
    )
    err = await unchanged(runtime, owner, "retry-job", {"job_id": job_id}, "retry_item_conflict")
    assert err["data"]["identifiers"] == [item["item_identifier"]]


async def test_retry_job_status_and_input_errors(runtime, owner):
    _, job_id = await pending_job(owner, runtime)
    err = await unchanged(runtime, owner, "retry-job", {"job_id": job_id}, "invalid_job_status")
    assert err["message"] == f"Job {job_id} has status 'pending'; only failed jobs can be retried."
    await unchanged(runtime, owner, "retry-job", {"job_id": 77}, "job_not_found")
    await unchanged(runtime, owner, "retry-job", {"job_id": -1}, "invalid_input")
    await unchanged(runtime, owner, "retry-job", {"job_id": job_id, "reason": "x"}, "invalid_input")


async def test_retry_of_a_planless_job_resnapshots_the_flow(runtime, owner):
    made, job_id = await pending_job(owner, runtime)
    await call(owner, "fail-job", {"job_id": job_id})
    async with runtime.db.read() as session:
        original = json.dumps((await session.get(Flow, made["flow_id"])).flow_config)
    # a job that failed before it had a plan (as the scheduler records an invalid flow)
    await sql(runtime, "UPDATE datamachine_jobs SET current_step_id = NULL WHERE job_id = :j", j=job_id)
    await sql(runtime, "UPDATE datamachine_flows SET flow_config = '{}' WHERE flow_id = :f", f=made["flow_id"])
    await unchanged(runtime, owner, "retry-job", {"job_id": job_id}, "no_first_step")
    broken = {
        "x_1": {"flow_step_id": "x_1", "step_type": "publish", "execution_order": 0, "handler_slugs": []},
    }
    await sql(
        runtime,
        "UPDATE datamachine_flows SET flow_config = :c WHERE flow_id = :f",
        c=json.dumps(broken),
        f=made["flow_id"],
    )
    err = await unchanged(runtime, owner, "retry-job", {"job_id": job_id}, "invalid_execution_plan")
    assert "x_1" in err["message"]
    await sql(
        runtime, "UPDATE datamachine_flows SET flow_config = :c WHERE flow_id = :f", c=original, f=made["flow_id"]
    )
    out = await call(owner, "retry-job", {"job_id": job_id})
    assert out["resume_step"] == made["flow_step_ids"][0]
    row = await job_row(runtime, job_id)
    assert row.status == "pending" and row.current_step_id == made["flow_step_ids"][0]
    assert set(row.engine_data["flow_config"]) == set(made["flow_step_ids"])


async def test_retry_needs_an_active_agent(runtime, owner):
    bot = await make_agent(owner)
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    await call(owner, "fail-job", {"job_id": job_id})
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    await unchanged(runtime, owner, "retry-job", {"job_id": job_id}, "agent_inactive")


# --- delete-jobs --------------------------------------------------------------------------------


async def test_delete_jobs_by_type_and_active_jobs_kept(runtime, owner):
    made, first = await pending_job(owner, runtime)
    flow_id = made["flow_id"]
    second = (await run(owner, flow_id))["job_id"]
    third = (await run(owner, flow_id))["job_id"]
    active = (await run(owner, flow_id))["job_id"]
    await call(owner, "fail-job", {"job_id": first})
    await call(owner, "fail-job", {"job_id": second})
    await call(owner, "cancel-job", {"job_id": third})
    out = await call(owner, "delete-jobs", {"type": "failed", "flow_id": flow_id})
    assert out == {
        "deleted_count": 2,
        "processed_items_cleaned": 0,
        "skipped_active": 0,
        "message": "Deleted 2 job(s).",
    }
    out = await call(owner, "delete-jobs", {"type": "all", "flow_id": flow_id})
    assert out["deleted_count"] == 1 and out["skipped_active"] == 1
    remaining = (await call(owner, "get-jobs", {"flow_id": flow_id}))["jobs"]
    assert [j["job_id"] for j in remaining] == [active]
    assert len(await audit_rows(runtime, "delete-jobs")) == 2
    # nothing left to delete: no change, no audit row
    before = await table_rows(runtime)
    assert (await call(owner, "delete-jobs", {"type": "all", "flow_id": flow_id}))["deleted_count"] == 0
    assert await table_rows(runtime) == before


async def test_delete_jobs_cascades_children_and_cleans_processed(runtime, owner, engine):
    inbox, _ = dirs(runtime)
    made = await files_flow(owner, runtime, max_items=2)
    write_items(inbox, "alpha", "beta")
    parent = (await run(owner, made["flow_id"], wait=15))["job"]
    assert parent["status"] == "completed"
    write_items(inbox, "gamma")
    single = (await run(owner, made["flow_id"], wait=15))["job"]
    assert single["status"] == "completed"
    assert [s for _, s, _ in await items_of(runtime)] == ["processed"] * 3
    # without cleanup: the rows stay processed, their job_id becomes NULL
    out = await call(
        owner, "delete-jobs", {"type": "all", "pipeline_id": made["pipeline_id"], "cleanup_processed": False}
    )
    assert out["deleted_count"] == 4 and out["processed_items_cleaned"] == 0  # parent + 2 children + single
    assert await count(runtime, "datamachine_jobs") == 0
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("processed", None)] * 3
    write_items(inbox, "delta")
    assert (await run(owner, made["flow_id"], wait=15))["job"]["status"] == "completed"
    out = await call(owner, "delete-jobs", {"type": "all", "flow_id": made["flow_id"], "cleanup_processed": True})
    assert out["deleted_count"] == 1 and out["processed_items_cleaned"] == 1
    assert len(await items_of(runtime)) == 3


async def test_delete_jobs_keeps_a_final_parent_with_an_active_child(runtime, owner):
    made, parent = await pending_job(owner, runtime)
    _, child = await pending_job(owner, runtime, name="Q")
    await call(owner, "fail-job", {"job_id": parent})
    # a child running again under a final parent (retry-job of a child of a completed parent)
    await sql(
        runtime,
        "UPDATE datamachine_jobs SET parent_job_id = :p, flow_id = :fs, pipeline_id = :ps, flow_key = :f, "
        "pipeline_key = :pk WHERE job_id = :c",
        p=parent,
        c=child,
        fs=str(made["flow_id"]),
        ps=str(made["pipeline_id"]),
        f=made["flow_id"],
        pk=made["pipeline_id"],
    )
    out = await call(owner, "delete-jobs", {"type": "all", "flow_id": made["flow_id"]})
    assert out["deleted_count"] == 0 and out["skipped_active"] == 1
    assert await job_row(runtime, parent) is not None


async def test_delete_jobs_permissions_and_scope(runtime, owner):
    bot = await make_agent(owner, "bot")
    other = await make_agent(owner, "other")
    await grant(owner, bot, 2, "admin")
    await grant(owner, other, 2, "operator")
    mine = await files_flow(owner, runtime, agent_id=bot, name="Mine")
    theirs = await files_flow(owner, runtime, agent_id=other, name="Theirs")
    jobs = {}
    for key, made in (("mine", mine), ("theirs", theirs)):
        jobs[key] = (await run(owner, made["flow_id"]))["job_id"]
        await call(owner, "fail-job", {"job_id": jobs[key]})
    direct_mine = (
        await call(
            owner,
            "execute-workflow",
            {
                "wait_seconds": 0,
                "agent_id": bot,
                "workflow": {"steps": [{"step_type": "system_task", "flow_step_settings": {"task_type": "echo"}}]},
            },
        )
    )["job_id"]
    direct_theirs = (
        await call(
            owner,
            "execute-workflow",
            {
                "wait_seconds": 0,
                "agent_id": other,
                "workflow": {"steps": [{"step_type": "system_task", "flow_step_settings": {"task_type": "echo"}}]},
            },
        )
    )["job_id"]
    for job_id in (direct_mine, direct_theirs):
        await call(owner, "cancel-job", {"job_id": job_id})
    async with connect(runtime, USER2) as admin2:
        err = await denied(runtime, admin2, "delete-jobs", {"type": "all"}, "permission_denied")
        assert "global administrator" in err["message"]
        await denied(runtime, admin2, "delete-jobs", {"type": "all", "agent_id": other})
        await denied(runtime, admin2, "delete-jobs", {"type": "all", "flow_id": theirs["flow_id"]})
        await unchanged(runtime, admin2, "delete-jobs", {"type": "all", "flow_id": 999}, "flow_not_found")
        await unchanged(runtime, admin2, "delete-jobs", {"type": "all", "agent_id": 999}, "agent_not_found")
        # rows filtered: "direct" matches both agents' direct jobs, only the admin one goes
        out = await call(admin2, "delete-jobs", {"type": "all", "flow_id": "direct"})
        assert out["deleted_count"] == 1
        assert await job_row(runtime, direct_mine) is None and await job_row(runtime, direct_theirs) is not None
        out = await call(admin2, "delete-jobs", {"type": "failed", "agent_id": bot})
        assert out["deleted_count"] == 1 and await job_row(runtime, jobs["mine"]) is None
    async with connect(runtime, USER3) as stranger:
        await denied(runtime, stranger, "delete-jobs", {"type": "all", "agent_id": other})
    # the global administrator may delete everything at once
    out = await call(owner, "delete-jobs", {"type": "all"})
    assert out["deleted_count"] == 2 and await count(runtime, "datamachine_jobs") == 0
    for args, field in (
        ({}, "type"),
        ({"type": "some"}, "type"),
        ({"type": "all", "flow_id": "x"}, "flow_id"),
        ({"type": "all", "agent_id": 0}, "agent_id"),
    ):
        err = await unchanged(runtime, owner, "delete-jobs", args, "invalid_input")
        assert err["data"]["errors"][0]["field"].startswith(field)


# --- recover-stuck-jobs -------------------------------------------------------------------------


async def stuck(runtime, job_id: int, *, attempts: int = 1, minutes_ago: int = 5) -> None:
    """Make a job look like its worker died: processing under an expired lease."""
    past = utcnow() - timedelta(minutes=minutes_ago)
    await sql(
        runtime,
        "UPDATE datamachine_jobs SET status = 'processing', lease_owner = 'dead:1:abcdef01', "
        "lease_expires_at = :t, attempts = :a, started_at = :t, updated_at = :t WHERE job_id = :j",
        t=past.replace(tzinfo=None),
        a=attempts,
        j=job_id,
    )


async def test_recover_requeues_and_fails_expired_leases(runtime, owner):
    made, first = await pending_job(owner, runtime)
    second = (await run(owner, made["flow_id"]))["job_id"]
    await stuck(runtime, first, attempts=1)
    await stuck(runtime, second, attempts=3)
    before = await table_rows(runtime)
    dry = await call(owner, "recover-stuck-jobs", {"dry_run": True})
    assert dry["dry_run"] is True and dry["requeued"] == 1 and dry["failed"] == 1
    assert await table_rows(runtime) == before
    out = await call(owner, "recover-stuck-jobs", {})
    assert (out["requeued"], out["failed"], out["timed_out_waits"], out["parents_completed"]) == (1, 1, 0, 0)
    assert out["jobs"] == [
        {"job_id": first, "previous_status": "processing", "new_status": "pending", "action": "requeued"},
        {"job_id": second, "previous_status": "processing", "new_status": "failed - lease_expired", "action": "failed"},
    ]
    assert out["limit_reached"] is False and out["message"].startswith("Recovered 2 job(s)")
    assert await status_of(runtime, first) == "pending"
    assert await status_of(runtime, second) == "failed - lease_expired"
    row = await job_row(runtime, first)
    assert row.lease_owner is None and row.engine_data["retry"]["last_class"] == "lease_expired"
    assert len(await audit_rows(runtime, "recover-stuck-jobs")) == 1
    # nothing left: no change, no audit row
    before = await table_rows(runtime)
    assert (await call(owner, "recover-stuck-jobs", {}))["jobs"] == []
    assert await table_rows(runtime) == before


async def test_recover_wait_timeouts_orphaned_parents_and_limit(runtime, owner, engine):
    made, job_id = await waiting_job(owner, runtime, timeout_hours=1)
    action_id = (await wait_job(owner, job_id, stop_on_waiting=True))["job"]["wait"]["action_id"]
    await engine.stop()
    past = (utcnow() - timedelta(minutes=1)).replace(tzinfo=None)
    await sql(runtime, "UPDATE datamachine_jobs SET wait_expires_at = :t WHERE job_id = :j", t=past, j=job_id)
    # an orphaned batch parent: processing, no lease, every child final
    parent = (await run(owner, made["flow_id"]))["job_id"]
    child = (await run(owner, made["flow_id"]))["job_id"]
    await sql(
        runtime,
        "UPDATE datamachine_jobs SET status = 'processing', engine_data = json_set(engine_data, '$.batch', "
        'json(\'{"is_parent": true, "total": 1}\')) WHERE job_id = :p',
        p=parent,
    )
    await sql(
        runtime,
        "UPDATE datamachine_jobs SET parent_job_id = :p, status = 'completed' WHERE job_id = :c",
        p=parent,
        c=child,
    )
    limited = await call(owner, "recover-stuck-jobs", {"limit": 1})
    assert limited["limit_reached"] is True and limited["timed_out_waits"] == 1 and limited["parents_completed"] == 0
    assert limited["jobs"][0]["new_status"] == "failed - approval_timeout"
    action = (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]
    assert action["status"] == "expired" and action["job_status"] == "failed - approval_timeout"
    assert await items_of(runtime) == []  # claims released
    out = await call(owner, "recover-stuck-jobs", {"flow_id": made["flow_id"]})
    assert out["parents_completed"] == 1
    assert out["jobs"] == [
        {"job_id": parent, "previous_status": "processing", "new_status": "completed", "action": "parent_completed"}
    ]
    assert await status_of(runtime, parent) == "completed"


async def test_recover_older_than_voids_live_leases(runtime, owner):
    _, job_id = await pending_job(owner, runtime)
    await stuck(runtime, job_id, minutes_ago=30)
    future = (utcnow() + timedelta(minutes=5)).replace(tzinfo=None)
    await sql(runtime, "UPDATE datamachine_jobs SET lease_expires_at = :t WHERE job_id = :j", t=future, j=job_id)
    assert (await call(owner, "recover-stuck-jobs", {"job_id": job_id}))["jobs"] == []
    out = await call(owner, "recover-stuck-jobs", {"job_id": job_id, "older_than_minutes": 10})
    assert out["leases_voided"] == 1 and out["requeued"] == 1
    assert await status_of(runtime, job_id) == "pending"


async def test_recover_permissions_and_row_filter(runtime, owner):
    bot = await make_agent(owner, "bot")
    other = await make_agent(owner, "other")
    await grant(owner, bot, 2, "operator")
    await grant(owner, other, 2, "viewer")
    mine = await files_flow(owner, runtime, agent_id=bot, name="Mine")
    theirs = await files_flow(owner, runtime, agent_id=other, name="Theirs")
    a = (await run(owner, mine["flow_id"]))["job_id"]
    b = (await run(owner, theirs["flow_id"]))["job_id"]
    await stuck(runtime, a)
    await stuck(runtime, b)
    async with connect(runtime, USER2) as op:
        await denied(runtime, op, "recover-stuck-jobs", {}, "permission_denied")
        await denied(runtime, op, "recover-stuck-jobs", {"job_id": b})
        await denied(runtime, op, "recover-stuck-jobs", {"flow_id": theirs["flow_id"]})
        await unchanged(runtime, op, "recover-stuck-jobs", {"job_id": 999}, "job_not_found")
        await unchanged(runtime, op, "recover-stuck-jobs", {"flow_id": 999}, "flow_not_found")
        out = await call(op, "recover-stuck-jobs", {"job_id": a})
        assert [j["job_id"] for j in out["jobs"]] == [a]
    assert await status_of(runtime, b) == "processing"
    for args, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"older_than_minutes": 10081}, "older_than_minutes"),
        ({"dry_run": "yes"}, "dry_run"),
    ):
        err = await unchanged(runtime, owner, "recover-stuck-jobs", args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field
    # an inactive agent's rows are never changed by bulk recovery
    await call(owner, "update-agent", {"agent_id": other, "status": "inactive"})
    assert (await call(owner, "recover-stuck-jobs", {}))["jobs"] == []
    assert await status_of(runtime, b) == "processing"
    await unchanged(runtime, owner, "recover-stuck-jobs", {"job_id": b}, "agent_inactive")
    assert (await call(owner, "recover-stuck-jobs", {"job_id": b, "dry_run": True}))["jobs"] == []


async def test_fail_error_is_visible_without_trace_to_viewers(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    await call(owner, "fail-job", {"job_id": job_id})
    await sql(
        runtime,
        "UPDATE datamachine_jobs SET engine_data = json_set(engine_data, '$.error.trace', 'Traceback…') "
        "WHERE job_id = :j",
        j=job_id,
    )
    admin_view = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]
    assert admin_view["error"]["trace"] == "Traceback…"
    assert admin_view["engine_data"]["error"]["trace"] == "Traceback…"
    async with connect(runtime, USER2) as viewer:
        view = (await call(viewer, "get-jobs", {"job_id": job_id}))["jobs"][0]
        assert "trace" not in view["error"] and "trace" not in view["engine_data"]["error"]
