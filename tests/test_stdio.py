"""The real stdio server in a subprocess, and the token CLI (docs/access.md, Per transport).

Every subprocess gets XDG_DATA_HOME and DATAMACHINE_DATA_DIR in tmp_path so nothing touches the real home.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime, parse_toolsets
from tests.conftest import call, connect, log_rows

pytestmark = pytest.mark.anyio

FOUNDATION = {
    "create-agent",
    "get-agent",
    "list-agents",
    "update-agent",
    "rename-agent",
    "delete-agent",
    "grant-agent-access",
    "revoke-agent-access",
    "list-agent-access",
    "create-agent-token",
    "list-agent-tokens",
    "revoke-agent-token",
    "write-to-log",
    "read-logs",
    "get-log-metadata",
    "clear-logs",
    "get-settings",
    "update-settings",
    "whoami",
}


README_TEXT = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "XDG_DATA_HOME": str(tmp_path / "xdg"),
        "DATAMACHINE_DATA_DIR": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
    }


def _full_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMACHINE_")}
    return {**env, **_env(tmp_path)}


def _params(tmp_path: Path, db: Path, *extra: str) -> StdioServerParameters:
    """A stdio server listing every tool (``--toolsets all``) unless ``extra`` chooses."""
    chosen = extra if "--toolsets" in extra else ("--toolsets", "all", *extra)
    return StdioServerParameters(
        command=sys.executable, args=["-m", "datamachine_mcp.server.cli", "--db", str(db), *chosen], env=_env(tmp_path)
    )


def _cli(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datamachine_mcp.server.cli", *args],
        env=_full_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


async def test_stdio_session_persists_across_restarts(tmp_path):
    db = tmp_path / "dm.db"
    async with Client(_params(tmp_path, db), mode="legacy") as client:
        assert client.server_info is not None and client.server_info.name == "datamachine-mcp"
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == set(load_abilities())
        assert names >= FOUNDATION
        me = await call(client, "whoami", {})
        assert (me["user_id"], me["is_admin"], me["transport"]) == (1, True, "stdio")
        created = await call(client, "create-agent", {"agent_slug": "Stdio Bot"})
        assert created["agent_slug"] == "stdio-bot"
        resource = await client.read_resource("datamachine://agents/stdio-bot", cache_mode="bypass")
        agent = json.loads(resource.contents[0].text)["agent"]
        assert agent["agent_id"] == created["agent_id"] and agent["caller_role"] == "admin"

    # a new process on the same file finds the agent
    async with Client(_params(tmp_path, db), mode="legacy") as client:
        found = await call(client, "get-agent", {"agent_slug": "stdio-bot"})
        assert found["agent"]["agent_id"] == created["agent_id"]
        listed = await call(client, "list-agents", {})
        assert [a["agent_slug"] for a in listed["agents"]] == ["stdio-bot"]
    # the key file went to the given data dir; nothing was put under XDG_DATA_HOME
    assert (tmp_path / "data" / "secret.key").exists()
    assert not (tmp_path / "xdg").exists()


def test_stdout_carries_only_protocol_json(tmp_path):
    """With debug diagnostics on, stdout still holds nothing but JSON-RPC messages."""
    db = tmp_path / "dm.db"
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "create-agent", "arguments": {"agent_slug": "raw"}},
        },
        {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "get-agent", "arguments": {"agent_slug": "nope"}},
        },
        {"jsonrpc": "2.0", "id": 5, "method": "resources/read", "params": {"uri": "datamachine://agents/raw"}},
        {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "read-logs", "arguments": {}}},
    ]
    stderr_file = tmp_path / "stderr.log"
    with stderr_file.open("w") as errlog:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "datamachine_mcp.server.cli",
                "--db",
                str(db),
                "--log-level",
                "debug",
                "--toolsets",
                "all",
            ],
            env=_full_env(tmp_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,  # a file, so a chatty stderr can never block the server
            text=True,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            responses: dict[int, dict] = {}
            for request in requests:
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
                if "id" not in request:
                    continue
                while request["id"] not in responses:
                    line = proc.stdout.readline()
                    assert line, "server closed stdout early"
                    message = json.loads(line)  # anything but JSON fails here
                    assert message["jsonrpc"] == "2.0"
                    if "id" in message and ("result" in message or "error" in message):
                        responses[message["id"]] = message
            proc.stdin.close()  # end of input: the server shuts down
            rest = proc.stdout.read()
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = stderr_file.read_text()
    for line in rest.splitlines():
        assert json.loads(line)["jsonrpc"] == "2.0"
    assert proc.returncode == 0, stderr
    assert "DEBUG" in stderr  # diagnostics went to stderr
    tools = {t["name"] for t in responses[2]["result"]["tools"]}
    assert tools >= FOUNDATION
    assert responses[3]["result"]["structuredContent"]["agent_slug"] == "raw"
    error = responses[4]["result"]
    assert error["isError"] is True and "structuredContent" not in error
    assert error["_meta"]["datamachine/error"]["code"] == "agent_not_found"
    assert error["content"][0]["text"].startswith("agent_not_found: ")
    assert json.loads(responses[5]["result"]["contents"][0]["text"])["agent"]["agent_slug"] == "raw"
    messages = {i["message"] for i in responses[6]["result"]["structuredContent"]["items"]}
    assert "create-agent: agent 'raw' created (owner 1)" in messages


async def _seed_agent(tmp_path: Path, db: Path, slug: str) -> None:
    rt = await open_runtime(ProcessConfig(db=str(db), data_dir=tmp_path / "data", toolsets=None))
    try:
        async with connect(rt) as c:
            await call(c, "create-agent", {"agent_slug": slug})
    finally:
        await rt.db.dispose()


async def _cli_audit_rows(tmp_path: Path, db: Path) -> list[dict]:
    rt = await open_runtime(ProcessConfig(db=str(db), data_dir=tmp_path / "data", toolsets=None))
    try:
        return [r for r in await log_rows(rt) if (r["context"] or {}).get("transport") == "cli"]
    finally:
        await rt.db.dispose()


async def test_token_cli_create_list_revoke(tmp_path):
    db = tmp_path / "dm.db"
    await _seed_agent(tmp_path, db, "cli-bot")

    created = _cli(
        tmp_path,
        "token",
        "create",
        "--db",
        str(db),
        "--user",
        "2",
        "--agent",
        "cli-bot",
        "--capabilities",
        "read",
        "--label",
        "ci",
    )
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert len(lines) == 1 and created.stdout == lines[0] + "\n"
    raw = lines[0]
    assert re.fullmatch(r"dm_cli-bot_[0-9a-f]{64}", raw)

    listed = _cli(tmp_path, "token", "list", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if raw[:19] in line)
    token_id = int(row.split()[0])
    assert "read" in row and "ci" in row and "active" in row
    assert raw not in listed.stdout  # metadata only

    # the token works for a stdio server (its identity), then is revoked from the CLI
    async with Client(_params(tmp_path, db, "--token", raw), mode="legacy") as client:
        me = await call(client, "whoami", {})
        assert (me["user_id"], me["agent_slug"], me["capabilities"]) == (2, "cli-bot", ["read"])

    revoked = _cli(tmp_path, "token", "revoke", "--db", str(db), str(token_id))
    assert revoked.returncode == 0, revoked.stderr
    assert f"Token {token_id} revoked." in revoked.stdout
    listed = _cli(tmp_path, "token", "list", "--db", str(db))
    assert "revoked" in next(line for line in listed.stdout.splitlines() if raw[:19] in line)
    unknown = _cli(tmp_path, "token", "revoke", "--db", str(db), "999")
    assert unknown.returncode != 0 and "token_not_found" in unknown.stderr

    audit = await _cli_audit_rows(tmp_path, db)
    assert [(r["context"]["ability"], r["context"]["actor_user_id"]) for r in audit] == [
        ("create-agent-token", 1),
        ("revoke-agent-token", 1),
    ]
    assert all(r["context"]["audit"] is True for r in audit)
    assert raw[-64:] not in json.dumps(audit)


def _run_all(tmp_path: Path, db: Path, cases: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """Start one server per case at once (they should all exit at start) and collect the outcomes."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "datamachine_mcp.server.cli", "--db", str(db), *args],
            env=_full_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        results[name] = (proc.returncode, out, err)
    return results


