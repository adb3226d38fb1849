"""Processed-items toolset: the dedup ledger (docs/engine.md, Dedup and claims)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.pipeline_common import build_pipeline_step, sync_flow_config
from datamachine_mcp.engine import dedup
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline, ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call, connect, count, fail, log_rows, table_rows

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

USER2 = Principal(user_id=2, transport="http")
RSS = {"step_type": "fetch", "handler_slug": "rss", "handler_config": {"feed_url": "https://example.com/feed"}}
AI = {"step_type": "ai"}


async def seed_pipeline(runtime, *, agent_slug: str | None = None, flows: int = 1, user_id: int = 1) -> dict[str, Any]:
    """A pipeline (fetch + ai) with ``flows`` flows, written directly; returns ids and fetch flow step ids."""
    now = utcnow()
    async with runtime.db.write() as s:
        agent_id = None
        if agent_slug is not None:
            agent_id = (await s.execute(select(Agent.agent_id).where(Agent.agent_slug == agent_slug))).scalar_one()
        pipeline = Pipeline(
            user_id=user_id, agent_id=agent_id, pipeline_name="P", pipeline_config={}, created_at=now, updated_at=now
        )
        s.add(pipeline)
        await s.flush()
        steps = [
            build_pipeline_step(pipeline.pipeline_id, seed, i, box=runtime.box, files_roots=None)
            for i, seed in enumerate((RSS, AI))
        ]
        pipeline.pipeline_config = {st["pipeline_step_id"]: st for st in steps}
        out: dict[str, Any] = {"pipeline_id": pipeline.pipeline_id, "flow_ids": [], "fsids": [], "agent_id": agent_id}
        for _ in range(flows):
            flow = Flow(
                pipeline_id=pipeline.pipeline_id,
                user_id=user_id,
                agent_id=agent_id,
                flow_name="F",
                flow_config={},
                scheduling_config={"interval": "manual"},
                created_at=now,
                updated_at=now,
            )
            s.add(flow)
            await s.flush()
            flow.flow_config = sync_flow_config(
                {}, pipeline.pipeline_config, flow_id=flow.flow_id, pipeline_id=pipeline.pipeline_id
            )
            out["flow_ids"].append(flow.flow_id)
            out["fsids"].append(f"{steps[0]['pipeline_step_id']}_{flow.flow_id}")
    out["flow_id"], out["fsid"] = out["flow_ids"][0], out["fsids"][0]
    return out


async def add_job(runtime, seeded: dict[str, Any], status: str = "processing", flow_index: int = 0) -> int:
    now = utcnow()
    pid, fid = seeded["pipeline_id"], seeded["flow_ids"][flow_index]
    async with runtime.db.write() as s:
        job = Job(
            user_id=1,
            agent_id=seeded["agent_id"],
            pipeline_id=str(pid),
            flow_id=str(fid),
            pipeline_key=pid,
            flow_key=fid,
            status=status,
            created_at=now,
            run_at=now,
            updated_at=now,
        )
        s.add(job)
        await s.flush()
        return job.job_id


async def add_row(runtime, fsid: str, item: str, *, status: str = "processed", job_id=None, age=None, expires=None):
    """A ledger row written directly (claims, or processed rows with a chosen age)."""
    now = utcnow()
    async with runtime.db.write() as s:
        s.add(
            ProcessedItem(
                flow_step_id=fsid,
                source_type="rss",
                item_identifier=item,
                job_id=job_id,
                processed_timestamp=now - (age or timedelta()),
                status=status,
                claim_expires_at=expires,
                flow_key=int(fsid.rsplit("_", 1)[1]),
            )
        )


async def rows(runtime, where: str = "1=1") -> list[dict[str, Any]]:
    async with runtime.db.read() as s:
        result = await s.execute(select(ProcessedItem).order_by(ProcessedItem.id))
        return [
            {
                "fsid": r.flow_step_id,
                "item": r.item_identifier,
                "status": r.status,
                "job_id": r.job_id,
                "expires": r.claim_expires_at,
                "at": r.processed_timestamp,
            }
            for r in result.scalars()
        ]


def item_args(fsid: str, item: str = "guid-1", source: str = "rss", **extra: Any) -> dict[str, Any]:
    return {"flow_step_id": fsid, "source_type": source, "item_identifier": item, **extra}


async def unchanged(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


@pytest.fixture
async def flow(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "bot"})
    return await seed_pipeline(runtime, agent_slug="bot")


# --- mark-processed ---------------------------------------------------------------------------


async def test_mark_processed_is_an_idempotent_upsert(runtime, owner, flow):
    fsid = flow["fsid"]
    first = await call(owner, "mark-processed", item_args(f"  {fsid} ", "  guid-1  ", " rss "))
    assert first == {
        "flow_step_id": fsid,
        "source_type": "rss",
        "item_identifier": "guid-1",
        "job_id": None,
        "processed_at": first["processed_at"],
        "created": True,
    }
    assert first["processed_at"].endswith("Z")
    job = await add_job(runtime, flow)
    again = await call(owner, "mark-processed", item_args(fsid, job_id=job))
    assert again["created"] is False and again["job_id"] == job
    # without job_id the stored job is kept; only the timestamp is refreshed
    third = await call(owner, "mark-processed", item_args(fsid))
    assert third["job_id"] == job and third["created"] is False
    assert [(r["item"], r["status"], r["job_id"]) for r in await rows(runtime)] == [("guid-1", "processed", job)]
    audit = [r for r in await log_rows(runtime) if r["context"].get("ability") == "mark-processed"]
    assert len(audit) == 3
    assert audit[0]["flow_id"] == flow["flow_id"] and audit[0]["agent_id"] == flow["agent_id"]
    assert audit[0]["context"]["target"] == {"type": "flow_step", "id": fsid}


async def test_mark_processed_normalises_long_identifiers(runtime, owner, flow):
    long_id = "https://example.com/" + "x" * 300
    out = await call(owner, "mark-processed", item_args(flow["fsid"], long_id))
    digest = hashlib.sha256(long_id.encode()).hexdigest()
    assert out["item_identifier"] == f"sha256:{digest}"
    check = await call(owner, "check-processed-item", item_args(flow["fsid"], long_id))
    assert check["is_processed"] is True
    exact = await call(owner, "check-processed-item", item_args(flow["fsid"], "x" * 255))
    assert exact["is_processed"] is False
    assert dedup.normalize_identifier("x" * 255) == "x" * 255


async def test_mark_processed_overrides_an_active_claim(runtime, owner, flow):
    job = await add_job(runtime, flow)
    await add_row(runtime, flow["fsid"], "guid-1", status="claimed", job_id=job, expires=utcnow() + timedelta(hours=1))
    assert (await call(owner, "check-processed-item", item_args(flow["fsid"])))["is_processed"] is False
    out = await call(owner, "mark-processed", item_args(flow["fsid"]))
    assert out["created"] is False and out["job_id"] == job
    [row] = await rows(runtime)
    assert row["status"] == "processed" and row["expires"] is None and row["job_id"] == job
    assert (await call(owner, "check-processed-item", item_args(flow["fsid"])))["is_processed"] is True


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (item_args("  ", "", ""), "flow_step_id_required"),
        (item_args("x_1", "", " "), "source_type_required"),
        (item_args("x_1", "  ", "rss"), "item_identifier_required"),
    ],
)
async def test_mark_processed_required_strings_in_order(runtime, owner, flow, args, code):
    await unchanged(runtime, owner, "mark-processed", args, code)


async def test_mark_processed_unknown_steps_and_jobs(runtime, owner, flow):
    other = await seed_pipeline(runtime, agent_slug="bot")
    for fsid in ("no-underscore", "abc_def", f"{flow['fsid'].rsplit('_', 1)[0]}_999", other["fsids"][0][:-1] + "9"):
        err = await unchanged(runtime, owner, "mark-processed", item_args(fsid), "flow_step_not_found")
        assert err["data"] == {"flow_step_id": fsid}
    # a step id of another pipeline grafted onto this flow is not in its flow_config
    grafted = f"{other['fsid'].rsplit('_', 1)[0]}_{flow['flow_id']}"
    await unchanged(runtime, owner, "mark-processed", item_args(grafted), "flow_step_not_found")
    err = await unchanged(runtime, owner, "mark-processed", item_args(flow["fsid"], job_id=777), "job_not_found")
    assert err["data"] == {"job_id": 777}
    foreign = await add_job(runtime, other)
    err = await unchanged(
        runtime, owner, "mark-processed", item_args(flow["fsid"], job_id=foreign), "job_flow_mismatch"
    )
    assert err["data"]["flow_id"] == flow["flow_id"] and err["data"]["job_flow_id"] == other["flow_id"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"job_id": "5.0"}, "job_id"),  # "5" is read as 5 (client forms); "5.0" is not
        ({"job_id": 0}, "job_id"),
        ({"source_type": "r" * 51}, "source_type"),
        ({"item_identifier": "i" * 2049}, "item_identifier"),
        ({"flow_step_id": 12}, "flow_step_id"),
        ({"bogus": 1}, "bogus"),
    ],
)
async def test_mark_processed_bad_input(runtime, owner, flow, extra, field):
    err = await unchanged(runtime, owner, "mark-processed", {**item_args(flow["fsid"]), **extra}, "invalid_input")
    assert field in {e["field"] for e in err["data"]["errors"]}
    err = await unchanged(runtime, owner, "mark-processed", {"flow_step_id": flow["fsid"]}, "invalid_input")
    assert {"source_type", "item_identifier"} <= {e["field"] for e in err["data"]["errors"]}


async def test_mark_processed_roles_and_inactive_agent(runtime, owner, flow):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "viewer"})
    async with connect(runtime, USER2) as c:
        err = await fail(c, "mark-processed", item_args(flow["fsid"]), "agent_access_denied")
        assert err["data"]["required_role"] == "operator"
        await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
        assert (await call(c, "mark-processed", item_args(flow["fsid"])))["created"] is True
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    await unchanged(runtime, owner, "mark-processed", item_args(flow["fsid"], "guid-2"), "agent_inactive")
    # reads stay allowed on an inactive agent
    assert (await call(owner, "check-processed-item", item_args(flow["fsid"])))["is_processed"] is True


# --- reads ------------------------------------------------------------------------------------


async def test_reads_count_only_processed_rows(runtime, owner, flow):
    fsid = flow["fsid"]
    job = await add_job(runtime, flow)
    await add_row(runtime, fsid, "claimed-1", status="claimed", job_id=job, expires=utcnow() + timedelta(hours=1))
    history = await call(owner, "has-processed-history", {"flow_step_id": fsid})
    assert history == {"has_history": False, "processed_count": 0}
    assert await call(owner, "check-processed-item", item_args(fsid, "claimed-1")) == {
        "is_processed": False,
        "processed_at": None,
    }
    assert await call(owner, "processed-items-get-processed-at", item_args(fsid, "claimed-1")) == {
        "processed_at": None,
        "processed_at_iso": None,
    }
    marked = await call(owner, "mark-processed", item_args(fsid, "a"))
    await call(owner, "mark-processed", item_args(fsid, "b"))
    await call(owner, "mark-processed", item_args(fsid, "c", "http_json"))
    assert await call(owner, "has-processed-history", {"flow_step_id": fsid}) == {
        "has_history": True,
        "processed_count": 3,
    }
    check = await call(owner, "check-processed-item", item_args(fsid, "a"))
    assert check == {"is_processed": True, "processed_at": marked["processed_at"]}
    # scoped by source type
    assert (await call(owner, "check-processed-item", item_args(fsid, "a", "http_json")))["is_processed"] is False
    at = await call(owner, "processed-items-get-processed-at", item_args(fsid, "a"))
    assert at["processed_at_iso"] == marked["processed_at"]
    assert isinstance(at["processed_at"], int)
    assert abs(at["processed_at"] - int(utcnow().timestamp())) < 60


@pytest.mark.parametrize("tool", ["check-processed-item", "processed-items-get-processed-at", "has-processed-history"])
async def test_reads_answer_nothing_for_unknown_steps_and_deny_unreadable_flows(runtime, owner, flow, tool):
    await call(owner, "mark-processed", item_args(flow["fsid"]))
    empty = {
        "check-processed-item": {"is_processed": False, "processed_at": None},
        "processed-items-get-processed-at": {"processed_at": None, "processed_at_iso": None},
        "has-processed-history": {"has_history": False, "processed_count": 0},
    }[tool]

    def args(fsid):
        return {"flow_step_id": fsid} if tool == "has-processed-history" else item_args(fsid)

    for fsid in ("garbage", "1_abc_x", f"{flow['fsid'].rsplit('_', 1)[0]}_424242"):
        assert await call(owner, tool, args(fsid)) == empty
    async with connect(runtime, USER2) as c:
        before = await table_rows(runtime)
        err = await fail(c, tool, args(flow["fsid"]), "agent_access_denied")
        assert err["data"]["required_role"] == "viewer"
        assert await count(runtime, "datamachine_logs") == len(before["datamachine_logs"]) + 1  # the denial row
        assert await call(c, tool, args("garbage")) == empty
        await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "viewer"})
        assert await call(c, tool, args(flow["fsid"])) != empty
    await fail(owner, tool, args(" "), "flow_step_id_required")
    if tool != "has-processed-history":
        await fail(owner, tool, item_args(flow["fsid"], " "), "item_identifier_required")
        await fail(owner, tool, item_args(flow["fsid"], "a", ""), "source_type_required")
        await fail(owner, tool, item_args(flow["fsid"], "a", "r" * 51), "invalid_input")


# --- clear-processed-items ----------------------------------------------------------------------


async def test_clear_flow_keeps_active_claims_and_matches_by_flow_key(runtime, owner, flow):
    many = await seed_pipeline(runtime, agent_slug="bot", flows=11)
    target, neighbour = many["fsids"][0], many["fsids"][10]
    live = await add_job(runtime, many)
    done = await add_job(runtime, many, status="completed")
    soon = utcnow() + timedelta(hours=1)
    await add_row(runtime, target, "processed-1")
    await add_row(runtime, target, "processed-2")
    await add_row(runtime, target, "active", status="claimed", job_id=live, expires=soon)
    await add_row(runtime, target, "active-no-expiry", status="claimed", job_id=live)
    await add_row(runtime, target, "expired", status="claimed", job_id=live, expires=utcnow() - timedelta(seconds=5))
    await add_row(runtime, target, "final-job", status="claimed", job_id=done, expires=soon)
    await add_row(runtime, target, "no-job", status="claimed", job_id=None, expires=soon)
    await add_row(runtime, neighbour, "neighbour")
    await add_row(runtime, flow["fsid"], "other-pipeline")
    out = await call(owner, "clear-processed-items", {"clear_type": "flow", "target_id": many["flow_ids"][0]})
    assert out == {
        "deleted_count": 5,
        "skipped_claimed": 2,
        "clear_type": "flow",
        "target_id": many["flow_ids"][0],
        "message": f"Deleted 5 processed items for flow {many['flow_ids'][0]}; kept 2 item(s) claimed by running jobs",
    }
    left = {(r["fsid"], r["item"]) for r in await rows(runtime)}
    assert left == {
        (target, "active"),
        (target, "active-no-expiry"),
        (neighbour, "neighbour"),
        (flow["fsid"], "other-pipeline"),
    }
    audit = [r for r in await log_rows(runtime) if r["context"].get("ability") == "clear-processed-items"]
    assert len(audit) == 1 and audit[0]["flow_id"] == many["flow_ids"][0]
    # nothing left to delete: no change, no audit row
    again = await call(owner, "clear-processed-items", {"clear_type": "flow", "target_id": many["flow_ids"][0]})
    assert again["deleted_count"] == 0 and again["skipped_claimed"] == 2
    assert again["message"].startswith("Deleted 0 processed items for flow")
    assert len([r for r in await log_rows(runtime) if r["context"].get("ability") == "clear-processed-items"]) == 1


async def test_flow_key_is_not_a_suffix_match(runtime, owner):
    """Flow 1 and flow 11: DM's LIKE '%_1' would clear both."""
    seeded = await seed_pipeline(runtime, flows=11)
    assert seeded["flow_ids"][0] == 1 and seeded["flow_ids"][10] == 11
    await add_row(runtime, seeded["fsids"][0], "one")
    await add_row(runtime, seeded["fsids"][10], "eleven")
    out = await call(owner, "clear-processed-items", {"clear_type": "flow", "target_id": 1})
    assert out["deleted_count"] == 1
    assert [r["item"] for r in await rows(runtime)] == ["eleven"]


