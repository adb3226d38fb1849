"""Tool definitions (JSON schemas) cached across starts.

Generating ~180 JSON schemas with pydantic takes most of a second, and every start of a stdio server
would pay it before its first ``tools/list`` answer. The definitions only change when the code does,
so they are cached in the data directory under a key derived from the source of the ability modules
and the versions that shape the schemas. Any problem with the cache just means generating them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from datamachine_mcp import abilities as _abilities_package
from datamachine_mcp.abilities.registry import Ability

log = logging.getLogger("datamachine.server")
# Where the ability modules are installed (a wheel's site-packages or, in an editable install, the checkout).
ABILITIES_DIR = Path(_abilities_package.__path__[0])


def cache_key(app_version: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{app_version}|pydantic {dist_version('pydantic')}".encode())
    for path in sorted(ABILITIES_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def schemas(abilities: dict[str, Ability], cache_dir: Path | None, app_version: str) -> dict[str, dict[str, Any]]:
    """``{slug: {"input": schema, "output": schema}}`` from the cache, or generated (and cached)."""
    path = None
    if cache_dir is not None:
        try:
            path = cache_dir / f"tools-{cache_key(app_version)}.json"
            cached = json.loads(path.read_text())
            if set(cached) >= set(abilities):
                return cached
        except (OSError, ValueError):
            pass
    generated = {slug: {"input": a.input_schema, "output": a.output_schema} for slug, a in abilities.items()}
    if path is not None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(generated))
            tmp.replace(path)
        except OSError:
            log.debug("could not write the tool schema cache", exc_info=True)
    return generated
