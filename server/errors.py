"""How a refused request reaches the client: a tool error result, or a JSON-RPC error for the others."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.runner import error_text, refusal
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.resources.registry import ResourceNotFound

ERROR_META_KEY = "datamachine/error"  # where a tool error's {code, message, data} travels (the result's _meta)
RESOURCE_NOT_FOUND = -32002  # the 2025-11-25 "Resource not found" code
INPUT_CODES = frozenset({"invalid_input", "input_too_large"})  # refused for the request's parameters


def tool_error(error: dict[str, Any]) -> types.CallToolResult:
    """A refused tool call: ``is_error`` with the text ``"<code>: <message>"``; ``{code, message, data}`` in
    ``_meta`` under ``ERROR_META_KEY``. No structured content: clients validate that against the tool's
    success output schema even on errors, and would show a schema complaint instead of the message."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=error_text(error))],
        is_error=True,
        meta={ERROR_META_KEY: error},
    )


def request_error(err: CodedError, *, uri: str | None = None) -> MCPError:
    """A refused request other than a tool call (listing tools, reading a resource, listening) as a
    JSON-RPC error: resource-not-found, invalid params (the input) or invalid request (the rest)."""
    error = refusal(err)
    if isinstance(err, ResourceNotFound):
        code = RESOURCE_NOT_FOUND
    elif err.code in INPUT_CODES:
        code = types.INVALID_PARAMS
    else:
        code = types.INVALID_REQUEST
    return MCPError(code=code, message=error_text(error), data=None if uri is None else {"uri": uri, **error["data"]})
