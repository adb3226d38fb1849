"""Schedules: validation, derived keys and ``next_run_at`` (docs/engine.md, Scheduling).

Pure functions of a flow's ``scheduling_config`` and the current time; the scheduler loop that fires
flows uses the same functions after each fire.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.storage.timeutil import iso, parse_datetime

INTERVALS: dict[str, tuple[int, str]] = {
    "every_5_minutes": (300, "Every 5 Minutes"),
    "hourly": (3600, "Hourly"),
    "every_2_hours": (7200, "Every 2 Hours"),
    "every_4_hours": (14400, "Every 4 Hours"),
    "qtrdaily": (21600, "Every 6 Hours"),
    "twicedaily": (43200, "Twice Daily"),
    "daily": (86400, "Daily"),
    "every_3_days": (259200, "Every 3 Days"),
    "weekly": (604800, "Weekly"),
    "monthly": (2592000, "Monthly"),
}
ALIASES = {"every_6_hours": "qtrdaily", "every_12_hours": "twicedaily"}
SPECIAL = {"manual": "Manual only", "one_time": "One Time (scheduled)", "cron": "Cron expression"}
CLIENT_KEYS = ("interval", "enabled", "cron_expression", "timezone", "timestamp", "allow_overlap")
DERIVED_KEYS = ("interval_seconds", "first_run", "next_run", "last_skip")
MAX_STAGGER_SECONDS = 3600
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# the values each cron field spans: a step (*/n) longer than that is a mistake, not "once"
CRON_FIELDS = (("minute", 60), ("hour", 24), ("day of month", 31), ("month", 12), ("weekday", 7))
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last second a date can hold
PAST_GRACE = timedelta(minutes=1)  # a one-time run set "now" by a slow client is not refused


class ScheduleError(CodedError, ValueError):
    """An invalid schedule (``invalid_interval``, ``invalid_cron_expression``, …); still a ValueError."""


def valid_values() -> list[str]:
    return sorted([*SPECIAL, *INTERVALS, *ALIASES])


def looks_like_cron(value: str) -> bool:
    """Interval keys have neither spaces nor ``*``: a value with either is read (and validated) as cron."""
    text = value.strip()
    return text.startswith("@") or "*" in text or len(text.split()) > 1


def stagger_seconds(flow_id: int, interval_seconds: int) -> int:
    """Deterministic first-run offset, identical to DM's calculateStaggerOffset."""
    return zlib.crc32(f"datamachine_stagger_{flow_id}".encode()) % min(interval_seconds, MAX_STAGGER_SECONDS)


def _unix(value: Any) -> int:
    if isinstance(value, bool):
        raise ScheduleError("missing_timestamp", "timestamp must be Unix seconds or an ISO 8601 date-time.")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    elif isinstance(value, str) and value.strip():
        try:
            seconds = int(parse_datetime(value).timestamp())
        except ValueError:
            raise ScheduleError(
                "missing_timestamp", f"timestamp '{value}' is neither Unix seconds nor an ISO 8601 date-time."
            ) from None
    else:
        raise ScheduleError("missing_timestamp", "A one_time schedule needs a timestamp (Unix seconds or ISO 8601).")
    if seconds <= 0:
        raise ScheduleError("missing_timestamp", "timestamp must be a positive Unix time.")
    if seconds > MAX_TIMESTAMP:
        raise ScheduleError(
            "missing_timestamp", f"timestamp must be at most {MAX_TIMESTAMP} (9999-12-31T23:59:59Z).", timestamp=seconds
        )
    return seconds


def _cron_problem(expression: str) -> str | None:
    """Why a 5-field expression croniter accepts is still wrong (a step beyond its field), or None."""
    for text, (name, span) in zip(expression.split(), CRON_FIELDS, strict=True):
        for part in text.split(","):
            _, _, step = part.partition("/")
            if step.isdigit() and not 1 <= int(step) <= span:
                return f"the {name} step /{step} is out of range (1-{span})"
    return None


def _zone(name: Any) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ScheduleError("invalid_timezone", "timezone must be an IANA zone name such as 'Europe/Berlin'.")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            "invalid_timezone", f"Unknown timezone '{name}'; use an IANA name such as 'Europe/Berlin' or 'UTC'."
        ) from None


