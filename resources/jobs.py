"""Job resources: ``datamachine://jobs/{job_id}`` (twin: get-jobs with job_id) and its log rows
(``datamachine://jobs/{job_id}/logs``, twin: read-logs with job_id).

get-jobs answers an unknown job_id with an empty list, so the resource checks ``total`` and answers
resource-not-found. read-logs would answer any job id (unknown or unreadable) with the rows the caller may
read, so the logs resource first calls get-jobs for the job as a guard: the job must exist (else
resource-not-found) and be readable (else get-jobs' own ``agent_access_denied``, with its denial row).
"""

from __future__ import annotations

from typing import Any

from datamachine_mcp.abilities.uris import JOB
from datamachine_mcp.resources.registry import Guard, ResourceSpec, resource


def _job_id(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"not a job id: {raw!r}")
    return int(raw)


def _exists(output: dict[str, Any]) -> bool:
    return bool(output.get("total"))


resource(
    ResourceSpec(
        uri=JOB,
        name="job",
        title="Job",
        description="One job with its status, engine data (redacted) and packets (twin: get-jobs with job_id).",
        twin="get-jobs",
        params={"job_id": _job_id},
        exists=_exists,
    )
)
resource(
    ResourceSpec(
        uri="datamachine://jobs/{job_id}/logs",
        name="job-logs",
        title="Job logs",
        description="Log entries about one job, newest first, first page (twin: read-logs with job_id).",
        twin="read-logs",
        params={"job_id": _job_id},
        guard=Guard(ability="get-jobs", args=lambda args: {"job_id": args["job_id"]}, exists=_exists),
    )
)
