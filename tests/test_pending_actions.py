"""list-pending-actions, get-pending-action and resolve-pending-action.

See docs/engine.md, Waits: approval and webhook gate.
"""

from __future__ import annotations

import anyio
import pytest
from mcp.types import CallToolResult

from tests import jobs_support
from tests.conftest import call, connect, error_of, table_rows
from tests.jobs_support import (
    USER2,
    USER3,
    approval_step,
    audit_rows,
    denied,
    dirs,
    fetch_step,
    grant,
    items_of,
    make_agent,
    make_flow,
    publish_step,
    run,
    unchanged,
    wait_job,
    write_items,
)

pytestmark = pytest.mark.anyio
engine = jobs_support.engine  # fixture

ACTION_KEYS = {
    "action_id",
    "flow_step_id",
    "next_flow_step_id",
    "description",
    "preview",
    "requested_at",
    "expires_at",
    "status",
    "job_id",
    "flow_id",
    "flow_name",
    "pipeline_id",
    "agent_id",
    "job_status",
}
DECISION_KEYS = {"decided_by_user_id", "decided_by_agent_id", "decided_at", "note"}


async def gated(client, runtime, *, last: bool = False, name: str = "Gate", **settings):
    """fetch files → approval (→ publish files); returns (flow, job_id, action_id) once the job is parked."""
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha")
    steps = [fetch_step(inbox), approval_step(**settings)]
    if not last:
        steps.append(publish_step(outbox))
    made = await make_flow(client, steps, name=name)
    job_id = (await run(client, made["flow_id"]))["job_id"]
    parked = await wait_job(client, job_id, stop_on_waiting=True)
    assert parked["job"]["base_status"] == "waiting", parked
    return made, job_id, parked["job"]["wait"]["action_id"]


async def test_accept_resumes_the_job_at_the_next_step(runtime, owner, engine):
    made, job_id, action_id = await gated(owner, runtime)
    listed = await call(owner, "list-pending-actions", {})
    assert listed["total"] == 1 and (listed["per_page"], listed["offset"]) == (20, 0)
    action = listed["actions"][0]
    assert set(action) == ACTION_KEYS
    assert action["action_id"] == action_id and action["job_id"] == job_id and action["status"] == "pending"
    assert action["flow_step_id"] == made["flow_step_ids"][1]
    assert action["next_flow_step_id"] == made["flow_step_ids"][2]
    assert action["description"] == "Check it" and action["preview"]["title"] == "Alpha"
    assert "Body of alpha." in action["preview"]["body"]
    assert action["expires_at"] is None and action["job_status"] == "waiting"
    assert (action["flow_id"], action["flow_name"], action["pipeline_id"]) == (
        made["flow_id"],
        "Gate",
        made["pipeline_id"],
    )
    got = (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]
    assert set(got) == ACTION_KEYS | DECISION_KEYS and got["decided_at"] is None and got["note"] is None
    out = await call(owner, "resolve-pending-action", {"action_id": action_id, "decision": "accepted", "note": "ok"})
    assert out["action_id"] == action_id and out["job_id"] == job_id and out["decision"] == "accepted"
    assert out["job_status"] == "pending" and out["decided_at"]
    assert out["message"] == f"Accepted: job {job_id} resumes at step {made['flow_step_ids'][2]}."
    done = await wait_job(owner, job_id)
    assert done["job"]["status"] == "completed" and done["job"]["wait"] is None
    _, outbox = dirs(runtime)
    assert [p.name for p in outbox.iterdir()] == [f"alpha-{job_id}.md"]
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("processed", job_id)]
    decided = (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]
    assert decided["status"] == "accepted" and decided["note"] == "ok" and decided["decided_by_user_id"] == 1
    assert decided["decided_by_agent_id"] is None and decided["decided_at"] == out["decided_at"]
    assert decided["job_status"] == "completed"
    assert (await call(owner, "list-pending-actions", {}))["total"] == 0
    audits = await audit_rows(runtime, "resolve-pending-action")
    assert len(audits) == 1 and audits[0]["job_id"] == job_id and "ok" not in audits[0]["message"]
    # a second decision changes nothing and is refused with the recorded decision
    err = await unchanged(
        runtime,
        owner,
        "resolve-pending-action",
        {"action_id": action_id, "decision": "rejected"},
        "pending_action_already_resolved",
    )
    assert err["data"]["status"] == "accepted" and err["data"]["decided_by_user_id"] == 1
    assert err["data"]["decided_at"] == out["decided_at"]


async def test_reject_skip_completes_the_claim(runtime, owner, engine):
    made, job_id, action_id = await gated(owner, runtime)
    out = await call(owner, "resolve-pending-action", {"action_id": action_id, "decision": "rejected"})
    assert out["job_status"] == "agent_skipped - approval_rejected"
    assert out["message"] == f"Rejected: job {job_id} is agent_skipped - approval_rejected."
    job = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]
    assert job["engine_data"]["approval"]["status"] == "rejected" and job["error"] is None
    # skipped items end processed: the next run does not propose the item again
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("processed", job_id)]
    again = await run(owner, made["flow_id"], wait=10)
    assert again["job"]["status"] == "completed_no_items"
    _, outbox = dirs(runtime)
    assert list(outbox.iterdir()) == []


