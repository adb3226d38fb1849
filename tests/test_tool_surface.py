"""The tool surface an assistant carries: the default core list, --toolsets/--tools, lean schemas, icons,
and resource links in results."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.json_schema import lean, share_repeated
from datamachine_mcp.abilities.registry import TOOLSETS
from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.server.bootstrap import ProcessConfig
from datamachine_mcp.server.docs import listing_bytes
from tests.conftest import call, connect
from tests.jobs_support import echo_step, make_flow

pytestmark = pytest.mark.anyio

CORE = {slug for slug, a in load_abilities().items() if a.core}
JOURNEY = {"whoami", "create-agent", "list-agents", "create-pipeline", "get-pipelines", "add-pipeline-step"}
JOURNEY |= {"get-handlers", "get-handler-config-fields", "create-flow", "get-flows", "update-flow-step"}
JOURNEY |= {"run-flow", "wait-for-job", "get-jobs", "cancel-job", "retry-job", "fail-job", "schedule-flow"}
JOURNEY |= {"pause-flow", "read-logs", "list-pending-actions", "resolve-pending-action", "mark-processed"}
JOURNEY |= {"check-processed-item"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMACHINE_")}
    return {
        **env,
        "XDG_DATA_HOME": str(tmp_path / "xdg"),
        "DATAMACHINE_DATA_DIR": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _server(tmp_path: Path, *args: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), *args],
        env=_env(tmp_path, **env),
    )


# --- the default list -------------------------------------------------------------------------


def test_core_is_the_default_and_covers_the_journey():
    assert ProcessConfig(db="x", data_dir=Path(".")).toolsets == frozenset({"core"})
    assert CORE == JOURNEY and len(CORE) <= 24


async def test_default_list_is_core_and_every_tool_is_fully_described(runtime):
    core_runtime = dataclasses.replace(runtime, toolsets=frozenset({"core"}))
    async with connect(core_runtime) as c:
        tools = (await c.list_tools()).tools
    assert {t.name for t in tools} == CORE and len(tools) <= 24
    for tool in tools:
        assert tool.title and tool.description, tool.name
        assert tool.annotations is not None and tool.annotations.title == tool.title
        assert tool.icons and tool.icons[0].src.startswith("data:image/svg+xml,"), tool.name
        _described(tool.name, tool.input_schema)
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"


def _described(tool: str, schema: dict[str, Any], path: str = "") -> None:
    """Every property, at any depth (and in $defs), has a description."""
    for name, prop in schema.get("properties", {}).items():
        assert prop.get("description"), f"{tool}: {path}{name} has no description"
        _described(tool, prop, f"{path}{name}.")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _described(tool, schema[key], path)
    for option in schema.get("anyOf", []):
        _described(tool, option, path)
    for name, sub in schema.get("$defs", {}).items():
        _described(tool, sub, f"$defs.{name}.")


async def test_listing_fits_the_byte_budgets(runtime):
    async with connect(dataclasses.replace(runtime, toolsets=frozenset({"core"}))) as c:
        core = listing_bytes((await c.list_tools()).tools)
    async with connect(runtime) as c:
        every = listing_bytes((await c.list_tools()).tools)
    assert core["definitions"] <= 24_000 and every["definitions"] <= 60_000, (core, every)
    assert core["definitions"] + core["icons"] <= 24_000  # core fits even counting its icons
    assert every["tools"] == len(load_abilities())


async def test_stdio_default_lists_core_and_says_how_to_list_the_rest(tmp_path):
    async with Client(_server(tmp_path), mode="legacy") as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert names == CORE
        note = c.instructions or ""
        assert "Enabled: core." in note and "--toolsets all" in note and "DATAMACHINE_TOOLS" in note
        assert all(t in note for t in TOOLSETS)
        assert c.server_info is not None and c.server_info.icons
        me = await call(c, "whoami")
        assert me["enabled"] == ["core"] and "--toolsets all" in me["enable_hint"]
        assert {"chat", "settings"} <= set(me["not_listed"])
        # a tool outside the list is unknown here, and the answer says how to list it
        with pytest.raises(MCPError, match=r"Unknown tool: get-settings\. .*--toolsets all"):
            await c.call_tool("get-settings", {})
        # resources do not depend on the tool list: the agents resources read through get-agent
        created = await call(c, "create-agent", {"agent_slug": "core-bot"})
        read = await c.read_resource("datamachine://agents/core-bot", cache_mode="bypass")
        assert json.loads(read.contents[0].text)["agent"]["agent_id"] == created["agent_id"]


async def test_toolsets_and_tools_flags_add_to_the_list(tmp_path):
    abilities = load_abilities()
    chat = {slug for slug, a in abilities.items() if a.toolset == "chat"}
    async with Client(_server(tmp_path, "--toolsets", "core,chat", "--tools", "queue-add"), mode="legacy") as c:
        assert {t.name for t in (await c.list_tools()).tools} == CORE | chat | {"queue-add"}
        me = await call(c, "whoami")
        assert me["enabled"] == ["core", "chat", "tool:queue-add"]
    env = {"DATAMACHINE_TOOLSETS": "all"}
    async with Client(_server(tmp_path, **env), mode="legacy") as c:
        assert {t.name for t in (await c.list_tools()).tools} == set(abilities)
        me = await call(c, "whoami")
        assert me["enabled"] == ["all"] and me["enable_hint"] is None and me["not_listed"] == []


def test_unknown_toolset_or_tool_stops_the_server_naming_the_valid_ones(tmp_path):
    cases = {
        "toolset": (["--toolsets", "core,chats"], "unknown toolsets: chats (choose core, all or any of agents"),
        "tool": (["--tools", "run-flow,run-flows"], "unknown tools: run-flows"),
        "env": ([], "unknown toolsets: everything"),
    }
    for name, (args, message) in cases.items():
        env = _env(tmp_path, **({"DATAMACHINE_TOOLSETS": "everything"} if name == "env" else {}))
        done = subprocess.run(
            [sys.executable, "-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 2 and done.stdout == "", (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)


# --- lean schemas -----------------------------------------------------------------------------


def _keywords(node: Any, key: str) -> list[Any]:
    """Values of schema keyword ``key`` anywhere (property names are not keywords)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            if k == "properties" and isinstance(v, dict):
                for sub in v.values():
                    found += _keywords(sub, key)
            elif k != "properties":
                found += _keywords(v, key)
    elif isinstance(node, list):
        for v in node:
            found += _keywords(v, key)
    return found