def normalize(raw: dict[str, Any], *, not_before: datetime | None = None) -> dict[str, Any]:
    """Validate the client keys of a schedule and return them in canonical form.

    Aliases resolve, a cron-looking ``interval`` becomes ``cron``, timestamps become Unix seconds.
    Derived keys and ``webhook`` in the input are ignored. With ``not_before``, a one-time timestamp
    more than a minute before it is refused (``timestamp_in_past``).
    """
    interval = raw.get("interval")
    if not isinstance(interval, str) or not interval.strip():
        raise ScheduleError(
            "invalid_interval", f"interval is required. Valid options: {', '.join(valid_values())}", interval=interval
        )
    interval = interval.strip()
    out: dict[str, Any] = {}
    if interval in ALIASES:
        interval = ALIASES[interval]
    elif interval not in SPECIAL and interval not in INTERVALS and looks_like_cron(interval):
        out["cron_expression"] = interval
        interval = "cron"
    if interval not in SPECIAL and interval not in INTERVALS:
        raise ScheduleError(
            "invalid_interval",
            f"Invalid interval '{interval}'. Valid options: {', '.join(valid_values())}",
            interval=interval,
            valid=valid_values(),
        )
    out["interval"] = interval
    for flag in ("enabled", "allow_overlap"):
        if flag in raw and raw[flag] is not None:
            if not isinstance(raw[flag], bool):
                raise ScheduleError("invalid_interval", f"{flag} must be true or false.")
            out[flag] = raw[flag]
    if out.get("enabled") is True:
        del out["enabled"]  # absent means enabled
    if interval == "one_time":
        out["timestamp"] = _unix(raw.get("timestamp"))
        if not_before is not None and out["timestamp"] < (not_before - PAST_GRACE).timestamp():
            when = iso(datetime.fromtimestamp(out["timestamp"], UTC))
            raise ScheduleError(
                "timestamp_in_past",
                f"timestamp {out['timestamp']} ({when}) is in the past; give a future time, or run the flow now "
                "with run-flow.",
                timestamp=out["timestamp"],
            )
    elif interval == "cron":
        expression = out.get("cron_expression") or raw.get("cron_expression")
        if not isinstance(expression, str) or not expression.strip():
            raise ScheduleError("missing_cron_expression", "A cron schedule needs cron_expression, e.g. '0 9 * * 1-5'.")
        expression = " ".join(expression.split())
        if not (expression in CRON_MACROS or (len(expression.split()) == 5 and croniter.is_valid(expression))):
            raise ScheduleError(
                "invalid_cron_expression",
                f"Invalid cron expression '{expression}': use 5 fields (minute hour day month weekday) or "
                f"one of {', '.join(CRON_MACROS)}.",
                cron_expression=expression,
            )
        if expression not in CRON_MACROS and (problem := _cron_problem(expression)):
            raise ScheduleError(
                "invalid_cron_expression",
                f"Invalid cron expression '{expression}': {problem}.",
                cron_expression=expression,
            )
        out["cron_expression"] = expression
        timezone = raw.get("timezone") or "UTC"
        _zone(timezone)
        out["timezone"] = timezone
    return out


def client_keys(config: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (config or {}).items() if k in CLIENT_KEYS}


def next_cron(expression: str, timezone: str, after: datetime) -> datetime:
    """First match strictly after ``after``, evaluated in ``timezone`` (DST-aware), in UTC.

    Matches are local wall-clock times: one that does not exist (spring forward)
    is skipped, and one that occurs twice (fall back) fires once, at its first occurrence.
    """
    zone = _zone(timezone)
    after_utc = after.astimezone(UTC)
    # croniter walks naive wall-clock times; each candidate is then placed in the zone.
    it = croniter(expression, after_utc.astimezone(zone).replace(tzinfo=None, fold=0))
    for _ in range(10000):
        wall = it.get_next(datetime)
        first = wall.replace(tzinfo=zone, fold=0)
        first_utc = first.astimezone(UTC)
        if first_utc.astimezone(zone).replace(tzinfo=None) != wall:
            continue  # nonexistent local time (the gap of a spring-forward change)
        if first_utc > after_utc:
            return first_utc
        # A repeated wall time whose first occurrence is not after ``after``: it has had its turn.
    raise ScheduleError("invalid_cron_expression", f"Cron expression '{expression}' has no upcoming match.")


