"""Helpers shared by the benchmarks: start a server over stdio and time calls."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from mcp import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent


def datamachine(db: Path) -> StdioServerParameters:
    env = {**os.environ, "DATAMACHINE_DATA_DIR": str(db.parent), "XDG_DATA_HOME": str(db.parent)}
    return StdioServerParameters(
        command=sys.executable,
        # every tool, as before the core default: the benchmarks call tools outside it (get-agent)
        args=["-m", "datamachine_mcp.server.cli", "--db", str(db), "--toolsets", "all"],
        env=env,
        cwd=str(ROOT),
    )


def echo_server() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(ROOT / "bench" / "_echo_server.py")], cwd=str(ROOT))


def client(params: StdioServerParameters) -> Client:
    return Client(params, mode="legacy")


def temp_db() -> Path:
    return Path(tempfile.mkdtemp(prefix="dm-bench-")) / "bench.db"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)
