"""The official MCP Inspector CLI (a TypeScript client) against the real stdio server.

The TypeScript SDK validates a result's structured content against the tool's output schema even when
``isError`` is set, so an error must carry no structured content: the Inspector must show our
``"<code>: <message>"`` text, never a schema complaint. The envelope travels in ``_meta``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.node_tools import node_env, tool

ERROR_META_KEY = "datamachine/error"
TOOL_IS_ERROR_EXIT = 5  # the Inspector CLI's exit status for a result with isError: true


def inspect(tmp_path: Path, tool_name: str, **arguments: str) -> tuple[int, dict[str, Any] | None, str]:
    """Call one tool through ``mcp-inspector --cli`` over stdio: (exit status, printed result, stderr)."""
    # TypeScript clients do not pass the parent's environment to the server: flags and -e do.
    server = [sys.executable, "-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db")]
    env_flags = ["-e", f"DATAMACHINE_DATA_DIR={tmp_path / 'data'}", "-e", f"XDG_DATA_HOME={tmp_path / 'xdg'}"]
    args = [f"{k}={v}" for k, v in arguments.items()]
    command = [
        tool("mcp-inspector"),
        "--cli",
        *env_flags,
        *server,
        "--method",
        "tools/call",
        "--tool-name",
        tool_name,
        *(["--tool-arg", *args] if args else []),
    ]
    proc = subprocess.run(
        command,
        env=node_env({"MCP_CATALOG_PATH": str(tmp_path / "inspector.json")}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, result, proc.stderr


def assert_coded_error(result: dict[str, Any] | None, stderr: str, code: str) -> dict[str, Any]:
    assert result is not None, f"the Inspector printed no result: {stderr}"
    assert "must have required property" not in stderr and "Structured content" not in stderr, stderr
    assert result["isError"] is True
    assert "structuredContent" not in result
    assert result["content"][0]["type"] == "text"
    assert result["content"][0]["text"].startswith(f"{code}: "), result["content"]
    envelope = result["_meta"][ERROR_META_KEY]
    assert envelope["code"] == code and result["content"][0]["text"] == f"{code}: {envelope['message']}"
    return envelope


def test_a_not_found_error_reaches_the_inspector_as_written(tmp_path):
    status, result, stderr = inspect(tmp_path, "run-flow", flow_id="999")
    assert status == TOOL_IS_ERROR_EXIT, stderr
    envelope = assert_coded_error(result, stderr, "flow_not_found")
    assert envelope["data"] == {"flow_id": 999}


def test_an_invalid_argument_reaches_the_inspector_as_written(tmp_path):
    status, result, stderr = inspect(tmp_path, "run-flow", flow_id="not-a-number")
    assert status == TOOL_IS_ERROR_EXIT, stderr
    envelope = assert_coded_error(result, stderr, "invalid_input")
    assert [e["field"] for e in envelope["data"]["errors"]] == ["flow_id"]


def test_a_successful_call_keeps_its_structured_content(tmp_path):
    status, result, stderr = inspect(tmp_path, "create-agent", agent_slug="inspected")
    assert status == 0, stderr
    assert result is not None and result.get("isError") is False and "_meta" not in result
    assert result["structuredContent"]["agent_slug"] == "inspected"
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
