"""Bytes (and tokens, about bytes/4) of the tool list an assistant carries in every turn.

    python bench/tool_surface.py

Lists the tools of a real server (in process, over the MCP client) with the default ``core`` selection
and with ``all``, and prints the compact JSON size of name + description + input schema (the budget:
core <= 24,000, all <= 60,000 bytes), the icons and the output schemas apart. The baseline, measured in
the same run, is the same registry's input schemas as pydantic generates them (inlined, titles,
null-unions): the ratio shows what the lean shaping saves.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import anyio
from mcp import Client

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.json_schema import inline_refs
from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from datamachine_mcp.server.docs import compact, listing_bytes

BUDGET = {"core": 24_000, "all": 60_000}
OWNER = Principal(user_id=1, is_admin=True, transport="stdio")


async def listed(runtime) -> list:
    async def owner(_ctx):
        return OWNER

    app = DataMachineServer(runtime, load_abilities(), load_resources(), owner)
    async with Client(app.server, mode="legacy") as client:
        return (await client.list_tools()).tools


def baseline_bytes() -> int:
    """name + description + input schema as generated before shaping (pydantic, refs inlined)."""
    total = 0
    for slug, a in load_abilities().items():
        schema = inline_refs(a.input_model.model_json_schema())
        schema.pop("title", None)
        total += compact({"name": slug, "description": a.description, "inputSchema": schema})
    return total


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-"))
    runtime = await open_runtime(ProcessConfig(db=str(tmp / "bench.db"), data_dir=tmp, worker=False))
    try:
        sizes = {
            "core": listing_bytes(await listed(runtime)),  # ProcessConfig's default: core
            "all": listing_bytes(await listed(dataclasses.replace(runtime, toolsets=None))),
        }
    finally:
        await runtime.db.dispose()
    base = baseline_bytes()
    for name, s in sizes.items():
        ok = "ok" if s["definitions"] <= BUDGET[name] else "OVER BUDGET"
        print(
            f"{name:>4}: {s['tools']:3d} tools, definitions {s['definitions']:7,d} bytes "
            f"(~{s['definitions'] // 4:,d} tokens; budget {BUDGET[name]:,d}: {ok}), icons {s['icons']:,d}, "
            f"output schemas {s['output_schemas']:,d}, full listing {s['full']:,d}"
        )
    print(f"baseline (unshaped schemas, all tools): {base:,d} bytes (~{base // 4:,d} tokens)")
    print(f"ratio all / baseline: {sizes['all']['definitions'] / base:.2f}")
    print(f"ratio core / baseline: {sizes['core']['definitions'] / base:.2f}")


if __name__ == "__main__":
    anyio.run(main)
