"""Helpers shared by the benchmarks: start a server over stdio and time calls."""

from __future__ import annotations

import compileall
import os
import statistics
import sys
import tempfile
from pathlib import Path

from mcp import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent


LAYERS = ("server", "abilities", "resources", "engine", "storage")


def datamachine(db: Path, toolsets: str | None = "all") -> StdioServerParameters:
    """Our stdio server; ``toolsets=None`` is the default configuration (the core tool list).

    By default every tool is listed, as before the core default: the benchmarks call tools outside it
    (get-agent)."""
    env = {**os.environ, "DATAMACHINE_DATA_DIR": str(db.parent), "XDG_DATA_HOME": str(db.parent)}
    args = ["-m", "datamachine_mcp.server.cli", "--db", str(db)]
    if toolsets is not None:
        args += ["--toolsets", toolsets]
    return StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(ROOT))


def compile_package() -> None:
    """Byte-compile the package, as installing the wheel does: with PYTHONDONTWRITEBYTECODE set (or a
    read-only checkout) every start of a source checkout would otherwise compile every module again,
    which the bare server, whose dependencies pip compiled at install, never pays."""
    for layer in LAYERS:
        compileall.compile_dir(str(ROOT / layer), quiet=1)


def echo_server() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(ROOT / "bench" / "_echo_server.py")], cwd=str(ROOT))


def client(params: StdioServerParameters) -> Client:
    return Client(params, mode="legacy")


def temp_db() -> Path:
    return Path(tempfile.mkdtemp(prefix="dm-bench-")) / "bench.db"


def children() -> set[int]:
    """Process ids of this process's children (the servers the stdio client started)."""
    me = str(os.getpid())
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis
        if stat.rsplit(")", 1)[1].split()[1] == me:
            pids.add(int(entry.name))
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)
