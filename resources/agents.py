"""Identity and agent resources."""

from __future__ import annotations

from datamachine_mcp.resources.registry import ResourceSpec, resource

resource(
    ResourceSpec(
        uri="datamachine://whoami",
        name="whoami",
        title="Who am I",
        description="Who this session acts as: user, agent, admin flag, token scopes, exposed toolsets (twin: whoami).",
        twin="whoami",
    )
)
resource(
    ResourceSpec(
        uri="datamachine://agents",
        name="agents",
        title="Agents",
        description="Agents you own or hold a grant on, first page (twin: list-agents).",
        twin="list-agents",
    )
)
resource(
    ResourceSpec(
        uri="datamachine://agents/{agent_slug}",
        name="agent",
        title="Agent",
        description="One agent with resource counts, your role and (for admins) its grants (twin: get-agent).",
        twin="get-agent",
    )
)
