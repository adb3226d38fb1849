"""datamachine:// resources mirror their read-only tool twins; change notifications (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import json

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.server.errors import RESOURCE_NOT_FOUND
from tests.conftest import call, changed_tables, connect, log_rows, table_rows

pytestmark = [
    pytest.mark.anyio,
    # legacy-era subscriptions are what handshake clients use; the SDK flags them for 2026 clients
    pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed"),
]

USER2 = Principal(user_id=2, transport="http")


async def _read(client, uri):
    result = await client.read_resource(uri, cache_mode="bypass")
    assert len(result.contents) == 1
    content = result.contents[0]
    assert str(content.uri) == uri and content.mime_type == "application/json"
    return json.loads(content.text)


@pytest.fixture
async def seeded(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "bot", "agent_config": {"description": "Bot"}})
    await call(owner, "create-agent", {"agent_slug": "other"})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    for level in ("info", "warning", "error"):
        await call(
            owner, "write-to-log", {"level": level, "message": f"{level} row", "context": {"agent_id": 1, "job_id": 5}}
        )
    async with connect(runtime, USER2) as c:
        await call(c, "write-to-log", {"level": "warning", "message": "user2 row"})


async def test_resource_listing(owner):
    resources = {str(r.uri): r for r in (await owner.list_resources()).resources}
    assert {"datamachine://whoami", "datamachine://agents", "datamachine://logs/metadata"} <= set(resources)
    templates = {t.uri_template for t in (await owner.list_resource_templates()).resource_templates}
    assert {
        "datamachine://agents/{agent_slug}",
        "datamachine://logs{?level,agent_id,job_id,per_page,offset}",
    } <= templates
    for r in resources.values():
        assert r.mime_type == "application/json" and r.description and r.title


@pytest.mark.parametrize(
    "narrowed",
    [{"toolsets": frozenset({"chat"})}, {"read_only": True}, {"toolsets": frozenset({"logs"}), "tools": frozenset()}],
    ids=["chat", "read-only", "logs"],
)
async def test_resources_do_not_depend_on_the_tool_selection(runtime, owner, narrowed):
    """--toolsets / --tools / --read-only narrow the tool list; every resource stays readable."""
    full = {str(r.uri) for r in (await owner.list_resources()).resources}
    templates = {t.uri_template for t in (await owner.list_resource_templates()).resource_templates}
    async with connect(dataclasses.replace(runtime, **narrowed)) as c:
        assert {str(r.uri) for r in (await c.list_resources()).resources} == full
        assert {t.uri_template for t in (await c.list_resource_templates()).resource_templates} == templates
        assert "whoami" not in {t.name for t in (await c.list_tools()).tools} or "read_only" in narrowed
        assert (await _read(c, "datamachine://whoami"))["user_id"] == 1
        assert "agents" in await _read(c, "datamachine://agents")


@pytest.mark.parametrize("principal", [None, USER2], ids=["owner", "user2"])
async def test_resources_equal_their_twins(runtime, seeded, principal):
    pairs = [
        ("datamachine://whoami", "whoami", {}),
        ("datamachine://agents", "list-agents", {}),
        ("datamachine://agents/bot", "get-agent", {"agent_slug": "bot"}),
        ("datamachine://logs", "read-logs", {}),
        ("datamachine://logs?level=warning", "read-logs", {"level": "warning"}),
        (
            "datamachine://logs?agent_id=1&job_id=5&per_page=2&offset=1",
            "read-logs",
            {"agent_id": 1, "job_id": 5, "per_page": 2, "offset": 1},
        ),
        ("datamachine://logs/metadata", "get-log-metadata", {}),
    ]
    kwargs = {} if principal is None else {"principal": principal}
    async with connect(runtime, **kwargs) as c:
        before = await table_rows(runtime)
        for uri, tool, args in pairs:
            assert await _read(c, uri) == await call(c, tool, args), uri
        assert await table_rows(runtime) == before  # reads write nothing
    if principal is USER2:
        async with connect(runtime, USER2) as c:
            agents = await _read(c, "datamachine://agents")
            assert [a["agent_slug"] for a in agents["agents"]] == ["bot"]
            logs = await _read(c, "datamachine://logs?per_page=500")
            assert "user2 row" in {i["message"] for i in logs["items"]}


async def test_unknown_objects_are_resource_not_found(runtime, seeded, owner):
    before = await table_rows(runtime)
    for uri in ("datamachine://agents/ghost", "datamachine://nothing", "datamachine://agents/bot/extra"):
        with pytest.raises(MCPError) as exc:
            await owner.read_resource(uri, cache_mode="bypass")
        assert exc.value.code == RESOURCE_NOT_FOUND == -32002, uri
    assert await table_rows(runtime) == before


async def test_unreadable_resource_is_refused_with_the_twins_code(runtime, seeded):
    async with connect(runtime, USER2) as c:
        before = await table_rows(runtime)
        with pytest.raises(MCPError) as exc:
            await c.read_resource("datamachine://agents/other", cache_mode="bypass")
        assert exc.value.message.startswith("agent_access_denied: ")
        # the same denial trail as the twin: one warning row
        changed = changed_tables(before, await table_rows(runtime))
        assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1
        assert (await log_rows(runtime))[-1]["message"] == "get-agent denied: agent_access_denied"
        with pytest.raises(MCPError) as exc:
            await c.read_resource("datamachine://logs?agent_id=2", cache_mode="bypass")
        assert exc.value.message.startswith("agent_access_denied: ")
        with pytest.raises(MCPError) as exc:
            await c.read_resource("datamachine://logs?per_page=1000", cache_mode="bypass")
        assert exc.value.message.startswith("invalid_input: ") and "per_page" in exc.value.message


class Inbox:
    """Collects server notifications delivered to a client."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self._event = anyio.Event()

    async def __call__(self, message) -> None:
        if isinstance(message, Exception):
            raise message
        self.items.append(message)
        self._event.set()
        self._event = anyio.Event()

    def of(self, kind):
        return [m for m in self.items if isinstance(m, kind)]

    async def wait_for(self, kind, n=1):
        with anyio.fail_after(5):
            while len(self.of(kind)) < n:
                await self._event.wait()
        return self.of(kind)


