"""Tool listings (names, descriptions, JSON schemas, levels) cached across starts.

Importing the ability modules and generating ~180 JSON schemas with pydantic takes over a second, and
every start of a stdio server would pay it before its first ``tools/list`` answer. The listings only
change when the code does, so they are cached in the data directory under a key derived from the
source of the ability modules and the layers they build declarations from (engine, storage), and the
versions that shape the schemas. A process started on a cached key imports an ability's module when
the ability is first used (``abilities/catalog.py``). Any problem with the cache just means importing
everything and writing it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib.metadata import version as dist_version
from pathlib import Path

from datamachine_mcp import abilities, engine, storage
from datamachine_mcp.abilities.catalog import Catalog, Listing
from datamachine_mcp.abilities.registry import load_all

log = logging.getLogger("datamachine.server")

FORMAT = 2  # of the cache file; part of the key
PREFIX = "tools-"
STALE_SECONDS = 86400
# Where the source of the declarations lives (a wheel's site-packages or, editable, the checkout).
SOURCE_DIRS = tuple(Path(package.__path__[0]) for package in (abilities, engine, storage))


def cache_key(app_version: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{FORMAT}|{app_version}|pydantic {dist_version('pydantic')}".encode())
    for root in SOURCE_DIRS:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


_LOADED: dict[tuple[Path | None, str], Catalog] = {}


def catalog(cache_dir: Path | None, app_version: str) -> Catalog:
    """Every declared ability: listings from the cache when its key matches, else imported (and cached).
    Once per process and cache directory: the code a process runs does not change under it."""
    found = _LOADED.get((cache_dir, app_version))
    if found is None:
        found = _LOADED[(cache_dir, app_version)] = _catalog(cache_dir, app_version)
    return found


def _catalog(cache_dir: Path | None, app_version: str) -> Catalog:
    path = None
    if cache_dir is not None:
        try:
            path = cache_dir / f"{PREFIX}{cache_key(app_version)}.json"
            cached = json.loads(path.read_text())
            return Catalog({slug: Listing.from_json(entry) for slug, entry in cached.items()})
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    loaded = load_all()
    if path is not None:
        _write(path, {slug: Listing.of(a).to_json() for slug, a in loaded.items()})
    return Catalog(loaded)


def _write(path: Path, listings: dict[str, object]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(listings))
        tmp.replace(path)
        # Listings of other code (an earlier version) go once unused for a while; not at once, so two
        # installs sharing a data directory do not take turns regenerating theirs.
        cutoff = time.time() - STALE_SECONDS
        for stale in path.parent.glob(f"{PREFIX}*.json"):
            if stale != path and stale.stat().st_mtime < cutoff:
                stale.unlink(missing_ok=True)
    except OSError:
        log.debug("could not write the tool listing cache", exc_info=True)