def test_published_input_schemas_are_lean():
    for slug, ability in load_abilities().items():
        schema = ability.input_schema
        text = json.dumps(schema)
        assert not _keywords(schema, "title"), slug
        assert None not in _keywords(schema, "default"), slug
        assert True not in _keywords(schema, "additionalProperties"), slug
        assert "x-keep-null" not in text and "x-unpublished" not in text, slug
        if slug != "update-pipeline-step":  # its explicit null means "back to the default"
            assert '{"type": "null"}' not in text, slug
    step = load_abilities()["update-pipeline-step"].input_schema["properties"]
    assert {"type": "null"} in step["temperature"]["anyOf"]
    assert "handler_slug" not in step  # refused with its own code, not published


def test_published_output_schemas_carry_no_titles():
    """Clients validate every result against the output schema; pydantic's titles only cost them time."""
    for slug, ability in load_abilities().items():
        assert not _keywords(ability.output_schema, "title"), slug
    # a property named "title" (a chat session's) is a property, not a keyword: it stays
    assert '"title": {' in json.dumps(load_abilities()["get-chat-session"].output_schema)


async def test_null_for_an_optional_field_is_still_accepted_as_leaving_it_out(runtime, owner):
    # The schema no longer offers null; a client that sends it anyway is answered as before.
    out = await call(owner, "list-agents", {"status": None, "per_page": 5})
    assert out["total"] == 0
    step = await make_flow(owner, [echo_step()])
    psid = step["pipeline_step_ids"][0]
    changed = await call(owner, "update-pipeline-step", {"pipeline_step_id": psid, "label": None})
    assert changed["pipeline_step_id"] == psid


def test_repeated_sub_schemas_are_shared_once_under_defs():
    shape = {"type": "object", "properties": {"a": {"type": "string", "description": "A long enough field " * 4}}}
    schema = {
        "type": "object",
        "properties": {
            "first": {**shape, "description": "First"},
            "second": {"type": "array", "items": shape, "description": "Second"},
        },
    }
    shared = share_repeated(schema)
    assert shared["properties"]["first"] == {"$ref": "#/$defs/s1", "description": "First"}
    assert shared["properties"]["second"]["items"] == {"$ref": "#/$defs/s1"}
    assert shared["$defs"]["s1"] == shape
    validator = jsonschema.Draft202012Validator(shared)  # what the SDK client validates with
    assert validator.is_valid({"first": {"a": "x"}, "second": [{"a": "y"}]})
    assert not validator.is_valid({"first": {"a": 5}})
    assert len(json.dumps(shared)) < len(json.dumps(schema))
    # shaping keeps every described field and drops the null branch of an optional one
    raw = {
        "title": "M",
        "type": "object",
        "properties": {"x": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "description": "X"}},
    }
    assert lean(raw) == {"type": "object", "properties": {"x": {"type": "integer", "description": "X"}}}