async def test_subscription_delivers_resource_updated(runtime, seeded):
    inbox = Inbox()
    async with connect(runtime, message_handler=inbox) as c:
        await c.subscribe_resource("datamachine://agents/bot")
        await call(c, "update-agent", {"agent_slug": "other", "agent_name": "Other"})  # not subscribed
        await call(c, "get-agent", {"agent_slug": "bot"})  # reads notify nothing
        await call(c, "update-agent", {"agent_slug": "bot", "agent_name": "Bot 2"})
        updated = await inbox.wait_for(types.ResourceUpdatedNotification)
        assert [str(n.params.uri) for n in updated] == ["datamachine://agents/bot"]
        assert (await _read(c, "datamachine://agents/bot"))["agent"]["agent_name"] == "Bot 2"

        await c.unsubscribe_resource("datamachine://agents/bot")
        await call(c, "update-agent", {"agent_slug": "bot", "agent_name": "Bot 3"})
        await call(c, "create-agent", {"agent_slug": "marker"})
        await inbox.wait_for(types.ResourceListChangedNotification)
        assert len(inbox.of(types.ResourceUpdatedNotification)) == 1


async def test_create_and_delete_send_list_changed(runtime, owner):
    inbox = Inbox()
    async with connect(runtime, message_handler=inbox) as c:
        await call(c, "create-agent", {"agent_slug": "fresh"})
        await inbox.wait_for(types.ResourceListChangedNotification)
        await call(c, "delete-agent", {"agent_slug": "fresh"})
        await inbox.wait_for(types.ResourceListChangedNotification, 2)
