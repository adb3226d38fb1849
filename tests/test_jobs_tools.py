"""get-jobs, get-jobs-summary, wait-for-job, get-flow-health, get-problem-flows and get-run-metrics."""

from __future__ import annotations

import pytest

from datamachine_mcp.engine.host import EngineHost
from tests import jobs_support
from tests.conftest import call, connect, table_rows
from tests.jobs_support import (
    USER2,
    USER3,
    approval_step,
    denied,
    dirs,
    echo_step,
    fetch_step,
    files_flow,
    grant,
    make_agent,
    make_flow,
    publish_step,
    run,
    sql,
    unchanged,
    wait_job,
    write_items,
)

pytestmark = pytest.mark.anyio
engine = jobs_support.engine  # fixture

JOB_KEYS = {
    "job_id",
    "pipeline_id",
    "flow_id",
    "pipeline_name",
    "flow_name",
    "source",
    "label",
    "parent_job_id",
    "user_id",
    "agent_id",
    "run_trigger",
    "status",
    "base_status",
    "status_reason",
    "current_step_id",
    "attempts",
    "max_attempts",
    "run_at",
    "handler_slug",
    "created_at",
    "started_at",
    "completed_at",
    "updated_at",
    "error",
    "wait",
    "child_counts",
}


async def ids(client, **filters) -> list[int]:
    return [j["job_id"] for j in (await call(client, "get-jobs", filters))["jobs"]]


# --- get-jobs -----------------------------------------------------------------------------------


async def test_get_single_job_with_engine_data_and_packets(runtime, owner):
    made = await files_flow(owner, runtime, name="News")
    job_id = (await run(owner, made["flow_id"], initial_data={"topic": "x"}))["job_id"]
    out = await call(owner, "get-jobs", {"job_id": job_id, "status": "failed"})  # filters are ignored
    assert out["total"] == 1 and out["filters_applied"] == {"job_id": job_id}
    job = out["jobs"][0]
    assert set(job) == JOB_KEYS | {"engine_data", "packets"}
    assert job["pipeline_id"] == made["pipeline_id"] and job["flow_id"] == made["flow_id"]
    assert job["pipeline_name"] == "News" and job["flow_name"] == "News" and job["label"] == "News"
    assert (job["status"], job["base_status"], job["status_reason"]) == ("pending", "pending", None)
    assert job["source"] == "pipeline" and job["run_trigger"] == "manual" and job["handler_slug"] == "files"
    assert job["current_step_id"] == made["flow_step_ids"][0] and job["packets"] == []
    assert job["error"] is None and job["wait"] is None and job["child_counts"] is None
    assert job["engine_data"]["topic"] == "x" and job["engine_data"]["job"]["job_id"] == job_id
    # an unknown id is job_not_found, like every tool that takes a job_id
    err = await unchanged(runtime, owner, "get-jobs", {"job_id": 999}, "job_not_found")
    assert err["data"] == {"job_id": 999}