async def test_clear_pipeline_scope(runtime, owner, flow):
    many = await seed_pipeline(runtime, agent_slug="bot", flows=3)
    for fsid in many["fsids"]:
        await add_row(runtime, fsid, "x")
    await add_row(runtime, flow["fsid"], "kept")
    out = await call(owner, "clear-processed-items", {"clear_type": "pipeline", "target_id": many["pipeline_id"]})
    assert out["deleted_count"] == 3 and out["skipped_claimed"] == 0
    assert out["message"] == f"Deleted 3 processed items for pipeline {many['pipeline_id']}"
    assert [r["item"] for r in await rows(runtime)] == ["kept"]


async def test_clear_errors_and_roles(runtime, owner, flow):
    await add_row(runtime, flow["fsid"], "x")
    err = await unchanged(
        runtime, owner, "clear-processed-items", {"clear_type": "job", "target_id": 1}, "clear_type_invalid"
    )
    assert err["data"]["errors"][0]["field"] == "clear_type"
    for bad in (0, "1x", 1.5):  # "1" is read as 1 (client forms)
        await unchanged(
            runtime, owner, "clear-processed-items", {"clear_type": "flow", "target_id": bad}, "target_id_invalid"
        )
    err = await unchanged(runtime, owner, "clear-processed-items", {"clear_type": "flow"}, "target_id_invalid")
    assert err["data"]["errors"] == [{"field": "target_id", "message": "Field required"}]
    await unchanged(runtime, owner, "clear-processed-items", {"clear_type": "flow", "target_id": 99}, "flow_not_found")
    await unchanged(
        runtime, owner, "clear-processed-items", {"clear_type": "pipeline", "target_id": 99}, "pipeline_not_found"
    )
    await unchanged(
        runtime, owner, "clear-processed-items", {"clear_type": "flow", "target_id": 1, "x": 1}, "invalid_input"
    )
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    async with connect(runtime, USER2) as c:
        for clear_type, target in (("flow", flow["flow_id"]), ("pipeline", flow["pipeline_id"])):
            err = await fail(c, "clear-processed-items", {"clear_type": clear_type, "target_id": target})
            assert err["code"] == "agent_access_denied" and err["data"]["required_role"] == "admin"
    assert len(await rows(runtime)) == 1


