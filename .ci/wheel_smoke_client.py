"""One stdio round trip against the installed ``datamachine-mcp`` (run by .ci/wheel-smoke with the fresh venv's python).

Usage: python wheel_smoke_client.py <path to datamachine-mcp> <migrated SQLite file>

Checks that this interpreter's ``datamachine_mcp`` is the installed wheel (not a checkout), that the database
is at the package's schema head, then speaks MCP to the real server: initialize, tools/list, ``whoami``.
Exits non-zero with a one-line reason on the first failure.
"""

from __future__ import annotations

import sqlite3
import sys
import sysconfig
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

TIMEOUT_SECONDS = 120


class SmokeFailure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def check_installed_package() -> int:
    """The package comes from this venv's site-packages; returns the number of core tools (the default list)."""
    import datamachine_mcp
    from datamachine_mcp.abilities.registry import load_all

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for location in datamachine_mcp.__path__:
        check(Path(location).resolve().is_relative_to(site), f"datamachine_mcp imported from {location}, not {site}")
    return sum(ability.core for ability in load_all().values())


def check_schema(db: Path) -> None:
    from datamachine_mcp.storage.migrations import HEAD_REVISION

    with sqlite3.connect(db) as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    check(revision == HEAD_REVISION, f"migrate left the schema at {revision!r}, expected {HEAD_REVISION!r}")


async def round_trip(cli: str, db: Path, tool_count: int) -> None:
    params = StdioServerParameters(command=cli, args=["--db", str(db)])
    with anyio.fail_after(TIMEOUT_SECONDS):
        async with Client(params, mode="legacy") as client:
            check(
                client.server_info is not None and client.server_info.name == "datamachine-mcp",
                f"initialize answered server_info={client.server_info!r}",
            )
            names = {tool.name for tool in (await client.list_tools()).tools}
            check(
                len(names) == tool_count, f"tools/list returned {len(names)} tools, the registry has {tool_count} core"
            )
            check("whoami" in names, "tools/list has no whoami")
            result = await client.call_tool("whoami", {})
            text = result.content[0].text if result.content else ""
            check(not result.is_error, f"whoami failed: {text}")
            me = result.structured_content or {}
            check(
                (me.get("user_id"), me.get("transport")) == (1, "stdio"),
                f"whoami answered {me!r}, expected the local owner over stdio",
            )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    cli, db = argv[0], Path(argv[1])
    try:
        tool_count = check_installed_package()
        check_schema(db)
        anyio.run(round_trip, cli, db, tool_count)
    except SmokeFailure as failure:
        print(f"wheel smoke: FAILED: {failure}", file=sys.stderr)
        return 1
    except Exception as exc:  # a crash of the client or server is a failed smoke test, said in one line
        print(f"wheel smoke: FAILED: stdio round trip raised {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"wheel smoke: stdio round trip ok ({tool_count} core tools, whoami as the local owner)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
