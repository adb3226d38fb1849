"""Chat session resource."""

from __future__ import annotations

from datamachine_mcp.resources.registry import ResourceSpec, resource

resource(
    ResourceSpec(
        uri="datamachine://chat/{session_id}",
        name="chat-session",
        title="Chat session",
        description="One of your chat sessions with its conversation (twin: get-chat-session).",
        twin="get-chat-session",
    )
)
