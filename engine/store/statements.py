"""The job store's named statements, built once at import (one text per dialect).

Statements are written with ``:name`` parameters; the PostgreSQL form numbers them (``$1``…) in order of
first use. The guards below are the only places that say which jobs a write may touch: above all the
**lease guard**, which every worker write carries, so a worker that lost its lease can never commit over
a job someone else holds or ended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datamachine_mcp.engine.store.rows import JOB_COLUMNS
from datamachine_mcp.engine.token_usage import TOKEN_KEYS

JOBS = "datamachine_jobs"
ITEMS = "datamachine_processed_items"
FLOWS = "datamachine_flows"
LOGS = "datamachine_logs"
COLS = ", ".join(JOB_COLUMNS)

# --- guards: which row a job write may change -------------------------------------------------------
# A worker's write: the job is processing under this worker's lease.
LEASE_GUARD = "job_id = :job_id AND status = 'processing' AND lease_owner = :worker_id"
# A control or recovery write: the job still has one of the statuses it was seen in (up to three).
STATUS_GUARD = "job_id = :job_id AND status IN (:from1, :from2, :from3)"
# A resume or decision at a gate: the job is still parked at this wait.
WAIT_GUARD = "job_id = :job_id AND status = 'waiting' AND wait_ref = :wait_ref"
# Lease recovery: the lease observed as expired is still the one in place (its owner may be NULL: voided).
EXPIRED_GUARD = (
    "job_id = :job_id AND status = 'processing' AND lease_expires_at = :lease_expires_at "
    "AND (lease_owner = :worker_id OR (lease_owner IS NULL AND :worker_id IS NULL))"
)
GUARDS = {"lease": LEASE_GUARD, "status": STATUS_GUARD, "wait": WAIT_GUARD, "expired": EXPIRED_GUARD}

_PARAM = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class Query:
    """One named statement: its SQLite text (``:name``) and PostgreSQL text (``$n``) with the name order."""

    name: str
    sqlite: str
    pg: str
    pg_names: tuple[str, ...]


def query(name: str, sql: str, pg_sql: str | None = None) -> Query:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        param = match.group(1)
        if param not in names:
            names.append(param)
        return f"${names.index(param) + 1}"

    pg = _PARAM.sub(number, pg_sql if pg_sql is not None else sql)
    return Query(name, " ".join(sql.split()), " ".join(pg.split()), tuple(names))


def job_update(name: str, sets: str, guard: str) -> Query:
    return query(name, f"UPDATE {JOBS} SET {sets} WHERE {GUARDS[guard]}")


# --- claiming ---------------------------------------------------------------------------------------
_CLAIMABLE = "status = 'pending' AND run_at <= :now AND (affinity IS NULL OR affinity = :worker_id)"
_CLAIM_SET = (
    "status = 'processing', lease_owner = :worker_id, lease_expires_at = :lease_expires_at, "
    "started_at = COALESCE(started_at, :now), attempts = attempts + 1, updated_at = :now"
)
CLAIM = query(
    "claim",
    # SQLite: the transaction holds the database write lock, so the subquery and the update see one state.
    f"UPDATE {JOBS} SET {_CLAIM_SET} WHERE status = 'pending' AND job_id IN "
    f"(SELECT job_id FROM {JOBS} WHERE {_CLAIMABLE} ORDER BY run_at, job_id LIMIT :limit) RETURNING {COLS}",
    # PostgreSQL: a MATERIALIZED CTE is evaluated exactly once. The literal form ``WHERE job_id IN (SELECT …
    # LIMIT n FOR UPDATE SKIP LOCKED)`` can be re-run per outer row by a nested-loop semi join (e.g. on stale
    # statistics after a large fan-out), skip the rows the statement already updated, and claim far more.
    f"WITH due AS MATERIALIZED (SELECT job_id FROM {JOBS} WHERE {_CLAIMABLE} ORDER BY run_at, job_id "
    f"LIMIT :limit FOR UPDATE SKIP LOCKED) UPDATE {JOBS} AS j SET {_CLAIM_SET} FROM due "
    f"WHERE j.job_id = due.job_id RETURNING {', '.join('j.' + c for c in JOB_COLUMNS)}",
)
NEXT_DUE = query(
    "next_due",
    f"SELECT MIN(run_at) FROM {JOBS} WHERE status = 'pending' AND (affinity IS NULL OR affinity = :worker_id)",
)

# --- reading ----------------------------------------------------------------------------------------
GET_JOB = query("get_job", f"SELECT {COLS} FROM {JOBS} WHERE job_id = :job_id")
LOCK_JOB = query("lock_job", f"SELECT {COLS} FROM {JOBS} WHERE job_id = :job_id", f"{GET_JOB.sqlite} FOR UPDATE")
WAITING_AT = query(
    "waiting_at",
    f"SELECT {COLS} FROM {JOBS} WHERE wait_ref = :wait_ref",
    f"SELECT {COLS} FROM {JOBS} WHERE wait_ref = :wait_ref FOR UPDATE",
)
ACTIVE_CHILDREN = query(
    "active_children",
    f"SELECT {COLS} FROM {JOBS} WHERE parent_job_id = :parent_id "
    "AND status IN ('pending', 'processing', 'waiting') ORDER BY job_id",
    f"SELECT {COLS} FROM {JOBS} WHERE parent_job_id = :parent_id "
    "AND status IN ('pending', 'processing', 'waiting') ORDER BY job_id FOR UPDATE",
)
CHILD_COUNTS = query(
    "child_counts", f"SELECT status, COUNT(*) FROM {JOBS} WHERE parent_job_id = :parent_id GROUP BY status"
)

# A batch parent's AI usage is its children's, summed where they recorded it (their own engine_data).
CHILD_TOKEN_USAGE = query(
    "child_token_usage",
    "SELECT "
    + ", ".join(f"COALESCE(SUM(json_extract(engine_data, '$.token_usage.{k}')), 0)" for k in TOKEN_KEYS)
    + f" FROM {JOBS} WHERE parent_job_id = :parent_id",
    "SELECT "
    + ", ".join(f"COALESCE(SUM((engine_data->'token_usage'->>'{k}')::bigint), 0)" for k in TOKEN_KEYS)
    + f" FROM {JOBS} WHERE parent_job_id = :parent_id",
)

# --- worker writes (lease guard) --------------------------------------------------------------------
HEARTBEAT = job_update("heartbeat", "lease_expires_at = :lease_expires_at", "lease")
# updated_at is left alone by heartbeats: it marks real changes, which notifications follow.
SAVE_DATA = job_update("save_data", "engine_data = :engine_data, lease_expires_at = :lease_expires_at", "lease")
ADVANCE = job_update(
    "advance",
    "current_step_id = :step_id, packets = :packets, attempts = 1, engine_data = :engine_data, "
    "lease_expires_at = :lease_expires_at, updated_at = :now",
    "lease",
)
_REQUEUE_SET = (
    "status = 'pending', run_at = :run_at, lease_owner = NULL, lease_expires_at = NULL, "
    "engine_data = :engine_data, updated_at = :now"
)
REQUEUE = job_update("requeue", _REQUEUE_SET, "lease")
REQUEUE_EXPIRED = job_update("requeue_expired", _REQUEUE_SET, "expired")
PARK = job_update(
    "park",
    "status = 'waiting', wait_kind = :wait_kind, wait_ref = :wait_ref, wait_expires_at = :wait_expires_at, "
    "lease_owner = NULL, lease_expires_at = NULL, engine_data = :engine_data, updated_at = :now",
    "lease",
)
RELEASE = job_update(
    "release",
    "status = 'pending', run_at = :now, attempts = attempts - 1, lease_owner = NULL, lease_expires_at = NULL, "
    "updated_at = :now",
    "lease",
)
VOID_LEASE = job_update("void_lease", "lease_expires_at = :lease_expires_at", "lease")
FAN_OUT_PARENT = job_update(
    "fan_out_parent",
    "packets = :packets, engine_data = :engine_data, lease_owner = NULL, lease_expires_at = NULL, updated_at = :now",
    "lease",
)
_FINISH_SET = (
    "status = :status, status_reason = :reason, completed_at = :now, lease_owner = NULL, lease_expires_at = NULL, "
    "packets = :packets, engine_data = :engine_data, updated_at = :now"
)
FINISH = {guard: job_update(f"finish_{guard}", _FINISH_SET, guard) for guard in GUARDS}

# --- control writes ---------------------------------------------------------------------------------
RESUME = job_update(
    "resume",
    "status = 'pending', current_step_id = :step_id, packets = :packets, attempts = 0, run_at = :now, "
    "wait_expires_at = NULL, engine_data = :engine_data, updated_at = :now",
    "wait",
)
REOPEN = job_update(
    "reopen",
    "status = :status, status_reason = NULL, completed_at = NULL, lease_owner = NULL, lease_expires_at = NULL, "
    "run_at = :run_at, attempts = :attempts, current_step_id = :step_id, handler_slug = :handler_slug, "
    "engine_data = :engine_data, updated_at = :now",
    "status",
)
VOID_OLD_LEASES = query(
    "void_old_leases",
    f"UPDATE {JOBS} SET lease_owner = NULL, lease_expires_at = :lease_expires_at "
    "WHERE job_id = :job_id AND status = 'processing'",
)

# --- fan-out ----------------------------------------------------------------------------------------
CHILD_COLUMNS = (
    "user_id",
    "agent_id",
    "pipeline_id",
    "flow_id",
    "pipeline_key",
    "flow_key",
    "source",
    "label",
    "parent_job_id",
    "status",
    "run_trigger",
    "current_step_id",
    "packets",
    "attempts",
    "max_attempts",
    "run_at",
    "created_at",
    "updated_at",
    "idempotency_key",
    "affinity",
    "handler_slug",
    "engine_data",
)
CHILD_DATA = query("child_data", f"UPDATE {JOBS} SET engine_data = :engine_data WHERE job_id = :job_id")


def insert_children(count: int) -> tuple[str, str]:
    """A multi-row INSERT … RETURNING job_id for ``count`` children (SQLite text, PostgreSQL text)."""
    width = len(CHILD_COLUMNS)
    head = f"INSERT INTO {JOBS} ({', '.join(CHILD_COLUMNS)}) VALUES "
    lite = ", ".join("(" + ", ".join("?" * width) + ")" for _ in range(count))
    pg = ", ".join("(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(count))
    return head + lite + " RETURNING job_id", head + pg + " RETURNING job_id"


# --- claims (the job's side: keep them ahead of its lifetime, settle them once) ---------------------
PUSH_CLAIMS = query(
    "push_claims",
    f"UPDATE {ITEMS} SET claim_expires_at = :expires WHERE job_id = :job_id AND status = 'claimed'",
)
COMPLETE_CLAIMS = query(
    "complete_claims",
    # last_seen_at stays its fetch's time: settling is not a fetch (docs/engine.md, Retention)
    f"UPDATE {ITEMS} SET status = 'processed', processed_timestamp = :now, claim_expires_at = NULL "
    "WHERE job_id = :job_id AND status = 'claimed'",
)
RELEASE_CLAIMS = query("release_claims", f"DELETE FROM {ITEMS} WHERE job_id = :job_id AND status = 'claimed'")

# --- flows ------------------------------------------------------------------------------------------
# Flow health; the WHERE clause makes a run that changes nothing (another success after a success) write
# nothing. RETURNING tells whether the flow changed (and so is announced).
_HEALTH_SUCCESS = query(
    "health_success",
    f"UPDATE {FLOWS} SET last_run_status = :status, consecutive_failures = 0, consecutive_no_items = 0, "
    "updated_at = :now WHERE flow_id = :flow_id AND (last_run_status IS NULL OR last_run_status <> :status "
    "OR consecutive_failures <> 0 OR consecutive_no_items <> 0) RETURNING pipeline_id",
)
_HEALTH_FAILED = query(
    "health_failed",
    f"UPDATE {FLOWS} SET last_run_status = :status, consecutive_failures = consecutive_failures + 1, "
    "consecutive_no_items = 0, updated_at = :now WHERE flow_id = :flow_id RETURNING pipeline_id",
)
_HEALTH_NO_ITEMS = query(
    "health_no_items",
    f"UPDATE {FLOWS} SET last_run_status = :status, consecutive_no_items = consecutive_no_items + 1, "
    "consecutive_failures = 0, updated_at = :now WHERE flow_id = :flow_id RETURNING pipeline_id",
)
HEALTH = {"failed": _HEALTH_FAILED, "completed_no_items": _HEALTH_NO_ITEMS}
HEALTH_SUCCESS = _HEALTH_SUCCESS
FLOW_CONFIGS = query(
    "flow_configs",
    f"SELECT flow_config, scheduling_config, pipeline_id FROM {FLOWS} WHERE flow_id = :flow_id",
    f"SELECT flow_config, scheduling_config, pipeline_id FROM {FLOWS} WHERE flow_id = :flow_id FOR UPDATE",
)
SET_FLOW_CONFIG = query(
    "set_flow_config", f"UPDATE {FLOWS} SET flow_config = :flow_config, updated_at = :now WHERE flow_id = :flow_id"
)
SET_SCHEDULE = query(
    "set_schedule",
    f"UPDATE {FLOWS} SET scheduling_config = :schedule, next_run_at = NULL, updated_at = :now WHERE flow_id = :flow_id",
)

# --- logs -------------------------------------------------------------------------------------------
LOG_COLUMNS = ("level", "message", "context", "agent_id", "user_id", "created_at", "job_id", "flow_id", "pipeline_id")
INSERT_LOG = query(
    "insert_log",
    f"INSERT INTO {LOGS} ({', '.join(LOG_COLUMNS)}) VALUES ({', '.join(':' + c for c in LOG_COLUMNS)})",
)
