"""tools/list per principal, published schemas and annotations, input validation of every tool.

See docs/access.md, Tool visibility, and docs/architecture.md, How a call runs.
"""

from __future__ import annotations

import dataclasses

import pytest
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.registry import load_all as load_abilities
from tests.conftest import as_token, call, changed_tables, connect, fail, log_rows, table_rows

pytestmark = pytest.mark.anyio

# tool -> (read_only, destructive, idempotent), written out here so a changed hint shows up
ANNOTATIONS = {
    "create-agent": (False, False, False),
    "get-agent": (True, False, True),
    "list-agents": (True, False, True),
    "update-agent": (False, True, True),
    "rename-agent": (False, False, True),
    "delete-agent": (False, True, True),
    "grant-agent-access": (False, False, True),
    "revoke-agent-access": (False, True, True),
    "list-agent-access": (True, False, True),
    "create-agent-token": (False, False, False),
    "list-agent-tokens": (True, False, True),
    "revoke-agent-token": (False, True, True),
    "write-to-log": (False, False, False),
    "read-logs": (True, False, True),
    "get-log-metadata": (True, False, True),
    "clear-logs": (False, True, True),
    "get-settings": (True, False, True),
    "update-settings": (False, True, True),
    "whoami": (True, False, True),
}
# The 19 tools of the foundation; tools added later must follow the same rules (checked on every listed tool).
ALL = set(ANNOTATIONS)
SETTINGS_TOOLS = {"get-settings", "update-settings"}
READ_SCOPE_VISIBLE = {
    "get-agent",
    "list-agents",
    "create-agent-token",
    "list-agent-tokens",
    "revoke-agent-token",
    "read-logs",
    "get-log-metadata",
    "whoami",
}