# --- find-stale / find-never-processed ----------------------------------------------------------


async def test_find_stale(runtime, owner, flow):
    fsid = flow["fsid"]
    await add_row(runtime, fsid, "old", age=timedelta(days=40))
    await add_row(runtime, fsid, "older", age=timedelta(days=90))
    await add_row(runtime, fsid, "fresh", age=timedelta(days=1))
    await add_row(runtime, fsid, "mid", age=timedelta(days=10))
    job = await add_job(runtime, flow)
    async with runtime.db.write() as s:  # an old claim is never "stale": it is not processed
        s.add(
            ProcessedItem(
                flow_step_id=fsid,
                source_type="rss",
                item_identifier="claim",
                job_id=job,
                processed_timestamp=utcnow() - timedelta(days=50),
                status="claimed",
                flow_key=flow["flow_id"],
            )
        )
    args = {
        "flow_step_id": fsid,
        "source_type": "rss",
        "candidate_identifiers": [" old ", "fresh", "never", "older", "mid", "old", "claim"],
        "max_age_days": 7,
    }
    out = await call(owner, "processed-items-find-stale", args)
    assert out == {"stale_ids": ["older", " old ", "mid"], "count": 3}
    assert await call(owner, "processed-items-find-stale", {**args, "limit": 2}) == {
        "stale_ids": ["older", " old "],
        "count": 2,
    }
    assert (await call(owner, "processed-items-find-stale", {**args, "max_age_days": 60}))["stale_ids"] == ["older"]
    assert (await call(owner, "processed-items-find-stale", {**args, "source_type": "files"}))["count"] == 0
    assert (await call(owner, "processed-items-find-stale", {**args, "flow_step_id": "nope"}))["count"] == 0
    for bad in (0, -1, "7d", 36501, 10**6, 2**64):  # "7" is read as 7 (client forms); a cutoff must be a date
        await unchanged(
            runtime, owner, "processed-items-find-stale", {**args, "max_age_days": bad}, "max_age_days_invalid"
        )
    for bad in (["x"] * 5001, [1, 2], "x", ["y" * 2049]):
        await unchanged(
            runtime,
            owner,
            "processed-items-find-stale",
            {**args, "candidate_identifiers": bad},
            "candidate_identifiers_invalid",
        )
    for bad in (0, 5001):
        await unchanged(runtime, owner, "processed-items-find-stale", {**args, "limit": bad}, "invalid_input")
    await unchanged(runtime, owner, "processed-items-find-stale", {**args, "source_type": " "}, "source_type_required")
    async with connect(runtime, USER2) as c:
        await fail(c, "processed-items-find-stale", args, "agent_access_denied")


