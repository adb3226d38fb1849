"""The declared abilities as a mapping that imports an ability's module when the ability is first used.

Listing tools needs only what a declaration says: name, title, description, schemas, hints, level,
toolset. ``Listing`` is that, taken from a declaration and kept by the tool cache (server/tool_cache.py),
so a process answers ``tools/list`` without importing the ability modules (and the database layer they
import) and imports a module on the first call of one of its tools. The declarations stay the only
source: a listing is derived from one and is only ever read back under a key of the code it came from.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from datamachine_mcp.abilities.principal import Level
from datamachine_mcp.abilities.registry import Ability, load_all, registered, tool_hints


@dataclass(frozen=True)
class Listing:
    """An ability's declaration as listing needs it, without its handler and models."""

    slug: str
    module: str  # where it is declared: imported on first use
    title: str
    description: str
    toolset: str
    level: Level
    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool
    core: bool
    links: Mapping[str, str]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]

    @classmethod
    def of(cls, ability: Ability) -> Listing:
        return cls(
            slug=ability.slug,
            module=ability.order[0],
            title=ability.title,
            description=ability.description,
            toolset=ability.toolset,
            level=ability.level,
            read_only=ability.read_only,
            destructive=ability.destructive,
            idempotent=ability.idempotent,
            open_world=ability.open_world,
            core=ability.core,
            links=dict(ability.links),
            input_schema=ability.input_schema,
            output_schema=ability.output_schema,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Listing:
        return cls(**data)

    def annotations(self) -> dict[str, Any]:
        return tool_hints(self)

    def load(self) -> Ability:
        """The ability itself: its module is imported (once) and has registered it."""
        importlib.import_module(self.module)
        found = registered().get(self.slug)
        if found is None:  # declared elsewhere than the listing says: find it the slow way
            found = load_all()[self.slug]
        return found


# What listing and choosing tools read of an ability: the ability itself, or its listing.
Declared = Ability | Listing


class Catalog(Mapping[str, Ability]):
    """Abilities by slug in listing order; ``declared`` answers listing questions without imports."""

    def __init__(self, declared: Mapping[str, Declared]) -> None:
        self.declared: dict[str, Declared] = dict(declared)

    def __getitem__(self, slug: str) -> Ability:
        found = self.declared[slug]
        return found if isinstance(found, Ability) else found.load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.declared)

    def __len__(self) -> int:
        return len(self.declared)

    def __contains__(self, slug: object) -> bool:
        return slug in self.declared


def catalog_of(abilities: Mapping[str, Ability]) -> Catalog:
    """A catalog over abilities already imported (or the catalog itself)."""
    return abilities if isinstance(abilities, Catalog) else Catalog(abilities)