def next_grid(first_run: datetime, interval_seconds: int, now: datetime) -> datetime:
    """Smallest ``first_run + k·interval`` that is later than ``now``."""
    if first_run > now:
        return first_run
    steps = int((now - first_run).total_seconds() // interval_seconds) + 1
    return first_run + timedelta(seconds=steps * interval_seconds)


def with_next_run(config: dict[str, Any], next_run: datetime | None) -> dict[str, Any]:
    out = dict(config)
    if next_run is None:
        out.pop("next_run", None)
    else:
        out["next_run"] = iso(next_run)
    return out


def apply(
    previous: dict[str, Any] | None, client: dict[str, Any], *, flow_id: int, now: datetime
) -> tuple[dict[str, Any], datetime | None, bool]:
    """Set a flow's schedule. Returns (scheduling_config, next_run_at, unchanged).

    An unchanged definition changes nothing (timers are not reset). ``webhook`` is always kept.
    """
    previous = previous or {}
    if client_keys(previous) == client and previous:
        current = previous.get("next_run")
        return previous, parse_datetime(current) if isinstance(current, str) else None, True
    config: dict[str, Any] = dict(client)
    if "webhook" in previous:
        config["webhook"] = previous["webhook"]
    interval = client["interval"]
    next_run: datetime | None = None
    if interval in INTERVALS:
        seconds = INTERVALS[interval][0]
        # whole seconds, so the stored anchor (ISO, no microseconds) and next_run_at agree exactly
        first = now.replace(microsecond=0) + timedelta(seconds=stagger_seconds(flow_id, seconds))
        config["interval_seconds"] = seconds
        config["first_run"] = iso(first)
        next_run = first
    elif interval == "one_time":
        next_run = datetime.fromtimestamp(client["timestamp"], UTC)
    elif interval == "cron":
        next_run = next_cron(client["cron_expression"], client["timezone"], now)
    if client.get("enabled") is False:
        next_run = None
    return with_next_run(config, next_run), next_run, False


def resume(config: dict[str, Any], *, flow_id: int, now: datetime) -> tuple[dict[str, Any], datetime | None]:
    """Remove ``enabled: false`` and recompute the next run on the existing grid."""
    out = dict(config)
    out.pop("enabled", None)
    interval = out.get("interval")
    if interval in INTERVALS and not isinstance(out.get("first_run"), str):
        seconds = INTERVALS[interval][0]
        out["interval_seconds"] = seconds
        out["first_run"] = iso(now.replace(microsecond=0) + timedelta(seconds=stagger_seconds(flow_id, seconds)))
    next_run = upcoming(out, flow_id=flow_id, now=now)
    return with_next_run(out, next_run), next_run


def pause(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    out["enabled"] = False
    out.pop("next_run", None)
    return out


def upcoming(
    config: dict[str, Any], *, flow_id: int, now: datetime, after_slot: datetime | None = None
) -> datetime | None:
    """The next fire time of an enabled schedule, or None (manual, paused, consumed one-time)."""
    interval = config.get("interval", "manual")
    if config.get("enabled") is False or interval == "manual":
        return None
    if interval == "one_time":
        if after_slot is not None:
            return None  # fired
        return datetime.fromtimestamp(int(config["timestamp"]), UTC)
    if interval == "cron":
        start = max(now, after_slot) if after_slot is not None else now
        return next_cron(config["cron_expression"], config.get("timezone", "UTC"), start)
    seconds = INTERVALS[interval][0]
    first_raw = config.get("first_run")
    first = (
        parse_datetime(first_raw)
        if isinstance(first_raw, str)
        else now.replace(microsecond=0) + timedelta(seconds=stagger_seconds(flow_id, seconds))
    )
    return next_grid(first, seconds, max(now, after_slot) if after_slot is not None else now)


def describe_intervals() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"value": k, "label": v, "seconds": None} for k, v in SPECIAL.items()]
    for key, (seconds, label) in sorted(INTERVALS.items(), key=lambda kv: kv[1][0]):
        rows.append({"value": key, "label": label, "seconds": seconds})
    return rows
