"""execute-workflow: ad-hoc runs from inline steps (docs/engine.md, Other creation paths)."""

from __future__ import annotations

import time

import pytest

from tests import jobs_support
from tests.conftest import call, connect, count, fail, table_rows
from tests.jobs_support import (
    USER2,
    USER3,
    audit_rows,
    denied,
    dirs,
    echo_step,
    fetch_step,
    grant,
    job_row,
    make_agent,
    publish_step,
    unchanged,
    write_items,
)

pytestmark = pytest.mark.anyio
engine = jobs_support.engine  # fixture

ECHO = {"steps": [echo_step(a=1)]}


async def execute(client, workflow=None, **extra):
    return await call(client, "execute-workflow", {"wait_seconds": 0, "workflow": workflow or ECHO, **extra})


async def test_direct_workflow_runs_and_waits(runtime, owner, engine):
    out = await execute(owner, {"steps": [echo_step(a=1), echo_step(b=2)]}, wait_seconds=10)
    assert out["execution_mode"] == "direct" and out["execution_type"] == "immediate"
    assert out["step_count"] == 2 and out["dry_run"] is False and out["replayed"] is False
    assert out["status"] == "completed" and out["final"] is True and out["timed_out"] is False
    assert "scheduled_for" not in out
    job = out["job"]
    assert (job["pipeline_id"], job["flow_id"], job["source"], job["label"]) == (
        "direct",
        "direct",
        "direct",
        "Direct Workflow",
    )
    assert job["run_trigger"] == "workflow" and job["user_id"] == 1 and job["agent_id"] is None
    assert job["packets"][0]["data"]["result"] == {"b": 2}
    detail = (await call(owner, "get-jobs", {"job_id": out["job_id"]}))["jobs"][0]["engine_data"]
    assert list(detail["flow_config"]) == ["ephemeral_step_0", "ephemeral_step_1"]
    assert detail["pipeline_config"]["ephemeral_pipeline_1"]["execution_order"] == 1
    audits = await audit_rows(runtime, "execute-workflow")
    assert len(audits) == 1 and audits[0]["job_id"] == out["job_id"]
    # no pipeline or flow rows are written
    assert await count(runtime, "datamachine_pipelines") == 0 and await count(runtime, "datamachine_flows") == 0


async def test_source_label_and_returning_at_once(runtime, owner):
    out = await execute(owner, initial_data={"job_source": "chat", "job_label": "  Morning digest  ", "topic": "x"})
    assert out["status"] == "pending" and "job" not in out and "final" not in out
    assert out["message"] == f"Direct workflow job {out['job_id']} created (1 steps); a worker starts it shortly."
    job = (await call(owner, "get-jobs", {"job_id": out["job_id"]}))["jobs"][0]
    assert job["source"] == "chat" and job["label"] == "Morning digest"
    assert job["engine_data"]["topic"] == "x"
    for data in ({"job_source": "s" * 51}, {"job_source": 5}, {"job_label": ""}, {"flow_config": {}}, {"retry": 1}):
        await unchanged(
            runtime,
            owner,
            "execute-workflow",
            {"wait_seconds": 0, "workflow": ECHO, "initial_data": data},
            "invalid_initial_data",
        )