async def test_revoked_or_bad_token_stops_the_server_at_start(tmp_path):
    db = tmp_path / "dm.db"
    rt = await open_runtime(ProcessConfig(db=str(db), data_dir=tmp_path / "data", toolsets=None))
    try:
        async with connect(rt) as c:
            await call(c, "create-agent", {"agent_slug": "bot"})
            raw = (await call(c, "create-agent-token", {"agent_slug": "bot"}))["raw_token"]
            await call(c, "revoke-agent-token", {"token_id": 1})
    finally:
        await rt.db.dispose()

    cases = {
        "revoked": ["--token", raw],
        "garbage": ["--token", "not-a-token"],
        "ghost": ["--agent", "ghost"],
    }
    results = _run_all(tmp_path, db, cases)
    for name, (code, out, err) in results.items():
        assert code == 2, (name, err)
        assert out == "", name  # nothing on stdout: it belongs to the protocol
        assert err.startswith("datamachine-mcp: ") and "Traceback" not in err, name
    assert "--token was rejected (revoked)" in results["revoked"][2]
    assert "--token was rejected (malformed)" in results["garbage"][2]
    assert "--agent 'ghost' names no agent" in results["ghost"][2]


def test_lines_the_transport_cannot_read_get_a_json_rpc_error(tmp_path):
    """Not JSON, nested too deep, a lone surrogate, not a JSON-RPC message: each gets an answer, and the
    session goes on (a client would otherwise wait for ever)."""
    deep = '{"jsonrpc":"2.0","id":9,"method":"ping","params":{"a":' + "[" * 300 + "]" * 300 + "}}"
    cases = [
        ("not json at all", -32700, None),
        ('{"jsonrpc":"2.0","id":8,"method":"ping"', -32700, None),  # cut short
        (deep, -32700, None),
        ('{"jsonrpc":"2.0","id":10,"method":"ping","params":{"a":"\\ud800"}}', -32700, None),
        ("[1, 2]", -32600, None),
        ('{"jsonrpc":"2.0","id":11}', -32600, 11),
        ('{"jsonrpc":"2.0","id":"x-12","method":5}', -32600, "x-12"),
        ('{"jsonrpc":"1.0","method":"ping"}', -32600, None),
    ]
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), "--no-worker"],
        env=_full_env(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None

        def send(line: str) -> dict:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 15)  # one answer line per line sent
            assert ready, f"no answer within 15 s to {line[:60]!r}"
            answer = proc.stdout.readline()
            assert answer, "no answer: the server closed stdout"
            return json.loads(answer)

        assert send(json.dumps(initialize))["result"]["serverInfo"]
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        proc.stdin.write("\n")  # a blank line is skipped, not answered
        for line, code, ident in cases:
            answer = send(line)
            assert answer["jsonrpc"] == "2.0" and answer["id"] == ident, (line[:60], answer)
            assert answer["error"]["code"] == code, (line[:60], answer)
        assert send(json.dumps({"jsonrpc": "2.0", "id": 20, "method": "ping"})) == {
            "jsonrpc": "2.0",
            "id": 20,
            "result": {},
        }
        proc.stdin.close()
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


