"""Waits that fit a client that gives up at 60 s: the default wait, progress at least every 5 s, the follow-up.

The slow job is the outside world's: a feed on 127.0.0.1 that answers after 60 s, fetched by a real stdio
server process (its own engine runs the job).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from pathlib import Path

import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from datamachine_mcp.abilities.registry import load_all as load_abilities
from tests.conftest import call
from tests.fake_servers import FakeResponse, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FEED = """<?xml version="1.0"?><rss version="2.0"><channel><title>Slow</title>
<item><title>Late</title><guid>late</guid><description>At last.</description></item></channel></rss>"""


def _server(tmp_path: Path) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMACHINE_")}
    env |= {"XDG_DATA_HOME": str(tmp_path / "xdg"), "DATAMACHINE_DATA_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), "--tools", "update-settings"],
        env=env,
    )


def test_every_waiting_tool_defaults_to_at_most_45_seconds():
    abilities = load_abilities()
    defaults = {
        "run-flow": abilities["run-flow"].input_schema["properties"]["wait_seconds"]["default"],
        "execute-workflow": abilities["execute-workflow"].input_schema["properties"]["wait_seconds"]["default"],
        "run-task": abilities["run-task"].input_schema["properties"]["wait_seconds"]["default"],
        "wait-for-job": abilities["wait-for-job"].input_schema["properties"]["timeout_seconds"]["default"],
    }
    assert all(0 < d <= 45 for d in defaults.values()), defaults
    assert all(
        abilities[t].input_schema["properties"][f]["maximum"] == 300
        for t, f in (("run-flow", "wait_seconds"), ("wait-for-job", "timeout_seconds"))
    )


async def test_a_60_second_job_returns_within_46_seconds_with_progress_and_a_follow_up(tmp_path):
    notes: list[tuple[float, float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((time.monotonic(), progress, total, message))

    with serve() as feed:
        url = feed.script("/slow.xml", FakeResponse(200, FEED, {"Content-Type": "application/rss+xml"}, delay=60))
        async with Client(_server(tmp_path), mode="legacy") as client:
            await call(client, "update-settings", {"settings": {"http_timeout_seconds": 120}})
            made = await call(
                client,
                "create-pipeline",
                {
                    "pipeline_name": "Slow feed",
                    "workflow": {
                        "steps": [
                            {
                                "step_type": "fetch",
                                "handler_slugs": ["rss"],
                                "handler_configs": {"rss": {"feed_url": url}},
                            },
                            {
                                "step_type": "publish",
                                "handler_slugs": ["files"],
                                "handler_configs": {"files": {"directory": str(tmp_path / "files" / "out")}},
                            },
                        ]
                    },
                },
            )
            started = time.monotonic()
            result = await client.call_tool("run-flow", {"flow_id": made["flow_id"]}, progress_callback=on_progress)
            elapsed = time.monotonic() - started
            assert not result.is_error, result.content[0]
            out = result.structured_content
            assert out is not None
            job_id = out["job_id"]
            # back before a 60-second client gives up, the job still running, and the answer says how to follow
            assert 40 <= elapsed <= 46, elapsed
            assert out["final"] is False and out["timed_out"] is True
            assert out["job"]["base_status"] == "processing" and out["status"] == "processing"
            hint = out["follow_up"]
            assert f"Job {job_id} is not finished" in hint and "keeps running" in hint
            assert f'wait-for-job {{"job_id": {job_id}}}' in hint and f"datamachine://jobs/{job_id}" in hint
            links = [str(c.uri) for c in result.content if isinstance(c, types.ResourceLink)]
            assert f"datamachine://jobs/{job_id}" in links
            # progress: at least 8, strictly increasing, never 5 s apart, naming the step
            assert len(notes) >= 8, notes
            values = [p for _, p, _, _ in notes]
            assert all(b > a for a, b in itertools.pairwise(values)), values
            times = [started, *(t for t, _, _, _ in notes)]
            assert max(b - a for a, b in itertools.pairwise(times)) <= 5.0, times
            assert all(total == 2 for _, _, total, _ in notes)  # two steps
            messages = [m or "" for _, _, _, m in notes]
            assert all(re.fullmatch(r"(pending|processing) — step 1/2: Fetch \(\d+ s\)", m) for m in messages), messages
            assert messages[-1].startswith("processing — step 1/2: Fetch")
            assert values[-1] < 1  # the fetch step has not finished
            await call(client, "cancel-job", {"job_id": job_id, "reason": "test over"})