async def _all_names(client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


async def _names(client) -> set[str]:
    """The foundation tools listed to this client."""
    return await _all_names(client) & ALL


async def test_owner_sees_all_tools(runtime, owner):
    tools = (await owner.list_tools()).tools
    names = [t.name for t in tools]
    assert len(names) == len(set(names))
    assert set(names) == set(load_abilities())
    assert set(names) >= ALL and len(ALL) == 19


async def test_every_tool_is_fully_described(owner):
    for tool in (await owner.list_tools()).tools:
        assert tool.title == tool.name[:1].upper() + tool.name[1:].replace("-", " ")
        assert tool.description and len(tool.description) <= 200, tool.name
        schema = tool.input_schema
        assert schema["type"] == "object"
        assert schema.get("additionalProperties") is False, tool.name  # unknown fields are rejected
        _all_properties_described(tool.name, schema, schema.get("$defs", {}))
        ann = tool.annotations
        assert ann is not None
        hints = (ann.read_only_hint, ann.destructive_hint, ann.idempotent_hint, ann.open_world_hint)
        assert all(isinstance(h, bool) for h in hints), tool.name
        if tool.name in ANNOTATIONS:
            assert hints[:3] == ANNOTATIONS[tool.name], tool.name
            assert ann.open_world_hint is False
        assert tool.output_schema is not None and tool.output_schema["type"] == "object", tool.name


def _all_properties_described(tool, schema, defs, path="") -> None:
    for name, prop in schema.get("properties", {}).items():
        where = f"{tool}:{path}{name}"
        assert prop.get("description"), f"{where} has no description"
        _nested(tool, prop, defs, f"{path}{name}.")
    for name, sub in defs.items():
        if "properties" in sub:
            _all_properties_described(tool, sub, {}, f"$defs.{name}.")


def _nested(tool, prop, defs, path) -> None:
    for key in ("items", "additionalProperties"):
        if isinstance(prop.get(key), dict):
            _nested(tool, prop[key], defs, path)
    for key in ("anyOf", "oneOf", "allOf"):
        for option in prop.get(key, []):
            _nested(tool, option, defs, path)
    if "properties" in prop:
        _all_properties_described(tool, prop, defs, path)


async def test_read_scope_token_sees_only_reads_and_self_service(runtime, owner):
    reader = await as_token(runtime, user_id=1, capabilities=["read"])
    async with connect(runtime, reader) as c:
        names = await _names(c)
        every = await _all_names(c)
    assert names == READ_SCOPE_VISIBLE
    assert "update-agent" not in names and not names & SETTINGS_TOOLS
    registry = load_abilities()
    assert all(registry[name].level in ("any", "viewer") for name in every)


async def test_scopes_and_toolsets_narrow_the_list(runtime, owner):
    runner = await as_token(runtime, user_id=2, capabilities=["run"])
    async with connect(runtime, runner) as c:
        assert await _names(c) == READ_SCOPE_VISIBLE | {"write-to-log"}
    manager = await as_token(runtime, user_id=2, capabilities=["manage"])
    async with connect(runtime, manager) as c:
        assert await _names(c) == ALL - SETTINGS_TOOLS
    logs_only = await as_token(runtime, user_id=1, capabilities=["admin", "toolset:logs"])
    async with connect(runtime, logs_only) as c:
        assert await _names(c) == {"write-to-log", "read-logs", "get-log-metadata", "clear-logs"}


async def test_non_admin_user_sees_no_settings_tools(runtime):
    async with connect(runtime, Principal(user_id=2, transport="http")) as c:
        assert await _names(c) == ALL - SETTINGS_TOOLS


async def test_calling_a_hidden_tool_is_permission_denied_and_audited(runtime, owner):
    reader = await as_token(runtime, user_id=2, capabilities=["read"])
    async with connect(runtime, reader) as c:
        for tool, args in (
            ("update-settings", {"settings": {"log_level": "debug"}}),
            ("create-agent", {"agent_slug": "x"}),
        ):
            before = await table_rows(runtime)
            # refused before the input is looked at: even an invalid input gets permission_denied
            err = await fail(c, tool, {**args, "bogus": 1}, "permission_denied")
            assert "whoami" in err["message"]
            changed = changed_tables(before, await table_rows(runtime))
            assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1
            row = (await log_rows(runtime))[-1]
            assert row["level"] == "warning" and row["message"] == f"{tool} denied: permission_denied"
            assert row["context"]["ability"] == tool and row["context"]["reason_code"] == "permission_denied"
            assert row["context"]["actor_token_id"] == reader.token_id


# --- --toolsets / --read-only (process flags) --------------------------------------------------


async def test_toolsets_flag_removes_other_tools(runtime):
    rt = dataclasses.replace(runtime, toolsets=frozenset({"logs", "system"}))
    async with connect(rt) as c:
        assert await _names(c) == {"write-to-log", "read-logs", "get-log-metadata", "clear-logs", "whoami"}
        registry = load_abilities()
        assert {registry[name].toolset for name in await _all_names(c)} == {"logs", "system"}
        me = await call(c, "whoami", {})
        assert me["toolsets"] == ["logs", "system"]
        before = await table_rows(runtime)
        # excluded tools do not exist in this process (not a permission denial)
        with pytest.raises(MCPError, match="Unknown tool: create-agent"):
            await c.call_tool("create-agent", {"agent_slug": "x"})
        assert await table_rows(runtime) == before
        # resources whose twin does not exist in this process are not offered either
        resources = {str(r.uri) for r in (await c.list_resources()).resources}
        assert {"datamachine://whoami", "datamachine://logs/metadata"} <= resources
        assert "datamachine://agents" not in resources
        templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
        assert "datamachine://logs{?level,agent_id,job_id,per_page,offset}" in templates
        assert "datamachine://agents/{agent_slug}" not in templates


async def test_read_only_flag_exposes_only_read_only_tools(runtime):
    rt = dataclasses.replace(runtime, read_only=True)
    async with connect(rt) as c:
        assert await _names(c) == {t for t, ann in ANNOTATIONS.items() if ann[0]}
        assert await _all_names(c) == {slug for slug, a in load_abilities().items() if a.read_only}
        me = await call(c, "whoami", {})
        assert me["read_only"] is True


# --- input validation of every tool ----------------------------------------------------------

BAD_INPUTS = [
    ("create-agent", {"agent_slug": 5}, "agent_slug", "invalid_input"),
    ("create-agent", {"agent_name": "x"}, "agent_slug", "invalid_input"),
    ("create-agent", {"agent_slug": "fresh", "color": "red"}, "color", "invalid_input"),
    ("get-agent", {"agent_id": 0}, "agent_id", "invalid_input"),
    ("get-agent", {"agent_id": "1.0"}, "agent_id", "invalid_input"),
    ("get-agent", {"agent_id": 1, "verbose": True}, "verbose", "invalid_input"),
    ("list-agents", {"per_page": 101}, "per_page", "invalid_input"),
    ("list-agents", {"scope": "everything"}, "scope", "invalid_input"),
    ("list-agents", {"page": 2}, "page", "invalid_input"),
    ("update-agent", {"agent_id": 1, "status": "paused"}, "status", "invalid_input"),
    ("update-agent", {"agent_id": 1, "agent_name": "x", "slug": "y"}, "slug", "invalid_input"),
    ("rename-agent", {"old_slug": "bot"}, "new_slug", "invalid_input"),
    ("rename-agent", {"old_slug": "bot", "new_slug": "x", "force": True}, "force", "invalid_input"),
    ("delete-agent", {"agent_id": -1}, "agent_id", "invalid_input"),
    ("delete-agent", {"agent_id": 1, "cascade": False}, "cascade", "invalid_input"),
    ("grant-agent-access", {"agent_id": 1, "user_id": 0}, "user_id", "invalid_input"),
    ("grant-agent-access", {"agent_id": 1, "user_id": 2, "role": "owner"}, "role", "invalid_input"),
    ("grant-agent-access", {"agent_id": 1, "user_id": 2, "expires": 5}, "expires", "invalid_input"),
    ("revoke-agent-access", {"agent_id": 1}, "user_id", "invalid_input"),
    ("revoke-agent-access", {"agent_id": 1, "user_id": 2, "why": "x"}, "why", "invalid_input"),
    ("list-agent-access", {"agent_id": 1, "role": "superuser"}, "role", "invalid_input"),
    ("list-agent-access", {"agent_id": 1, "limit": 5}, "limit", "invalid_input"),
    ("create-agent-token", {"expires_in": 10}, "expires_in", "invalid_input"),
    ("create-agent-token", {"capabilities": "read"}, "capabilities", "invalid_input"),
    ("create-agent-token", {"label": "x", "secret": "y"}, "secret", "invalid_input"),
    ("list-agent-tokens", {"include_inactive": "yes"}, "include_inactive", "invalid_input"),
    ("list-agent-tokens", {"all": True}, "all", "invalid_input"),
    ("revoke-agent-token", {"token_id": "1.0"}, "token_id", "invalid_input"),
    ("revoke-agent-token", {}, "token_id", "invalid_input"),
    ("revoke-agent-token", {"token_id": 1, "reason": "x"}, "reason", "invalid_input"),
    ("write-to-log", {"level": "loud", "message": "x"}, "level", "invalid_level"),
    ("write-to-log", {"level": "info"}, "message", "invalid_input"),
    ("write-to-log", {"level": "info", "message": "x", "tags": []}, "tags", "invalid_input"),
    ("read-logs", {"per_page": 501}, "per_page", "invalid_input"),
    ("read-logs", {"since": "yesterday"}, "since", "invalid_input"),
    ("read-logs", {"page": 1}, "page", "invalid_input"),
    ("get-log-metadata", {"agent_id": 0}, "agent_id", "invalid_input"),
    ("get-log-metadata", {"agent_id": 1, "level": "info"}, "level", "invalid_input"),
    ("clear-logs", {"agent_id": "all"}, "agent_id", "invalid_input"),
    ("clear-logs", {"confirm": "yes"}, "confirm", "invalid_input"),
    ("get-settings", {"keys": ["log_level"]}, "keys", "invalid_input"),
    ("update-settings", {}, "settings", "invalid_input"),
    ("update-settings", {"settings": {}}, "settings", "invalid_input"),
    ("update-settings", {"settings": {"log_level": "debug"}, "dry_run": True}, "dry_run", "invalid_input"),
    ("whoami", {"verbose": True}, "verbose", "invalid_input"),
]


@pytest.mark.parametrize(("tool", "args", "field", "code"), BAD_INPUTS, ids=[f"{b[0]}-{b[2]}" for b in BAD_INPUTS])
async def test_bad_input_names_the_field_and_writes_nothing(runtime, owner, tool, args, field, code):
    await call(owner, "create-agent", {"agent_slug": "bot"})
    await call(owner, "create-agent-token", {"agent_slug": "bot"})
    before = await table_rows(runtime)
    err = await fail(owner, tool, args, code)
    assert field in err["message"]
    assert err["message"].startswith(f"Invalid input for {tool}: ")
    assert field in [e["field"] for e in err["data"]["errors"]]
    assert all(set(e) <= {"field", "message", "suggestions"} for e in err["data"]["errors"])
    assert await table_rows(runtime) == before


async def test_every_tool_has_a_bad_input_case():
    assert {b[0] for b in BAD_INPUTS} == ALL


@pytest.mark.parametrize(
    ("tool", "args", "field"),
    [
        ("create-agent", {"agent_slug": "big", "agent_config": {"blob": "x" * (1024 * 1024)}}, "agent_config"),
        ("update-settings", {"settings": {"default_model": "x" * (1024 * 1024)}}, "settings"),
        ("create-agent-token", {"capabilities": ["read"] * 200_000}, "capabilities"),
    ],
)
async def test_object_inputs_over_one_mib_are_too_large(runtime, owner, tool, args, field):
    before = await table_rows(runtime)
    err = await fail(owner, tool, args, "input_too_large")
    assert err["data"]["field"] == field and err["data"]["bytes"] > 1024 * 1024
    assert field in err["message"]
    assert await table_rows(runtime) == before