async def test_reject_fail_releases_the_claim(runtime, owner, engine):
    made, job_id, action_id = await gated(owner, runtime, on_reject="fail")
    out = await call(
        owner, "resolve-pending-action", {"action_id": action_id, "decision": "rejected", "note": "off topic"}
    )
    assert out["job_status"] == "failed - approval_rejected"
    job = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]
    assert job["error"]["reason"] == "approval_rejected" and "off topic" in job["error"]["message"]
    assert [p["data"]["title"] for p in job["packets"]] == ["Alpha"]  # the gate's input, for a retry
    assert await items_of(runtime) == []  # released: fetched again by the next run
    health = await call(owner, "get-flow-health", {"flow_id": made["flow_id"]})
    assert health["consecutive_failures"] == 1
    again = (await run(owner, made["flow_id"]))["job_id"]
    assert (await wait_job(owner, again, stop_on_waiting=True))["job"]["base_status"] == "waiting"
    # retry-job of the rejected job parks it at the approval again: a new action
    await call(owner, "cancel-job", {"job_id": again})
    await call(owner, "retry-job", {"job_id": job_id})
    parked = await wait_job(owner, job_id, stop_on_waiting=True)
    new_action = parked["job"]["wait"]["action_id"]
    assert new_action != action_id
    # the job's approval record now belongs to the new action; the old id is gone
    await unchanged(runtime, owner, "get-pending-action", {"action_id": action_id}, "pending_action_not_found")
    await call(owner, "resolve-pending-action", {"action_id": new_action, "decision": "accepted"})
    assert (await wait_job(owner, job_id))["job"]["status"] == "completed"


async def test_accepting_the_last_step_completes_the_job(runtime, owner, engine):
    made, job_id, action_id = await gated(owner, runtime, last=True)
    assert (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]["next_flow_step_id"] is None
    out = await call(owner, "resolve-pending-action", {"action_id": action_id, "decision": "accepted"})
    assert out["job_status"] == "completed"
    assert out["message"] == f"Accepted: job {job_id} completed (the approval was its last step)."
    job = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]
    assert [p["data"]["title"] for p in job["packets"]] == ["Alpha"]
    assert [(s, j) for _, s, j in await items_of(runtime)] == [("processed", job_id)]
    health = await call(owner, "get-flow-health", {"flow_id": made["flow_id"]})
    assert health["latest_job"]["status"] == "completed"


async def test_approval_without_input_passes_a_decision_packet(runtime, owner, engine):
    workflow = {
        "steps": [
            {"step_type": "approval", "flow_step_settings": {"description": "Ship it?"}},
            {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"x": 1}}},
        ]
    }
    started = await call(owner, "execute-workflow", {"wait_seconds": 0, "workflow": workflow})
    parked = await wait_job(owner, started["job_id"], stop_on_waiting=True)
    action_id = parked["job"]["wait"]["action_id"]
    action = (await call(owner, "list-pending-actions", {}))["actions"][0]
    assert action["flow_id"] == "direct" and action["pipeline_id"] == "direct"
    assert action["flow_name"] == "Direct Workflow"
    assert action["preview"] == {"title": "", "body": ""}
    await call(owner, "resolve-pending-action", {"action_id": action_id, "decision": "accepted", "note": "go"})
    async with runtime.db.read() as session:
        from datamachine_mcp.storage.models import Job

        row = await session.get(Job, started["job_id"])
        assert row.current_step_id == "ephemeral_step_1"
        assert row.packets[0]["type"] == "approval_decision"
        assert row.packets[0]["data"] == {"title": "Ship it?", "body": "go", "decision": "accepted"}
    assert (await wait_job(owner, started["job_id"]))["job"]["status"] == "completed"


