"""Schedules: validation table, derived keys and next_run, schedule-flow, pause/resume, intervals.

See docs/engine.md, Schedule types and Next run and stagger; docs/storage.md, scheduling_config.
Firing is the scheduler's job and not tested here.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import iso, parse_datetime, utcnow
from tests.conftest import call, fail, table_rows
from tests.test_flows import audits, flow_row, make_flow, make_pipeline, unchanged

pytestmark = pytest.mark.anyio

INTERVALS = {
    "every_5_minutes": 300,
    "hourly": 3600,
    "every_2_hours": 7200,
    "every_4_hours": 14400,
    "qtrdaily": 21600,
    "twicedaily": 43200,
    "daily": 86400,
    "every_3_days": 259200,
    "weekly": 604800,
    "monthly": 2592000,
}
VALID = sorted([*INTERVALS, "manual", "one_time", "cron", "every_6_hours", "every_12_hours"])


def stagger(flow_id: int, seconds: int) -> int:
    """The stagger (docs/engine.md, Next run and stagger), written out independently of the implementation."""
    return zlib.crc32(f"datamachine_stagger_{flow_id}".encode()) % min(seconds, 3600)


def next_local(hour: int, minute: int, zone: str, now: datetime) -> datetime:
    """The first hh:mm in ``zone`` strictly after ``now``, in UTC (daily cron, no DST edge in tests)."""
    local_now = now.astimezone(ZoneInfo(zone))
    candidate = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if candidate <= local_now:
        candidate = (candidate + timedelta(days=1)).replace(hour=hour, minute=minute)
    return candidate.astimezone(UTC)


async def _set(owner, fid: int, schedule: dict[str, Any]) -> dict[str, Any]:
    out = await call(owner, "update-flow", {"flow_id": fid, "scheduling_config": schedule})
    return out["flow_data"]


async def _check_column(runtime, fid: int, data: dict[str, Any]) -> None:
    """flows.next_run_at and the scheduling_config.next_run mirror agree with the output."""
    row = await flow_row(runtime, fid)
    assert iso(row.next_run_at) == data["next_run"]
    assert row.scheduling_config.get("next_run") == data["next_run"]


async def test_schedule_validation_table(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid))["flow_id"]

    # every interval key and both aliases: stored canonical, first run on the stagger, next_run mirrored
    for given, stored in [
        *((k, k) for k in INTERVALS),
        ("every_6_hours", "qtrdaily"),
        ("every_12_hours", "twicedaily"),
    ]:
        await _set(owner, fid, {"interval": "manual"})
        before = utcnow().replace(microsecond=0)
        data = await _set(owner, fid, {"interval": given})
        after = utcnow()
        seconds = INTERVALS[stored]
        schedule = data["scheduling_config"]
        assert schedule["interval"] == stored, given
        assert schedule["interval_seconds"] == seconds, given
        first = parse_datetime(schedule["first_run"])
        offset = timedelta(seconds=stagger(fid, seconds))
        assert before + offset <= first <= after + offset, given
        assert data["next_run"] == schedule["next_run"] == schedule["first_run"], given
        await _check_column(runtime, fid, data)

    # invalid interval: the message lists every valid value, sorted
    err = await unchanged(
        runtime,
        owner,
        "update-flow",
        {"flow_id": fid, "scheduling_config": {"interval": "fortnightly"}},
        "invalid_interval",
    )
    assert err["message"] == f"Invalid interval 'fortnightly'. Valid options: {', '.join(VALID)}"

    # cron with an IANA timezone: next_run is the next local match, in UTC
    now = utcnow()
    data = await _set(owner, fid, {"interval": "cron", "cron_expression": "30 9 * * *", "timezone": "America/New_York"})
    assert data["scheduling_config"] == {
        "interval": "cron",
        "cron_expression": "30 9 * * *",
        "timezone": "America/New_York",
        "next_run": data["next_run"],
    }
    assert data["next_run"] == iso(next_local(9, 30, "America/New_York", now))
    await _check_column(runtime, fid, data)
    # a cron-looking interval is read as cron (timezone defaults to UTC); macros are accepted
    data = await _set(owner, fid, {"interval": "0 */2 * * *"})
    assert (data["scheduling_config"]["interval"], data["scheduling_config"]["cron_expression"]) == (
        "cron",
        "0 */2 * * *",
    )
    assert data["scheduling_config"]["timezone"] == "UTC"
    assert parse_datetime(data["next_run"]).hour % 2 == 0
    data = await _set(owner, fid, {"interval": "cron", "cron_expression": "@daily"})
    assert data["next_run"] == iso(next_local(0, 0, "UTC", utcnow()))

    # one_time: Unix seconds or ISO 8601, stored as Unix seconds
    data = await _set(owner, fid, {"interval": "one_time", "timestamp": 4102444800})
    assert data["scheduling_config"]["timestamp"] == 4102444800
    assert data["next_run"] == "2100-01-01T00:00:00Z"
    data = await _set(owner, fid, {"interval": "one_time", "timestamp": "2099-06-01T12:00:00Z"})
    assert data["scheduling_config"]["timestamp"] == int(datetime(2099, 6, 1, 12, tzinfo=UTC).timestamp())
    await _check_column(runtime, fid, data)

    # enabled: false stores the schedule paused; derived keys and webhook in the input are ignored
    data = await _set(
        owner,
        fid,
        {"interval": "daily", "enabled": False, "next_run": "2000-01-01T00:00:00Z", "webhook": {"enabled": True}},
    )
    assert data["enabled"] is False and data["next_run"] is None
    assert data["scheduling_config"]["enabled"] is False and "webhook" not in data["scheduling_config"]
    await _check_column(runtime, fid, data)
    data = await _set(owner, fid, {"interval": "manual"})
    assert (data["scheduling_config"], data["next_run"]) == ({"interval": "manual"}, None)

    # the other error codes, each writing nothing
    for schedule, code in [
        ({"interval": "one_time"}, "missing_timestamp"),
        ({"interval": "one_time", "timestamp": 0}, "missing_timestamp"),
        ({"interval": "one_time", "timestamp": "next tuesday"}, "missing_timestamp"),
        ({"interval": "cron"}, "missing_cron_expression"),
        ({"interval": "cron", "cron_expression": "61 * * * *"}, "invalid_cron_expression"),
        ({"interval": "cron", "cron_expression": "* * *"}, "invalid_cron_expression"),
        ({"interval": "cron", "cron_expression": "0 9 * * *", "timezone": "Mars/Olympus"}, "invalid_timezone"),
        ({"interval": ""}, "invalid_interval"),
    ]:
        await unchanged(runtime, owner, "update-flow", {"flow_id": fid, "scheduling_config": schedule}, code)


async def test_unchanged_schedule_keeps_timers_and_writes_nothing(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid, scheduling_config={"interval": "weekly", "allow_overlap": False}))["flow_id"]
    first = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    before = await table_rows(runtime)
    same = await call(
        owner,
        "update-flow",
        {"flow_id": fid, "scheduling_config": {"interval": "weekly", "allow_overlap": False, "enabled": True}},
    )
    assert same["scheduling_unchanged"] is True and same["updated_fields"] == []
    assert same["flow_data"]["next_run"] == first["next_run"]
    out = await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": "weekly"})
    assert out["scheduling_unchanged"] is True
    assert await table_rows(runtime) == before


@pytest.mark.parametrize(
    ("value", "kind", "stored"),
    [
        ("manual", "manual", {"interval": "manual"}),
        ("hourly", "recurring", {"interval": "hourly"}),
        (" every_6_hours ", "recurring", {"interval": "qtrdaily"}),
        ("0 9 * * 1-5", "cron", {"interval": "cron", "cron_expression": "0 9 * * 1-5", "timezone": "UTC"}),
        ("@hourly", "cron", {"interval": "cron", "cron_expression": "@hourly", "timezone": "UTC"}),
        (4102444800, "one_time", {"interval": "one_time", "timestamp": 4102444800}),
        ("4102444800", "one_time", {"interval": "one_time", "timestamp": 4102444800}),
    ],
)
async def test_schedule_flow_interprets_one_value(runtime, owner, value, kind, stored):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid))["flow_id"]
    out = await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": value})
    assert out["schedule_type"] == kind
    config = out["scheduling_config"]
    assert {k: config[k] for k in stored} == stored
    assert out["scheduling_unchanged"] is (kind == "manual")
    assert out["scheduled_time"] == config.get("next_run")
    assert (out["scheduled_time"] is None) is (kind == "manual")
    if kind == "one_time":
        assert out["scheduled_time"] == "2100-01-01T00:00:00Z"
    assert len(await audits(runtime, "schedule-flow")) == (0 if kind == "manual" else 1)


async def test_schedule_flow_keeps_pause_and_timezone_and_rejects_bad_values(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (
        await make_flow(
            owner,
            pid,
            scheduling_config={
                "interval": "cron",
                "cron_expression": "0 6 * * *",
                "timezone": "Europe/Berlin",
                "enabled": False,
            },
        )
    )["flow_id"]
    out = await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": "0 8 * * *"})
    assert out["scheduling_config"] == {
        "interval": "cron",
        "cron_expression": "0 8 * * *",
        "timezone": "Europe/Berlin",
        "enabled": False,
    }
    assert out["scheduled_time"] is None  # paused until resumed
    resumed = await call(owner, "resume-flow", {"flow_id": fid})
    assert resumed["flows"][0]["next_run"] == iso(next_local(8, 0, "Europe/Berlin", utcnow()))
    for value, code in [
        (-5, "missing_timestamp"),
        ("0", "missing_timestamp"),
        ("sometimes", "invalid_interval"),
        ("99 * * * *", "invalid_cron_expression"),
    ]:
        await unchanged(runtime, owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": value}, code)
    await unchanged(
        runtime, owner, "schedule-flow", {"flow_id": 99, "interval_or_timestamp": "daily"}, "flow_not_found"
    )
    await unchanged(runtime, owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": True}, "invalid_input")
    await unchanged(runtime, owner, "schedule-flow", {"flow_id": fid}, "invalid_input")


async def test_cron_looking_values_out_of_range_fields_and_past_or_far_timestamps_are_refused(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid))["flow_id"]
    now = int(utcnow().timestamp())
    for value, code in [
        ("0 9 * *", "invalid_cron_expression"),  # spaces or * mean cron, not an interval name
        ("*", "invalid_cron_expression"),
        ("every day", "invalid_cron_expression"),
        ("*/61 * * * *", "invalid_cron_expression"),
        ("0 */25 * * *", "invalid_cron_expression"),
        ("0 0 */32 * *", "invalid_cron_expression"),
        ("0 0 1,*/13 */13 *", "invalid_cron_expression"),
        ("0 0 * * */8", "invalid_cron_expression"),
        (now - 120, "timestamp_in_past"),
        (str(now - 3600), "timestamp_in_past"),
        (253402300800, "missing_timestamp"),  # after 9999-12-31T23:59:59Z
        (10**15, "missing_timestamp"),
    ]:
        err = await unchanged(runtime, owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": value}, code)
        assert ".." not in err["message"]
    for schedule, code in [
        ({"interval": "*/61 * * * *"}, "invalid_cron_expression"),
        ({"interval": "cron", "cron_expression": "*/61 * * * *"}, "invalid_cron_expression"),
        ({"interval": "one_time", "timestamp": "2001-09-09T01:46:40Z"}, "timestamp_in_past"),
        ({"interval": "one_time", "timestamp": 99999999999999}, "missing_timestamp"),
    ]:
        await unchanged(runtime, owner, "update-flow", {"flow_id": fid, "scheduling_config": schedule}, code)
    # a step that fits its field, and a one-time run set "now" by a slow client, are fine
    out = await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": "*/60 */24 * * */7"})
    assert out["schedule_type"] == "cron"
    out = await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": now - 20})
    assert out["schedule_type"] == "one_time"


async def test_pause_keeps_schedule_and_resume_recomputes_next_run_on_the_grid(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid, scheduling_config={"interval": "every_2_hours"}))["flow_id"]
    await call(owner, "pause-flow", {"flow_id": fid})
    # While paused, move the grid anchor 5.5 hours into the past (as if the flow had been paused for a while).
    anchor = (utcnow() - timedelta(hours=5, minutes=30)).replace(microsecond=0)
    async with runtime.db.write() as s:
        row = await s.get(type(await flow_row(runtime, fid)), fid)
        row.scheduling_config = {**row.scheduling_config, "first_run": iso(anchor)}
    out = await call(owner, "resume-flow", {"flow_id": fid})
    next_run = parse_datetime(out["flows"][0]["next_run"])
    assert next_run == anchor + timedelta(hours=6)  # the first grid slot after now, not a new stagger
    data = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    assert data["scheduling_config"]["first_run"] == iso(anchor)
    assert data["scheduling_config"]["interval"] == "every_2_hours"
    await _check_column(runtime, fid, data)

    # a one-time run whose time passed while paused is due at once (next_run in the past)
    soon = int(utcnow().timestamp()) + 3600
    once = (await make_flow(owner, pid, scheduling_config={"interval": "one_time", "timestamp": soon}))["flow_id"]
    await call(owner, "pause-flow", {"flow_id": once})
    assert (await call(owner, "get-flows", {"flow_id": once}))["flows"][0]["next_run"] is None
    async with runtime.db.write() as session:  # its time passes (a past time cannot be set any more)
        flow = await session.get(Flow, once)
        flow.scheduling_config = {**flow.scheduling_config, "timestamp": 1000000000}
    out = await call(owner, "resume-flow", {"flow_id": once})
    assert out["flows"][0]["next_run"] == "2001-09-09T01:46:40Z"


async def test_get_scheduling_intervals(runtime, owner):
    out = await call(owner, "get-scheduling-intervals")
    assert out["intervals"][:3] == [
        {"value": "manual", "label": "Manual only", "seconds": None},
        {"value": "one_time", "label": "One Time (scheduled)", "seconds": None},
        {"value": "cron", "label": "Cron expression", "seconds": None},
    ]
    rest = out["intervals"][3:]
    assert [(i["value"], i["seconds"]) for i in rest] == sorted(INTERVALS.items(), key=lambda kv: kv[1])
    assert rest[1]["label"] == "Hourly"
    assert out["aliases"] == {"every_6_hours": "qtrdaily", "every_12_hours": "twicedaily"}
    await fail(owner, "get-scheduling-intervals", {"x": 1}, "invalid_input")