async def test_find_never_processed(runtime, owner, flow):
    fsid = flow["fsid"]
    for item in ("b", "d"):
        await call(owner, "mark-processed", item_args(fsid, item))
    await call(owner, "mark-processed", item_args(fsid, "e", "http_json"))
    args = {"flow_step_id": fsid, "source_type": "rss", "candidate_identifiers": ["e", "a", "b", "c", "a", "d", " "]}
    out = await call(owner, "processed-items-find-never-processed", args)
    assert out == {"never_processed": ["e", "a", "c"], "count": 3}
    assert (await call(owner, "processed-items-find-never-processed", {**args, "limit": 1}))["never_processed"] == ["e"]
    # a flow that does not exist has processed nothing
    missing = {**args, "flow_step_id": f"{fsid.rsplit('_', 1)[0]}_9999"}
    assert (await call(owner, "processed-items-find-never-processed", missing))["never_processed"] == [
        "e",
        "a",
        "b",
        "c",
        "d",
    ]
    await unchanged(
        runtime,
        owner,
        "processed-items-find-never-processed",
        {**args, "candidate_identifiers": None},
        "candidate_identifiers_invalid",
    )
    await unchanged(
        runtime, owner, "processed-items-find-never-processed", {**args, "flow_step_id": ""}, "flow_step_id_required"
    )
    async with connect(runtime, USER2) as c:
        await fail(c, "processed-items-find-never-processed", args, "agent_access_denied")


