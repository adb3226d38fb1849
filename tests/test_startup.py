"""Starting a server: tools are listed from cached declarations without loading the database layer or the
ability modules; the in-process engine starts once the first answers are out, and still runs schedules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from datamachine_mcp.abilities import tool_cache
from datamachine_mcp.abilities.catalog import Listing
from datamachine_mcp.abilities.registry import load_all
from datamachine_mcp.server.tool_listing import tool_definition
from tests.conftest import call
from tests.jobs_support import echo_step, make_flow, wait_until

pytestmark = pytest.mark.anyio

# What a process has imported once it answered its first tools/list and watched for other processes'
# changes (printed as JSON).
LIST_AND_REPORT = """
import asyncio, json, sys
from pathlib import Path
from mcp import Client
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime, stdio_identity
from datamachine_mcp.server.change_watch import ChangeWatch

async def main(db, data, toolsets):
    cfg = ProcessConfig(db=db, data_dir=Path(data), toolsets=None if toolsets == "all" else frozenset({toolsets}))
    runtime = await open_runtime(cfg)
    app = DataMachineServer(runtime, runtime.catalog, load_resources(), await stdio_identity(runtime, cfg))
    async with Client(app.server, mode="legacy") as client:
        names = [tool.name for tool in (await client.list_tools()).tools]
        await ChangeWatch(app.notifications, runtime.db).poll()  # what an idle process does every second
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic") or m.startswith(
            ("datamachine_mcp.abilities.", "datamachine_mcp.engine.", "datamachine_mcp.storage.")))
        whoami = (await client.call_tool("whoami", {})).structured_content
    print(json.dumps({"tools": names, "loaded": loaded, "whoami": whoami}))

asyncio.run(main(*sys.argv[1:]))
"""


def _list_in_a_new_process(tmp_path: Path, toolsets: str = "all") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMACHINE_")}
    done = subprocess.run(
        [sys.executable, "-c", LIST_AND_REPORT, str(tmp_path / "dm.db"), str(tmp_path / "data"), toolsets],
        env={**env, "XDG_DATA_HOME": str(tmp_path / "xdg")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_start_with_cached_listings_lists_every_tool_without_the_database_layer(tmp_path):
    first = _list_in_a_new_process(tmp_path)  # creates and migrates the database, writes the listings
    second = _list_in_a_new_process(tmp_path)
    assert second["tools"] == first["tools"] == list(load_all())
    heavy = [m for m in second["loaded"] if m.split(".")[0] in ("sqlalchemy", "alembic")]
    assert heavy == [], heavy
    # no module holding tool handlers or the engine: each loads when first needed
    handlers = {
        "datamachine_mcp.abilities.agents",
        "datamachine_mcp.abilities.pipelines",
        "datamachine_mcp.engine.host",
    }
    assert not handlers & set(second["loaded"])
    assert "datamachine_mcp.storage.models" not in second["loaded"]
    # whoami reads the same declarations: every toolset listed, nothing hidden
    assert second["whoami"] == first["whoami"]
    counts = second["whoami"]["toolsets"]
    assert len(counts) == 9 and all(t["listed"] == t["total"] for t in counts)


def test_the_core_list_from_cached_listings_tells_what_is_hidden(tmp_path):
    _list_in_a_new_process(tmp_path, "core")
    core = _list_in_a_new_process(tmp_path, "core")
    assert core["tools"] == [slug for slug, a in load_all().items() if a.core]
    assert core["whoami"]["enabled"] == ["core"]
    assert any(t["listed"] < t["total"] for t in core["whoami"]["toolsets"])


def test_cached_listings_are_the_declarations(tmp_path):
    tool_cache._LOADED.clear()
    generated = tool_cache.catalog(tmp_path, "1.0")  # imports the declarations and writes the file
    (path,) = tmp_path.glob("tools-*.json")
    tool_cache._LOADED.clear()
    cached = tool_cache.catalog(tmp_path, "1.0")
    declared = load_all()
    assert list(cached.declared) == list(generated.declared) == list(declared)
    for slug, ability in declared.items():
        listing = cached.declared[slug]
        assert isinstance(listing, Listing)
        assert listing == Listing.of(ability)
        assert tool_definition(listing) == tool_definition(ability)
        assert cached[slug] is ability  # the ability itself, once its module is imported
    assert json.loads(path.read_text())["get-agent"]["module"] == "datamachine_mcp.abilities.agents"


def test_a_damaged_or_foreign_cache_is_rebuilt(tmp_path):
    tool_cache._LOADED.clear()
    tool_cache.catalog(tmp_path, "1.0")
    (path,) = tmp_path.glob("tools-*.json")
    path.write_text('{"get-agent": {"slug": "get-agent"}}')  # not a listing
    tool_cache._LOADED.clear()
    rebuilt = tool_cache.catalog(tmp_path, "1.0")
    assert list(rebuilt.declared) == list(load_all())
    assert set(json.loads(path.read_text())) == set(load_all())
    # another version's listings are kept for a day (two installs may share a data directory), then go
    other = tmp_path / "tools-0123456789abcdef01234567.json"
    other.write_text("{}")
    path.unlink()
    tool_cache._LOADED.clear()
    tool_cache.catalog(tmp_path, "1.0")
    assert other.exists()
    old = time.time() - 2 * tool_cache.STALE_SECONDS
    os.utime(other, (old, old))
    path.unlink()
    tool_cache._LOADED.clear()
    tool_cache.catalog(tmp_path, "1.0")
    assert not other.exists() and path.exists()
    tool_cache._LOADED.clear()


def test_the_key_follows_the_source_and_the_version(tmp_path, monkeypatch):
    module = tmp_path / "abilities" / "mine.py"
    module.parent.mkdir()
    module.write_text("X = 1\n")
    monkeypatch.setattr(tool_cache, "SOURCE_DIRS", (module.parent,))
    key = tool_cache.cache_key("1.0")
    assert tool_cache.cache_key("1.0") == key
    assert tool_cache.cache_key("1.1") != key
    module.write_text("X = 2\n")
    assert tool_cache.cache_key("1.0") != key


async def test_a_schedule_fires_while_a_stdio_server_runs(tmp_path):
    """The in-process engine starts after the first answers, and its scheduler fires a due flow."""
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "DATAMACHINE_DATA_DIR": str(tmp_path / "data")}
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), "--toolsets", "all"],
        env=env,
    )
    async with Client(params, mode="legacy") as client:
        await call(client, "update-settings", {"settings": {"scheduler_tick_seconds": 1}})
        flow = await make_flow(client, [echo_step(said="tick")])
        due = int(datetime.now(UTC).timestamp()) + 2
        schedule = {"interval": "one_time", "timestamp": due}
        await call(client, "update-flow", {"flow_id": flow["flow_id"], "scheduling_config": schedule})

        async def ran() -> bool:
            jobs = (await call(client, "get-jobs", {"flow_id": flow["flow_id"]}))["jobs"]
            return bool(jobs) and jobs[0]["status"] == "completed"

        await wait_until(ran, 30, step=0.5)