async def test_direct_runs_never_deduplicate(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha")
    workflow = {"steps": [fetch_step(inbox), publish_step(outbox)]}
    first = await execute(owner, workflow, wait_seconds=10)
    second = await execute(owner, workflow, wait_seconds=10)
    assert first["job"]["status"] == second["job"]["status"] == "completed"
    assert sorted(p.name for p in outbox.iterdir()) == sorted(
        [f"alpha-{first['job_id']}.md", f"alpha-{second['job_id']}.md"]
    )
    assert await count(runtime, "datamachine_processed_items") == 0


async def test_dry_run_previews_without_writing(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha")
    out = await execute(owner, {"steps": [fetch_step(inbox), publish_step(outbox)]}, dry_run=True, wait_seconds=10)
    assert out["dry_run"] is True and out["job"]["status"] == "completed"
    assert list(outbox.iterdir()) == []
    detail = (await call(owner, "get-jobs", {"job_id": out["job_id"]}))["jobs"][0]["engine_data"]
    assert detail["dry_run_mode"] is True
    assert detail["step_results"]["ephemeral_step_1"]["dry_run_preview"]


async def test_delayed_start(runtime, owner, engine):
    later = int(time.time()) + 3600
    out = await execute(owner, timestamp=later, wait_seconds=0.3)
    assert out["execution_type"] == "delayed" and out["scheduled_for"].startswith(
        time.strftime("%Y-%m-%dT%H", time.gmtime(later))
    )
    assert out["final"] is False and out["timed_out"] is True and out["status"] == "pending"
    row = await job_row(runtime, out["job_id"])
    assert int(row.run_at.timestamp()) == later and row.started_at is None
    assert out["message"].startswith(f"Direct workflow job {out['job_id']} scheduled for ")
    past = await execute(owner, timestamp=1_000_000, wait_seconds=10)
    assert past["execution_type"] == "immediate" and past["job"]["status"] == "completed"


async def test_the_message_after_a_wait_reports_the_final_status(runtime, owner, engine):
    _, outbox = dirs(runtime)
    update = {
        "step_type": "update",
        "handler_slugs": ["files"],
        "handler_configs": {"files": {"directory": str(outbox)}},
    }
    out = await execute(owner, {"steps": [echo_step(a=1), update]}, wait_seconds=10)  # nothing to update: fails
    assert out["status"] == "failed" and out["final"] is True
    assert out["message"] == f"Direct workflow job {out['job_id']} (2 steps) finished: failed."
    done = await execute(owner, wait_seconds=10)
    assert done["message"] == f"Direct workflow job {done['job_id']} (1 steps) finished: completed."


async def test_operation_key_replays_and_conflicts(runtime, owner):
    later = int(time.time()) + 600
    first = await execute(owner, operation_key="op-1", timestamp=later)
    before = await table_rows(runtime)
    replay = await execute(owner, operation_key="op-1", timestamp=later)
    assert replay["replayed"] is True and replay["job_id"] == first["job_id"]
    assert replay["execution_type"] == "delayed" and replay["message"].startswith("Operation key already used")
    assert await table_rows(runtime) == before  # a replay writes nothing, not even an audit row
    err = await unchanged(
        runtime,
        owner,
        "execute-workflow",
        {"wait_seconds": 0, "workflow": {"steps": [echo_step(a=2)]}, "operation_key": "op-1"},
        "operation_key_conflict",
    )
    assert err["data"]["existing_job_id"] == first["job_id"]
    # keys are per user
    async with connect(runtime, USER2) as other:
        theirs = await call(other, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO, "operation_key": "op-1"})
        assert theirs["replayed"] is False and theirs["job_id"] != first["job_id"]
        assert (await job_row(runtime, theirs["job_id"])).idempotency_key == "client:2:op-1"


async def test_invalid_workflow_lists_every_problem(runtime, owner):
    workflow = {
        "steps": [
            {"step_type": "teleport"},
            {"step_type": "fetch", "handler_slug": "files", "handler_config": {"directory": "/tmp"}},
            {"step_type": "fetch", "handler_slugs": ["files", "rss"]},
            {"step_type": "publish"},
            {"step_type": "publish", "handler_slugs": ["webhook"], "handler_configs": {"webhook": {}}},
        ]
    }
    err = await unchanged(
        runtime, owner, "execute-workflow", {"wait_seconds": 0, "workflow": workflow}, "invalid_workflow"
    )
    messages = [e["message"] for e in err["data"]["errors"]]
    assert "Step 0 has unknown step_type 'teleport'" in messages
    assert "Step 1 uses unsupported legacy field handler_slug; use handler_slugs and handler_configs" in messages
    assert "Step 1 uses unsupported legacy field handler_config; use handler_slugs and handler_configs" in messages
    assert "Step 2 (fetch) requires exactly one handler" in messages
    assert "Step 3 requires at least one handler" in messages
    assert any(e["step"] == 4 and "url" in e["message"] for e in err["data"]["errors"])
    assert {e["step"] for e in err["data"]["errors"]} == {0, 1, 2, 3, 4}
    err = await unchanged(
        runtime,
        owner,
        "execute-workflow",
        {"wait_seconds": 0, "workflow": {"steps": [{"step_type": "fetch", "handler_slugs": ["ftp"]}]}},
        "handler_not_found",
    )
    assert err["data"]["handler_slug"] == "ftp"
    outside = {
        "steps": [
            {"step_type": "fetch", "handler_slugs": ["files"], "handler_configs": {"files": {"directory": "/etc"}}}
        ]
    }
    # a workflow whose only problem is a handler's config: the flow tools' invalid_handler_config
    for tool, args in (
        ("execute-workflow", {"wait_seconds": 0, "workflow": outside}),
        ("create-pipeline", {"pipeline_name": "P", "workflow": outside}),
    ):
        err = await unchanged(runtime, owner, tool, args, "invalid_handler_config")
        assert err["message"].startswith("Step 0: Invalid config for handler 'files': ")
        assert "files_allowed_roots" in err["message"] and ".." not in err["message"]
        assert err["data"]["handler_slug"] == "files" and err["data"]["step"] == 0
    rss = {"steps": [{"step_type": "fetch", "handler_slugs": ["rss"], "handler_configs": {"rss": {}}}]}
    err = await unchanged(
        runtime, owner, "create-pipeline", {"pipeline_name": "P", "workflow": rss}, "invalid_handler_config"
    )
    assert err["message"] == "Step 0: Invalid config for handler 'rss': missing required fields: feed_url."


async def test_schema_errors_name_the_path(runtime, owner):
    many = {"steps": [echo_step()] * 51}
    for args, field in (
        ({"workflow": "steps"}, "workflow"),
        ({"workflow": {}}, "workflow.steps"),
        ({"workflow": {"steps": []}}, "workflow.steps"),
        ({"workflow": many}, "workflow.steps"),
        ({"workflow": {"steps": ["fetch"]}}, "workflow.steps.0"),
        ({"workflow": {"steps": [echo_step(), echo_step(), {"label": "x"}]}}, "workflow.steps.2.step_type"),
        ({"workflow": {"steps": [{"step_type": "ai", "colour": 1}]}}, "workflow.steps.0.colour"),
        ({"workflow": {"steps": [{"step_type": 5}]}}, "workflow.steps.0.step_type"),
        ({"workflow": ECHO, "wait_seconds": 301}, "wait_seconds"),
        ({"workflow": ECHO, "timestamp": 0}, "timestamp"),
        ({"workflow": ECHO, "operation_key": ""}, "operation_key"),
        ({"workflow": ECHO, "operation_key": "k" * 192}, "operation_key"),
        ({"workflow": ECHO, "agent_id": 0}, "agent_id"),
        ({"workflow": ECHO, "initial_data": []}, "initial_data"),
        ({}, "workflow"),
    ):
        err = await unchanged(runtime, owner, "execute-workflow", args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field, (args, err["data"]["errors"])


async def test_secret_handler_fields_are_encrypted(runtime, owner):
    workflow = {
        "steps": [
            echo_step(),
            {
                "step_type": "publish",
                "handler_slugs": ["webhook"],
                "handler_configs": {"webhook": {"url": "https://hooks.example.com/in", "secret": "hush-hush-123"}},
            },
        ]
    }
    out = await execute(owner, workflow, operation_key="secretive")
    raw = str(await table_rows(runtime))
    assert "hush-hush-123" not in raw
    row = await job_row(runtime, out["job_id"])
    stored = row.engine_data["flow_config"]["ephemeral_step_1"]["handler_configs"]["webhook"]["secret"]
    assert set(stored) == {"__encrypted__"}
    assert runtime.box.decrypt(stored, "handler:webhook.secret") == "hush-hush-123"
    shown = (await call(owner, "get-jobs", {"job_id": out["job_id"]}))["jobs"][0]["engine_data"]
    assert shown["flow_config"]["ephemeral_step_1"]["handler_configs"]["webhook"]["secret"] == "********"


async def test_owner_agent_and_roles(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    await grant(owner, bot, 3, "operator")
    async with connect(runtime, USER3) as operator:
        out = await call(operator, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO, "agent_id": bot})
        job = (await call(operator, "get-jobs", {"job_id": out["job_id"]}))["jobs"][0]
        assert (job["agent_id"], job["user_id"]) == (bot, 3)
        assert job["engine_data"]["job"]["agent_slug"] == "bot"
        own = await call(operator, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO})
        assert (await job_row(runtime, own["job_id"])).agent_id is None
    async with connect(runtime, USER2) as viewer:
        err = await denied(runtime, viewer, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO, "agent_id": bot})
        assert err["data"]["required_role"] == "operator"
        # without an agent the job is the caller's own
        mine = await call(viewer, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO})
        assert (await job_row(runtime, mine["job_id"])).user_id == 2
    await unchanged(
        runtime, owner, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO, "agent_id": 99}, "agent_not_found"
    )
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    await unchanged(
        runtime, owner, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO, "agent_id": bot}, "agent_inactive"
    )


async def test_agent_bound_token_defaults_to_its_agent(runtime, owner):
    from tests.conftest import as_token

    bot = await make_agent(owner)
    principal = await as_token(runtime, user_id=1, agent_slug="bot")
    async with connect(runtime, principal) as bound:
        out = await call(bound, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO})
    assert (await job_row(runtime, out["job_id"])).agent_id == bot
    read_only = await as_token(runtime, user_id=1, agent_slug="bot", capabilities=["read"])
    async with connect(runtime, read_only) as reader:
        await fail(reader, "execute-workflow", {"wait_seconds": 0, "workflow": ECHO}, "permission_denied")