async def test_bulk_lookups_use_chunks(runtime, owner, flow):
    """More candidates than one 500-identifier query holds: every chunk is consulted."""
    fsid = flow["fsid"]
    processed = [f"item-{i}" for i in range(0, 1500, 7)]
    async with runtime.db.write() as s:
        old = utcnow() - timedelta(days=30)
        s.add_all(
            ProcessedItem(
                flow_step_id=fsid,
                source_type="rss",
                item_identifier=item,
                processed_timestamp=old,
                status="processed",
                flow_key=flow["flow_id"],
            )
            for item in processed
        )
    candidates = [f"item-{i}" for i in range(1500)]
    never = await call(
        owner,
        "processed-items-find-never-processed",
        {"flow_step_id": fsid, "source_type": "rss", "candidate_identifiers": candidates, "limit": 5000},
    )
    assert never["count"] == 1500 - len(processed)
    stale = await call(
        owner,
        "processed-items-find-stale",
        {
            "flow_step_id": fsid,
            "source_type": "rss",
            "candidate_identifiers": candidates,
            "max_age_days": 7,
            "limit": 5000,
        },
    )
    assert stale["stale_ids"] == processed


# --- engine.dedup shared functions ----------------------------------------------------------------


async def test_dedup_claim_helpers(runtime, flow):
    fsid = flow["fsid"]
    live = await add_job(runtime, flow)
    waiting = await add_job(runtime, flow, status="waiting")
    await add_row(runtime, fsid, "a", status="claimed", job_id=live, expires=utcnow() + timedelta(minutes=5))
    await add_row(runtime, fsid, "b", status="claimed", job_id=waiting)
    await add_row(runtime, fsid, "c", status="claimed", job_id=live, expires=utcnow() - timedelta(minutes=5))
    await add_row(runtime, fsid, "d")
    async with runtime.db.read() as s:
        claims = await dedup.active_claims(s, fsid, "rss", ["a", "b", "c", "d", "e"], utcnow())
        times = await dedup.processed_times(s, fsid, "rss", ["a", "b", "c", "d"])
    assert claims == {"a": live, "b": waiting}
    assert set(times) == {"d"}
    async with runtime.db.write() as s:
        await s.execute(update(Job).where(Job.job_id == waiting).values(status="failed"))
        pstep = fsid.rsplit("_", 1)[0]
        assert await dedup.clear_pipeline_step(s, pstep, utcnow()) == (3, 1)
        assert await dedup.clear_jobs(s, [live], utcnow()) == (0, 1)
    assert [r["item"] for r in await rows(runtime)] == ["a"]


async def test_pipeline_step_prefix_escapes_underscores(runtime, flow):
    """``1_ab`` clears ``1_ab_{flow}`` only: '_' is escaped, and a longer step id is not a match."""
    fid = flow["flow_id"]
    async with runtime.db.write() as s:
        for fsid in (f"1_ab_{fid}", f"1xab_{fid}", f"1_ab_extra_{fid}"):
            s.add(
                ProcessedItem(
                    flow_step_id=fsid,
                    source_type="rss",
                    item_identifier="i",
                    processed_timestamp=utcnow(),
                    status="processed",
                    flow_key=flow["flow_id"],
                )
            )
    async with runtime.db.write() as s:
        assert await dedup.clear_pipeline_step(s, "1_ab", utcnow()) == (1, 0)
    assert sorted(r["fsid"] for r in await rows(runtime)) == [f"1_ab_extra_{fid}", f"1xab_{fid}"]
