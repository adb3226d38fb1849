"""Who a call runs as: principals, roles, levels and token scopes.

Kept apart from ``access`` (role resolution against the database) so that listing tools, which needs
only these, imports no database layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["viewer", "operator", "admin"]
Level = Literal["any", "viewer", "operator", "admin", "global_admin"]

ROLE_RANK: dict[str, int] = {"viewer": 0, "operator": 1, "admin": 2}
SCOPES = ("read", "run", "manage", "admin")
SCOPE_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}
LEVEL_SCOPE: dict[str, str | None] = {
    "any": None,
    "viewer": "read",
    "operator": "run",
    "admin": "manage",
    "global_admin": "admin",
}
SCOPE_ROLE = {"read": "viewer", "run": "operator", "manage": "admin", "admin": "admin"}


@dataclass(frozen=True)
class Principal:
    """Who a call runs as (docs/access.md, Principals)."""

    user_id: int
    agent_id: int | None = None
    is_admin: bool = False
    capabilities: frozenset[str] | None = None
    token_id: int | None = None
    transport: str = "stdio"
    session_id: str | None = None
    token_prefix: str | None = None
    agent_slug: str | None = None
    # The token's own HTTP rate limit (None: the setting's); not part of who the principal is.
    rate_limit_per_minute: int | None = field(default=None, compare=False)

    @property
    def ceiling(self) -> str | None:
        """The highest of read/run/manage/admin in the token's scopes (None = no narrowing)."""
        if self.capabilities is None:
            return None
        held = [s for s in SCOPES if s in self.capabilities]
        return held[-1] if held else "read"

    @property
    def toolsets(self) -> frozenset[str] | None:
        if self.capabilities is None:
            return None
        sets = frozenset(c.removeprefix("toolset:") for c in self.capabilities if c.startswith("toolset:"))
        return sets or None

    def scope_allows(self, scope: str | None) -> bool:
        ceiling = self.ceiling
        return scope is None or ceiling is None or SCOPE_RANK[scope] <= SCOPE_RANK[ceiling]

    def toolset_allows(self, toolset: str) -> bool:
        sets = self.toolsets
        return sets is None or toolset in sets

    def cap_role(self, role: str | None) -> str | None:
        """A role capped at the token's ceiling (used to report ``caller_role``)."""
        ceiling = self.ceiling
        if role is None or ceiling is None:
            return role
        ceiling_role = SCOPE_ROLE[ceiling]
        return role if ROLE_RANK[role] <= ROLE_RANK[ceiling_role] else ceiling_role

    def actor(self) -> dict[str, Any]:
        return {
            "actor_user_id": self.user_id,
            "actor_agent_id": self.agent_id,
            "actor_token_id": self.token_id,
            "transport": self.transport,
        }


def level_visible(principal: Principal, level: Level, toolset: str) -> bool:
    """Whether a tool of this level and toolset can ever be used by the principal (docs/access.md, Tool visibility)."""
    if level == "global_admin" and not principal.is_admin:
        return False
    return principal.scope_allows(LEVEL_SCOPE[level]) and principal.toolset_allows(toolset)