# --- resource links ---------------------------------------------------------------------------


def _links(result: types.CallToolResult) -> list[str]:
    assert not result.is_error, result.content[0]
    assert isinstance(result.content[0], types.TextContent)  # the JSON text stays first
    return [str(c.uri) for c in result.content if isinstance(c, types.ResourceLink)]


async def test_results_link_the_resources_they_name(runtime, owner):
    created = await owner.call_tool("create-pipeline", {"pipeline_name": "L", "workflow": {"steps": [echo_step()]}})
    out = created.structured_content
    assert _links(created) == [f"datamachine://pipelines/{out['pipeline_id']}", f"datamachine://flows/{out['flow_id']}"]
    bare = await owner.call_tool("create-pipeline", {"pipeline_name": "No flow"})
    assert _links(bare) == [f"datamachine://pipelines/{bare.structured_content['pipeline_id']}"]
    flow = await owner.call_tool("create-flow", {"pipeline_id": out["pipeline_id"]})
    assert _links(flow) == [f"datamachine://flows/{flow.structured_content['flow_id']}"]

    run = await owner.call_tool("run-flow", {"flow_id": out["flow_id"]})
    job_id = run.structured_content["job_id"]
    assert _links(run) == [f"datamachine://jobs/{job_id}", f"datamachine://flows/{out['flow_id']}"]
    link = next(c for c in run.content if isinstance(c, types.ResourceLink))
    assert link.name == f"job-{job_id}" and link.mime_type == "application/json"
    body = json.loads((await owner.read_resource(str(link.uri), cache_mode="bypass")).contents[0].text)
    assert body["jobs"][0]["job_id"] == job_id

    single = await owner.call_tool("get-jobs", {"job_id": job_id})
    assert _links(single) == [f"datamachine://jobs/{job_id}"]
    await call(owner, "run-flow", {"flow_id": out["flow_id"]})
    assert _links(await owner.call_tool("get-jobs", {})) == []  # a list links nothing
    waited = await owner.call_tool("wait-for-job", {"job_id": job_id, "timeout_seconds": 0})
    assert _links(waited) == [f"datamachine://jobs/{job_id}"]
    # structured content is unchanged by the links
    assert waited.structured_content is not None and set(waited.structured_content) >= {"job", "final"}


def test_the_typescript_inspector_reads_every_lean_tool_definition(tmp_path):
    """The Inspector CLI (TypeScript SDK, which compiles schemas with Ajv) lists all tools and calls one whose
    result carries resource links."""
    from tests.node_tools import node_env, tool

    server = [sys.executable, "-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), "--toolsets", "all"]
    env_flags = ["-e", f"DATAMACHINE_DATA_DIR={tmp_path / 'data'}", "-e", f"XDG_DATA_HOME={tmp_path / 'xdg'}"]

    def inspect(*method: str) -> dict[str, Any]:
        done = subprocess.run(
            [tool("mcp-inspector"), "--cli", *env_flags, *server, "--method", *method],
            env=node_env({"MCP_CATALOG_PATH": str(tmp_path / "inspector.json")}),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    listed = inspect("tools/list")["tools"]
    assert {t["name"] for t in listed} == set(load_abilities())
    assert all(t["icons"][0]["src"].startswith("data:image/svg+xml,") for t in listed)
    made = inspect("tools/call", "--tool-name", "create-pipeline", "--tool-arg", "pipeline_name=Inspected")
    assert made["structuredContent"]["pipeline_name"] == "Inspected"
    assert [c["uri"] for c in made["content"] if c["type"] == "resource_link"] == [
        f"datamachine://pipelines/{made['structuredContent']['pipeline_id']}"
    ]
    prompts = inspect("prompts/list")["prompts"]
    assert {p["name"] for p in prompts} >= {"feed-digest", "diagnose-flow", "review-approvals", "explain-job"}