async def test_concurrent_decisions_exactly_one_wins(runtime, owner, engine):
    _, _, action_id = await gated(owner, runtime)
    results: dict[str, CallToolResult] = {}

    async def decide(decision: str) -> None:
        results[decision] = await owner.call_tool(
            "resolve-pending-action", {"action_id": action_id, "decision": decision}
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(decide, "accepted")
        tg.start_soon(decide, "rejected")
    outcomes = {d: r.is_error for d, r in results.items()}
    assert sorted(outcomes.values()) == [False, True]
    winner = next(d for d, is_error in outcomes.items() if not is_error)
    loser = results[next(d for d, is_error in outcomes.items() if is_error)]
    assert error_of(loser)["code"] == "pending_action_already_resolved"
    assert error_of(loser)["data"]["status"] == winner
    assert len(await audit_rows(runtime, "resolve-pending-action")) == 1


async def test_pending_action_roles_and_scope(runtime, owner, engine):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    await grant(owner, bot, 3, "operator")
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha")
    made = await make_flow(owner, [fetch_step(inbox), approval_step(), publish_step(outbox)], agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    action_id = (await wait_job(owner, job_id, stop_on_waiting=True))["job"]["wait"]["action_id"]
    # another pending action of the owner's own user, invisible to users 2 and 3
    _, _, mine = await gated(owner, runtime, name="Mine")
    assert (await call(owner, "list-pending-actions", {}))["total"] == 2
    async with connect(runtime, USER2) as viewer:
        listed = await call(viewer, "list-pending-actions", {})
        assert [a["action_id"] for a in listed["actions"]] == [action_id] and listed["total"] == 1
        assert (await call(viewer, "get-pending-action", {"action_id": action_id}))["action"]["agent_id"] == bot
        await denied(runtime, viewer, "get-pending-action", {"action_id": mine})
        err = await denied(runtime, viewer, "resolve-pending-action", {"action_id": action_id, "decision": "accepted"})
        assert err["data"]["required_role"] == "operator"
    async with connect(runtime, USER3) as operator:
        out = await call(operator, "resolve-pending-action", {"action_id": action_id, "decision": "rejected"})
        assert out["job_status"] == "agent_skipped - approval_rejected"
        decided = (await call(operator, "get-pending-action", {"action_id": action_id}))["action"]
        assert decided["decided_by_user_id"] == 3
    async with connect(runtime, USER2) as viewer:
        assert (await call(viewer, "list-pending-actions", {}))["total"] == 0
    other = await make_agent(owner, "other")
    async with connect(runtime, USER3) as operator:
        await denied(runtime, operator, "list-pending-actions", {"agent_id": other})
    # inactive agents' actions stay readable but cannot be decided, by anyone
    write_items(inbox, "beta")
    second = (await run(owner, made["flow_id"]))["job_id"]
    open_action = (await wait_job(owner, second, stop_on_waiting=True))["job"]["wait"]["action_id"]
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    assert (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]["status"] == "rejected"
    await unchanged(
        runtime, owner, "resolve-pending-action", {"action_id": open_action, "decision": "accepted"}, "agent_inactive"
    )
    assert (await call(owner, "list-pending-actions", {"agent_id": bot}))["total"] == 1


async def test_list_filters_and_paging(runtime, owner, engine):
    first, _, a1 = await gated(owner, runtime, name="First")
    second, _, a2 = await gated(owner, runtime, name="Second")
    write_items(runtime.data_dir / "files" / "in", "beta")
    third_job = (await run(owner, second["flow_id"]))["job_id"]
    a3 = (await wait_job(owner, third_job, stop_on_waiting=True))["job"]["wait"]["action_id"]
    listed = await call(owner, "list-pending-actions", {})
    assert [a["action_id"] for a in listed["actions"]] == [a1, a2, a3]  # oldest request first
    assert [
        a["action_id"] for a in (await call(owner, "list-pending-actions", {"flow_id": second["flow_id"]}))["actions"]
    ] == [a2, a3]
    assert (await call(owner, "list-pending-actions", {"pipeline_id": first["pipeline_id"]}))["total"] == 1
    page = await call(owner, "list-pending-actions", {"per_page": 1, "offset": 2})
    assert [a["action_id"] for a in page["actions"]] == [a3] and page["total"] == 3
    assert (await call(owner, "list-pending-actions", {"flow_id": 999}))["total"] == 0
    for args, field in (
        ({"per_page": 101}, "per_page"),
        ({"offset": -1}, "offset"),
        ({"flow_id": "direct"}, "flow_id"),
        ({"agent_id": 0}, "agent_id"),
    ):
        err = await unchanged(runtime, owner, "list-pending-actions", args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field
    await unchanged(runtime, owner, "list-pending-actions", {"agent_id": 42}, "agent_not_found")


async def test_pending_action_errors(runtime, owner, engine):
    _, job_id, action_id = await gated(owner, runtime)
    unknown = "pa_" + "0" * 32
    await unchanged(runtime, owner, "get-pending-action", {"action_id": unknown}, "pending_action_not_found")
    await unchanged(
        runtime,
        owner,
        "resolve-pending-action",
        {"action_id": unknown, "decision": "accepted"},
        "pending_action_not_found",
    )
    for tool, args, field in (
        ("get-pending-action", {"action_id": "pa_123"}, "action_id"),
        ("get-pending-action", {"action_id": action_id.upper()}, "action_id"),
        ("get-pending-action", {}, "action_id"),
        ("resolve-pending-action", {"action_id": action_id, "decision": "approve"}, "decision"),
        ("resolve-pending-action", {"action_id": action_id, "decision": "accepted", "note": "n" * 1001}, "note"),
        ("resolve-pending-action", {"action_id": action_id, "decision": "accepted", "why": 1}, "why"),
    ):
        err = await unchanged(runtime, owner, tool, args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field
    # without a decision a client that cannot ask the user is told to give one (tests/test_elicitation.py asks)
    err = await unchanged(runtime, owner, "resolve-pending-action", {"action_id": action_id}, "decision_required")
    assert "accepted or rejected" in err["message"]
    before = await table_rows(runtime)
    assert (await call(owner, "get-pending-action", {"action_id": action_id}))["action"]["job_id"] == job_id
    assert await table_rows(runtime) == before
