"""Central log resources."""

from __future__ import annotations

from datamachine_mcp.resources.registry import ResourceSpec, resource

resource(
    ResourceSpec(
        uri="datamachine://logs{?level,agent_id,job_id,per_page,offset}",
        name="logs",
        title="Logs",
        description="Central log entries you may read, newest first; filter and page with the query (twin: read-logs).",
        twin="read-logs",
        params={"agent_id": int, "job_id": int, "per_page": int, "offset": int},
    )
)
resource(
    ResourceSpec(
        uri="datamachine://logs/metadata",
        name="logs-metadata",
        title="Log statistics",
        description="Entry count, oldest and newest entry and counts per level (twin: get-log-metadata).",
        twin="get-log-metadata",
    )
)