async def test_the_readme_token_example_works_as_written_and_token_create_warns(tmp_path):
    """The README's steps for acting as another identity, run as written (default database of this
    environment): grant through the tools, mint with the CLI, serve with --token."""
    section = README_TEXT.split("## Connect a client", 1)[1].split("\n## ", 1)[0]
    calls = re.findall(r"`(create-agent|grant-agent-access)`\s+`(\{[^`]*\})`", section)
    assert [name for name, _ in calls] == ["create-agent", "grant-agent-access"]
    command = re.search(r"`datamachine-mcp (token create [^`]*)`", section)
    assert command is not None
    toolsets = re.search(r"`--toolsets ([a-z,]+)`", section)
    assert toolsets is not None
    db = tmp_path / "xdg" / "datamachine-mcp" / "datamachine.db"  # the default path under _env's XDG_DATA_HOME
    rt = await open_runtime(
        ProcessConfig(db=str(db), data_dir=tmp_path / "data", toolsets=parse_toolsets(toolsets.group(1)))
    )
    try:
        async with connect(rt) as owner:
            for name, arguments in calls:
                await call(owner, name, json.loads(arguments))
    finally:
        await rt.db.dispose()

    created = _cli(tmp_path, *command.group(1).split())
    assert created.returncode == 0, created.stderr
    assert "warning" not in created.stderr, created.stderr
    raw = created.stdout.strip()
    async with Client(_params(tmp_path, db, "--token", raw), mode="legacy") as client:
        me = await call(client, "whoami", {})
        assert (me["user_id"], me["agent_slug"], me["capabilities"]) == (2, "news-bot", ["run"])
        agent = await call(client, "get-agent", {"agent_slug": "news-bot"})  # refused without the grant
        assert agent["agent"]["caller_role"] == "operator"

    # a user with no role on the agent, and one nobody knows: the token is minted, with warnings
    stranger = _cli(tmp_path, "token", "create", "--user", "7", "--agent", "news-bot")
    assert stranger.returncode == 0 and stranger.stdout.startswith("dm_news-bot_")
    assert "warning: user 7 has no role on agent 'news-bot'" in stranger.stderr
    assert "grant-agent-access" in stranger.stderr
    assert "warning: user 7 has never been seen here" in stranger.stderr
    user_token = _cli(tmp_path, "token", "create", "--user", "2")  # user 2 holds a grant: known
    assert user_token.returncode == 0 and "warning" not in user_token.stderr, user_token.stderr