async def test_get_jobs_single_job_access(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    async with connect(runtime, USER2) as viewer:
        assert (await call(viewer, "get-jobs", {"job_id": job_id}))["total"] == 1
    async with connect(runtime, USER3) as stranger:
        err = await denied(runtime, stranger, "get-jobs", {"job_id": job_id})
        assert err["data"]["required_role"] == "viewer"
        assert (await call(stranger, "get-jobs", {}))["total"] == 0  # lists are filtered, not refused


async def test_get_jobs_filters(runtime, owner):
    bot = await make_agent(owner)
    a = await files_flow(owner, runtime, name="A")
    b = await files_flow(owner, runtime, name="B", agent_id=bot)
    ja1 = (await run(owner, a["flow_id"]))["job_id"]
    ja2 = (await run(owner, a["flow_id"]))["job_id"]
    jb = (await run(owner, b["flow_id"]))["job_id"]
    direct = (
        await call(
            owner,
            "execute-workflow",
            {"wait_seconds": 0, "workflow": {"steps": [echo_step()]}, "initial_data": {"job_source": "chat"}},
        )
    )["job_id"]
    await call(owner, "fail-job", {"job_id": ja1})
    assert await ids(owner) == [direct, jb, ja2, ja1]
    assert await ids(owner, flow_id=a["flow_id"]) == [ja2, ja1]
    assert await ids(owner, pipeline_id=b["pipeline_id"]) == [jb]
    assert await ids(owner, flow_id="direct") == [direct]
    assert await ids(owner, pipeline_id="direct") == [direct]
    assert await ids(owner, agent_id=bot) == [jb]
    assert await ids(owner, user_id=1) == [direct, jb, ja2, ja1]
    assert await ids(owner, user_id=0) == []
    assert await ids(owner, status="failed") == [ja1]
    assert await ids(owner, source="chat") == [direct]
    assert await ids(owner, run_trigger="workflow") == [direct]
    assert await ids(owner, run_trigger="manual", handler="files") == [jb, ja2, ja1]
    assert await ids(owner, since="2000-01-01 00:00:00") == [direct, jb, ja2, ja1]
    assert await ids(owner, since="2999-01-01T00:00:00Z") == []
    out = await call(owner, "get-jobs", {"flow_id": a["flow_id"], "status": "pending", "hide_children": True})
    assert out["filters_applied"] == {"flow_id": a["flow_id"], "status": "pending", "hide_children": True}
    assert "metadata_scan_truncated" not in out
    # agent_id wins over user_id
    assert (await call(owner, "get-jobs", {"agent_id": bot, "user_id": 5}))["filters_applied"] == {"agent_id": bot}
    await unchanged(runtime, owner, "get-jobs", {"agent_id": 99}, "agent_not_found")


async def test_get_jobs_children_and_scope(runtime, owner, engine):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha", "beta")
    made = await make_flow(owner, [fetch_step(inbox, 2), publish_step(outbox)], agent_id=bot)
    parent = (await run(owner, made["flow_id"], wait=15))["job"]
    assert parent["child_counts"] == {"total": 2, "completed": 2}
    children = await ids(owner, parent_job_id=parent["job_id"])
    assert len(children) == 2
    assert await ids(owner, hide_children=True) == [parent["job_id"]]
    own = (await call(owner, "execute-workflow", {"wait_seconds": 0, "workflow": {"steps": [echo_step()]}}))["job_id"]
    async with connect(runtime, USER2) as viewer:
        listed = await call(viewer, "get-jobs", {})
        assert listed["total"] == 3 and own not in [j["job_id"] for j in listed["jobs"]]
        await denied(runtime, viewer, "get-jobs", {"user_id": 1}, "permission_denied")
        assert (await call(viewer, "get-jobs", {"user_id": 2}))["total"] == 0
    async with connect(runtime, USER3) as stranger:
        await denied(runtime, stranger, "get-jobs", {"agent_id": bot})


async def test_get_jobs_order_and_paging(runtime, owner):
    made = await files_flow(owner, runtime)
    jobs = [(await run(owner, made["flow_id"]))["job_id"] for _ in range(4)]
    await call(owner, "cancel-job", {"job_id": jobs[2]})
    await call(owner, "fail-job", {"job_id": jobs[0]})
    assert await ids(owner, order="ASC") == jobs
    # completed_at: NULLs last in both directions, job_id breaks ties
    assert await ids(owner, orderby="completed_at", order="ASC") == [jobs[2], jobs[0], jobs[1], jobs[3]]
    assert await ids(owner, orderby="completed_at", order="DESC") == [jobs[0], jobs[2], jobs[3], jobs[1]]
    assert await ids(owner, orderby="status", order="ASC") == [jobs[2], jobs[0], jobs[1], jobs[3]]
    page = await call(owner, "get-jobs", {"per_page": 2, "offset": 1})
    assert [j["job_id"] for j in page["jobs"]] == [jobs[2], jobs[1]]
    assert (page["total"], page["per_page"], page["offset"]) == (4, 2, 1)
    row = page["jobs"][0]
    assert "engine_data" not in row and "packets" not in row
    with_data = (await call(owner, "get-jobs", {"per_page": 1, "include_engine_data": True}))["jobs"][0]
    assert with_data["engine_data"]["flow"]["flow_id"] == made["flow_id"] and "packets" not in with_data


async def test_get_jobs_metadata_filters(runtime, owner):
    made = await files_flow(owner, runtime)
    tagged = [
        (await run(owner, made["flow_id"], initial_data={"campaign": {"name": "spring", "n": i}}))["job_id"]
        for i in range(3)
    ]
    other = (await run(owner, made["flow_id"], initial_data={"campaign": {"name": "autumn"}}))["job_id"]
    out = await call(owner, "get-jobs", {"metadata": {"campaign.name": "spring"}})
    assert [j["job_id"] for j in out["jobs"]] == tagged[::-1]
    assert out["total"] == 3 and out["metadata_scan_truncated"] is False
    assert out["filters_applied"]["metadata"] == {"campaign.name": "spring"}
    assert await ids(owner, metadata={"campaign.name": "spring", "campaign.n": 1}) == [tagged[1]]
    assert await ids(owner, metadata={"job.trigger": "manual", "flow.flow_id": made["flow_id"]}) == [
        other,
        *tagged[::-1],
    ]
    assert await ids(owner, metadata={"campaign.missing": None}) == []
    # only the newest candidates are scanned; total counts within the scan
    scanned = await call(owner, "get-jobs", {"metadata": {"campaign.name": "spring"}, "metadata_scan_limit": 2})
    assert scanned["metadata_scan_truncated"] is True and scanned["total"] == 1
    assert [j["job_id"] for j in scanned["jobs"]] == [tagged[2]]
    paged = await call(
        owner, "get-jobs", {"metadata": {"campaign.name": "spring"}, "order": "ASC", "per_page": 1, "offset": 1}
    )
    assert [j["job_id"] for j in paged["jobs"]] == [tagged[1]] and paged["total"] == 3


async def test_get_jobs_redacts_secrets(runtime, owner):
    webhook = {
        "step_type": "publish",
        "handler_slugs": ["webhook"],
        "handler_configs": {"webhook": {"url": "https://hooks.example.com/x", "secret": "s3cret-value"}},
    }
    made = await make_flow(owner, [echo_step(), webhook])
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    job = (await call(owner, "get-jobs", {"job_id": job_id}))["jobs"][0]
    stored = job["engine_data"]["flow_config"][made["flow_step_ids"][1]]["handler_configs"]["webhook"]
    assert stored["secret"] == "********"
    listed = (await call(owner, "get-jobs", {"include_engine_data": True}))["jobs"][0]
    assert "s3cret-value" not in str(listed)
    # a metadata filter cannot probe a secret either
    assert await ids(
        owner, metadata={f"flow_config.{made['flow_step_ids'][1]}.handler_configs.webhook.secret": "********"}
    ) == [job_id]


async def test_get_jobs_invalid_input(runtime, owner):
    for args, field in (
        ({"per_page": 101}, "per_page"),
        ({"per_page": 0}, "per_page"),
        ({"offset": -1}, "offset"),
        ({"orderby": "label"}, "orderby"),
        ({"order": "desc"}, "order"),
        ({"metadata_scan_limit": 5001}, "metadata_scan_limit"),
        ({"status": "done"}, "status"),
        ({"run_trigger": "cron"}, "run_trigger"),
        ({"since": "yesterday"}, "since"),
        ({"flow_id": "flow"}, "flow_id"),
        ({"flow_id": 0}, "flow_id"),
        ({"user_id": -1}, "user_id"),
        ({"source": "s" * 51}, "source"),
        ({"metadata": ["a"]}, "metadata"),
        ({"colour": "red"}, "colour"),
    ):
        err = await unchanged(runtime, owner, "get-jobs", args, "invalid_input")
        assert err["data"]["errors"][0]["field"].split(".")[0] == field, (args, err)


# --- get-jobs-summary ---------------------------------------------------------------------------


async def test_jobs_summary_counts_and_breakdowns(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    a = await files_flow(owner, runtime, name="A")
    b = await files_flow(owner, runtime, name="B", agent_id=bot)
    for _ in range(3):
        await run(owner, a["flow_id"])
    jb = (await run(owner, b["flow_id"]))["job_id"]
    await call(owner, "cancel-job", {"job_id": jb})
    await call(owner, "execute-workflow", {"wait_seconds": 0, "workflow": {"steps": [echo_step()]}})
    out = await call(owner, "get-jobs-summary", {})
    assert out["summary"] == {
        "pending": 4,
        "processing": 0,
        "waiting": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
        "completed_no_items": 0,
        "agent_skipped": 0,
    }
    assert out["total"] == 5
    assert [(r["pipeline_id"], r["pipeline_name"], r["counts"]["total"]) for r in out["by_pipeline"]] == [
        (a["pipeline_id"], "A", 3),
        (b["pipeline_id"], "B", 1),
        ("direct", None, 1),
    ]
    assert out["by_flow"][0]["flow_name"] == "A" and out["by_flow"][0]["counts"]["pending"] == 3
    assert out["by_flow"][1]["counts"]["cancelled"] == 1
    assert [(r["handler"], r["counts"]["total"]) for r in out["by_handler"]] == [("files", 4)]
    compact = await call(owner, "get-jobs-summary", {"compact": True, "flow_id": a["flow_id"]})
    assert set(compact) == {"summary", "total"} and compact["total"] == 3
    assert (await call(owner, "get-jobs-summary", {"status": "cancelled"}))["total"] == 1
    assert (await call(owner, "get-jobs-summary", {"pipeline_id": "direct"}))["total"] == 1
    assert (await call(owner, "get-jobs-summary", {"handler": "rss"}))["total"] == 0
    assert (await call(owner, "get-jobs-summary", {"since": "2999-01-01T00:00:00Z"}))["total"] == 0
    async with connect(runtime, USER2) as viewer:
        scoped = await call(viewer, "get-jobs-summary", {})
        assert scoped["total"] == 1 and scoped["summary"]["cancelled"] == 1
    async with connect(runtime, USER3) as stranger:
        await denied(runtime, stranger, "get-jobs-summary", {"agent_id": bot})
    for args in ({"status": "x"}, {"compact": 1}, {"source": "s" * 51}, {"per_page": 5}):
        await unchanged(runtime, owner, "get-jobs-summary", args, "invalid_input")


# --- wait-for-job -------------------------------------------------------------------------------


async def test_wait_for_job_returns_results_with_progress(runtime, owner, engine):
    made = await make_flow(owner, [echo_step(a=1), echo_step(b=2)])
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    result = await owner.call_tool(
        "wait-for-job", {"job_id": job_id, "timeout_seconds": 10}, progress_callback=on_progress
    )
    out = result.structured_content
    assert out["final"] is True and out["timed_out"] is False and out["waited_seconds"] >= 0
    assert out["job"]["status"] == "completed" and out["job"]["packets"][0]["data"]["result"] == {"b": 2}
    assert "engine_data" not in out["job"]
    assert progress and progress[-1][0] == progress[-1][1] == 2
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)  # never decreasing
    assert progress[-1][2].startswith("completed — step")
    # already final: returns at once; include_engine_data adds the redacted engine data
    again = await call(owner, "wait-for-job", {"job_id": job_id, "timeout_seconds": 0, "include_engine_data": True})
    assert again["final"] is True and again["timed_out"] is False
    assert again["job"]["engine_data"]["step_results"]


async def test_wait_for_job_timeouts_and_gates(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha")
    made = await make_flow(owner, [fetch_step(inbox), approval_step(), publish_step(outbox)])
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    parked = await wait_job(owner, job_id, stop_on_waiting=True)
    assert parked["final"] is False and parked["timed_out"] is False
    assert parked["job"]["wait"]["kind"] == "approval" and parked["job"]["wait"]["action_id"].startswith("pa_")
    assert [p["data"]["title"] for p in parked["job"]["packets"]] == ["Alpha"]
    short = await wait_job(owner, job_id, 0.3)
    assert short["final"] is False and short["timed_out"] is True and short["waited_seconds"] >= 0.3
    now = await wait_job(owner, job_id, 0)
    assert now["timed_out"] is True and now["job"]["base_status"] == "waiting"


async def test_wait_for_job_access_and_errors(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    async with connect(runtime, USER2) as viewer:
        out = await call(viewer, "wait-for-job", {"job_id": job_id, "timeout_seconds": 0})
        assert out["job"]["job_id"] == job_id and out["timed_out"] is True
    async with connect(runtime, USER3) as stranger:
        await denied(runtime, stranger, "wait-for-job", {"job_id": job_id, "timeout_seconds": 0})
    await unchanged(runtime, owner, "wait-for-job", {"job_id": 999}, "job_not_found")
    for args, field in (
        ({"job_id": job_id, "timeout_seconds": 301}, "timeout_seconds"),
        ({"job_id": job_id, "timeout_seconds": -1}, "timeout_seconds"),
        ({"timeout_seconds": 1}, "job_id"),
        ({"job_id": job_id, "stop_on_waiting": "yes"}, "stop_on_waiting"),
    ):
        err = await unchanged(runtime, owner, "wait-for-job", args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field


# --- get-flow-health / get-problem-flows --------------------------------------------------------


async def test_flow_health_and_problem_flows(runtime, owner, engine):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    inbox, outbox = dirs(runtime)
    idle = await make_flow(owner, [fetch_step(inbox), publish_step(outbox)], name="Idle", agent_id=bot)
    failing = await files_flow(owner, runtime, name="Failing")
    healthy = await files_flow(owner, runtime, name="Healthy")
    fresh = await call(owner, "get-flow-health", {"flow_id": healthy["flow_id"]})
    assert fresh == {
        "flow_id": healthy["flow_id"],
        "consecutive_failures": 0,
        "consecutive_no_items": 0,
        "latest_job": None,
        "threshold": 3,
        "health": "ok",
    }
    for _ in range(2):
        assert (await run(owner, idle["flow_id"], wait=10))["job"]["status"] == "completed_no_items"
    for _ in range(3):
        await call(owner, "fail-job", {"job_id": (await run(owner, failing["flow_id"]))["job_id"]})
    health = await call(owner, "get-flow-health", {"flow_id": failing["flow_id"]})
    assert health["consecutive_failures"] == 3 and health["health"] == "failing"
    assert health["latest_job"]["status"] == "failed - manual" and health["latest_job"]["completed_at"]
    idle_health = await call(owner, "get-flow-health", {"flow_id": idle["flow_id"]})
    assert (idle_health["consecutive_no_items"], idle_health["health"]) == (2, "ok")
    out = await call(owner, "get-problem-flows", {})
    assert [f["flow_id"] for f in out["failing"]] == [failing["flow_id"]] and out["idle"] == []
    assert out["count"] == 1 and out["threshold"] == 3
    assert out["failing"][0]["latest_job"]["job_id"] == health["latest_job"]["job_id"]
    low = await call(owner, "get-problem-flows", {"threshold": 2})
    assert [f["flow_id"] for f in low["idle"]] == [idle["flow_id"]] and low["count"] == 2
    assert low["idle"][0]["consecutive_no_items"] == 2 and low["idle"][0]["flow_name"] == "Idle"
    assert (await call(owner, "get-problem-flows", {"threshold": 2, "agent_id": bot}))["count"] == 1
    async with connect(runtime, USER2) as viewer:
        scoped = await call(viewer, "get-problem-flows", {"threshold": 1})
        assert scoped["count"] == 1 and scoped["failing"] == []
        assert (await call(viewer, "get-flow-health", {"flow_id": idle["flow_id"]}))["health"] == "ok"
        await denied(runtime, viewer, "get-flow-health", {"flow_id": failing["flow_id"]})
    async with connect(runtime, USER3) as stranger:
        await denied(runtime, stranger, "get-problem-flows", {"agent_id": bot})
    await unchanged(runtime, owner, "get-flow-health", {"flow_id": 999}, "flow_not_found")
    await unchanged(runtime, owner, "get-flow-health", {}, "invalid_input")
    await unchanged(runtime, owner, "get-problem-flows", {"threshold": 0}, "invalid_input")
    await unchanged(runtime, owner, "get-problem-flows", {"agent_id": 99}, "agent_not_found")
    # a successful run resets the counters
    write_items(inbox, "alpha")
    assert (await run(owner, idle["flow_id"], wait=10))["job"]["status"] == "completed"
    assert (await call(owner, "get-flow-health", {"flow_id": idle["flow_id"]}))["consecutive_no_items"] == 0


# --- get-run-metrics ----------------------------------------------------------------------------


async def test_run_metrics_of_a_finished_batch(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    write_items(inbox, "alpha", "beta")
    made = await make_flow(owner, [fetch_step(inbox, 2), publish_step(outbox)])
    parent = (await run(owner, made["flow_id"], wait=15))["job"]
    metrics = (await call(owner, "get-run-metrics", {"job_id": parent["job_id"]}))["metrics"]
    assert metrics["status"] == "completed" and metrics["run_trigger"] == "manual"
    assert metrics["flow_id"] == made["flow_id"] and metrics["parent_job_id"] is None
    assert metrics["child_jobs"] == {"total": 2, "completed": 2}
    assert metrics["batch_results"] == {"completed": 2, "failed": 0, "skipped": 0, "cancelled": 0, "total": 2}
    assert metrics["fetch_stages"]["final_packets"] == 2 and metrics["fetch_stages"]["source_items"] == 2
    assert [r["flow_step_id"] for r in metrics["step_results"]] == [made["flow_step_ids"][0]]
    assert metrics["steps_run"] == 1 and metrics["retries"] == 0
    assert metrics["token_usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert metrics["timestamps"]["completed_at"] is not None and metrics["duration_ms"] >= 0
    child = (await call(owner, "get-jobs", {"parent_job_id": parent["job_id"]}))["jobs"][0]
    child_metrics = (await call(owner, "get-run-metrics", {"job_id": child["job_id"]}))["metrics"]
    assert child_metrics["items_processed"] == 1 and child_metrics["steps_run"] == 1
    assert child_metrics["parent_job_id"] == parent["job_id"] and "batch_results" not in child_metrics
    assert "fetch_stages" not in child_metrics and child_metrics["child_jobs"] == {"total": 0}


async def test_run_metrics_of_an_active_job_and_errors(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    await sql(
        runtime,
        "UPDATE datamachine_jobs SET engine_data = json_set(engine_data, '$.retry', json('{\"total_retries\": 2}'), "
        '\'$.token_usage\', json(\'{"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}\')) '
        "WHERE job_id = :j",
        j=job_id,
    )
    async with connect(runtime, USER2) as viewer:
        metrics = (await call(viewer, "get-run-metrics", {"job_id": job_id}))["metrics"]
    assert metrics["status"] == "pending" and metrics["steps_run"] == 0 and metrics["items_processed"] == 0
    assert metrics["retries"] == 2 and metrics["token_usage"]["total_tokens"] == 12
    assert metrics["timestamps"]["started_at"] is None and metrics["step_results"] == []
    async with connect(runtime, USER3) as stranger:
        await denied(runtime, stranger, "get-run-metrics", {"job_id": job_id})
    await unchanged(runtime, owner, "get-run-metrics", {"job_id": 999}, "job_not_found")
    await unchanged(runtime, owner, "get-run-metrics", {"job_id": "1.0"}, "invalid_input")
    before = await table_rows(runtime)
    await call(owner, "get-run-metrics", {"job_id": job_id})
    assert await table_rows(runtime) == before


# --- run-flow idempotency and automatic retries seen through the job tools ------------------------


async def test_run_flow_idempotency_key_replay_and_conflict(runtime, owner):
    made = await files_flow(owner, runtime)
    first = await run(owner, made["flow_id"], idempotency_key="nightly-1", initial_data={"n": 1})
    before = await table_rows(runtime)
    replay = await run(owner, made["flow_id"], idempotency_key="nightly-1", initial_data={"n": 1})
    assert replay["replayed"] is True and replay["job_id"] == first["job_id"]
    assert await table_rows(runtime) == before
    err = await unchanged(
        runtime,
        owner,
        "run-flow",
        {"wait_seconds": 0, "flow_id": made["flow_id"], "idempotency_key": "nightly-1", "initial_data": {"n": 2}},
        "idempotency_key_conflict",
    )
    assert err["data"]["existing_job_id"] == first["job_id"]
    async with connect(runtime, USER2) as other:
        # another user's key space: the flow is not theirs, so the call is refused, not replayed
        await denied(
            runtime, other, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"], "idempotency_key": "nightly-1"}
        )


async def test_automatic_retries_show_in_metrics(runtime, owner, engine):
    from tests.fake_servers import FakeResponse, serve
    from tests.jobs_support import settings

    await settings(owner, retry_base_seconds=1, retry_transport_base_seconds=1)
    rss = (
        '<?xml version="1.0"?><rss version="2.0"><channel><title>T</title><item><title>One</title>'
        "<link>https://example.com/1</link><guid>g-1</guid></item></channel></rss>"
    )
    _, outbox = dirs(runtime)
    with serve() as server:
        feed = server.script(
            "/feed.xml",
            FakeResponse(503, "busy"),
            FakeResponse(503, "busy"),
            FakeResponse(200, rss, {"Content-Type": "application/rss+xml"}),
        )
        steps = [
            {"step_type": "fetch", "handler_slugs": ["rss"], "handler_configs": {"rss": {"feed_url": feed}}},
            publish_step(outbox),
        ]
        made = await make_flow(owner, steps)
        done = await run(owner, made["flow_id"], wait=20)
    assert done["job"]["status"] == "completed"
    metrics = (await call(owner, "get-run-metrics", {"job_id": done["job_id"]}))["metrics"]
    assert metrics["retries"] == 2 and metrics["items_processed"] == 1 and metrics["steps_run"] == 2
    engine_data = (await call(owner, "get-jobs", {"job_id": done["job_id"]}))["jobs"][0]["engine_data"]
    assert [h["delay_seconds"] for h in engine_data["retry"]["history"]] == [1, 2]


async def test_a_pending_retry_is_not_progress_and_the_answer_says_when_it_runs(runtime, owner, engine):
    """A failed attempt does not count as a finished step: progress stays below it, and both the
    progress message and the follow-up say which error is retried, which attempt and when."""
    from tests.fake_servers import FakeResponse, serve
    from tests.jobs_support import settings

    await settings(owner, retry_base_seconds=600, retry_transport_base_seconds=600)
    _, outbox = dirs(runtime)
    with serve() as server:
        feed = server.script("/feed.xml", FakeResponse(503, "busy"))
        steps = [
            {"step_type": "fetch", "handler_slugs": ["rss"], "handler_configs": {"rss": {"feed_url": feed}}},
            publish_step(outbox),
        ]
        made = await make_flow(owner, steps)
        progress: list[tuple[float, float | None, str | None]] = []

        async def on_progress(value, total, message):
            progress.append((value, total, message))

        result = await owner.call_tool(
            "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 4}, progress_callback=on_progress
        )
    out = result.structured_content
    assert out["final"] is False and out["job"]["base_status"] == "pending", out
    assert progress and all(value < 1 for value, _, _ in progress), progress
    retrying = "retrying after http_upstream_error (attempt 1/3, next at "
    assert retrying in progress[-1][2], progress[-1]
    assert retrying in out["follow_up"] and "keeps running" not in out["follow_up"], out["follow_up"]


async def test_resume_url_is_masked_below_operator(runtime, owner, engine):
    runtime.public_base_url = "https://dm.example.com"
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    gate = {"step_type": "webhook_gate", "flow_step_settings": {"description": "Wait for CI"}}
    started = await call(
        owner, "execute-workflow", {"wait_seconds": 0, "workflow": {"steps": [gate, echo_step()]}, "agent_id": bot}
    )
    parked = await wait_job(owner, started["job_id"], stop_on_waiting=True)
    wait = parked["job"]["wait"]
    assert wait["kind"] == "webhook_gate" and wait["resume_url"].startswith("https://dm.example.com/webhooks/gates/")
    token = wait["resume_url"].rsplit("/", 1)[1]
    detail = (await call(owner, "get-jobs", {"job_id": started["job_id"]}))["jobs"][0]
    assert detail["wait"]["resume_url"] == wait["resume_url"]
    assert detail["engine_data"]["webhook_gate"]["token"] == "********" and token not in str(detail["engine_data"])
    async with connect(runtime, USER2) as viewer:
        seen = (await call(viewer, "get-jobs", {"job_id": started["job_id"]}))["jobs"][0]
        assert seen["wait"]["resume_url"] == "********"
        listed = (await call(viewer, "get-jobs", {"include_engine_data": True}))["jobs"][0]
        assert listed["wait"]["resume_url"] == "********" and token not in str(listed)


@pytest.mark.backends
async def test_a_wait_with_no_worker_running_says_so_instead_of_it_keeps_running(runtime, owner):
    made = await make_flow(owner, [echo_step()])
    idle = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 0.5})
    assert idle["status"] == "pending" and idle["final"] is False
    assert "no worker has run in the last 60 s" in idle["follow_up"], idle["follow_up"]
    assert "datamachine-mcp worker" in idle["follow_up"] and "keeps running" not in idle["follow_up"]
    # once a worker has run (its heartbeat is recent), a pending job is just not claimed yet
    host = EngineHost(runtime.engine, concurrency=1, poll_seconds=0.1)
    await host.start()
    await jobs_support.wait_job(owner, idle["job_id"])
    await host.stop(grace=5)
    later = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 0.5})
    assert later["status"] == "pending" and "keeps running" in later["follow_up"], later["follow_up"]
