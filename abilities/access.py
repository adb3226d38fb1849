"""Principals, roles and their enforcement (docs/access.md).

Every call runs as a ``Principal``. ``Access`` answers, for one call, what role the principal has
on a resource and builds the implicit list filter; it caches the principal's agents so a call
needs at most one query for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, false, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.storage.models import Agent, AgentAccess

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


@dataclass(frozen=True)
class Owner:
    """The owning columns of a resource (or of the parent it derives ownership from)."""

    agent_id: int | None
    user_id: int
    agent_status: str | None = None
    agent_slug: str | None = None

    def describe(self) -> str:
        if self.agent_id is not None:
            return f"agent '{self.agent_slug}'" if self.agent_slug else f"agent {self.agent_id}"
        if self.user_id == 0:
            return "shared resources"
        return f"resources of user {self.user_id}"


@dataclass
class Access:
    """Role resolution for one principal within one call (one session)."""

    principal: Principal
    session: AsyncSession
    _roles: dict[int, str] | None = field(default=None, init=False)

    async def agent_roles(self) -> dict[int, str]:
        """``accessible(u)``: agent id → the user's role (owner = admin), one query per call."""
        if self._roles is None:
            uid = self.principal.user_id
            owned = select(Agent.agent_id, Agent.owner_id, AgentAccess.role).outerjoin(
                AgentAccess, and_(AgentAccess.agent_id == Agent.agent_id, AgentAccess.user_id == uid)
            )
            rows = await self.session.execute(owned.where(or_(Agent.owner_id == uid, AgentAccess.user_id == uid)))
            self._roles = {agent_id: "admin" if owner_id == uid else role for agent_id, owner_id, role in rows.all()}
        return self._roles

    def forget(self) -> None:
        """Drop cached roles after this call changed ownership or grants."""
        self._roles = None

    async def role_on_agent(self, agent_id: int) -> str | None:
        return (await self.agent_roles()).get(agent_id)

    async def effective_role(self, owner: Owner) -> str | None:
        """docs/access.md, Effective role on a resource, steps 1-4."""
        p = self.principal
        if p.agent_id is not None:
            if owner.agent_id == p.agent_id:
                return "admin" if p.is_admin else await self.role_on_agent(owner.agent_id)
            if owner.agent_id is None and owner.user_id == 0:
                return "viewer"
            return None
        if p.is_admin:
            return "admin"
        if owner.agent_id is not None:
            return await self.role_on_agent(owner.agent_id)
        if owner.user_id == p.user_id:
            return "admin"
        if owner.user_id == 0:
            return "viewer"
        return None

    def check_scope(self, required: str, target: dict[str, Any] | None = None) -> None:
        """Step 6: the operation's scope must be within the token's ceiling."""
        scope = LEVEL_SCOPE[required]
        if not self.principal.scope_allows(scope):
            raise AccessDenied(
                "permission_denied",
                f"This operation needs the '{scope}' scope; the token used has at most "
                f"'{self.principal.ceiling}'. Use a token with a wider scope.",
                required_role=required,
                effective_role=None,
                target=target,
                required_scope=scope,
            )

    async def authorize(
        self,
        owner: Owner,
        required: Role,
        *,
        mutating: bool,
        target: dict[str, Any] | None = None,
    ) -> str:
        """Allow the operation or raise: ceiling, then role, then inactive agent."""
        self.check_scope(required, target)
        role = await self.effective_role(owner)
        if role is None or ROLE_RANK[role] < ROLE_RANK[required]:
            raise AccessDenied(
                "agent_access_denied",
                f"This needs {required} on {owner.describe()}; you have {role or 'no access'}.",
                required_role=required,
                effective_role=role,
                agent=owner.agent_slug,
                agent_id=owner.agent_id,
                target=target,
            )
        if mutating and owner.agent_status == "inactive":
            raise AbilityError(
                "agent_inactive",
                f"{owner.describe().capitalize()} is inactive: its resources are read-only until a "
                "global administrator reactivates it with update-agent.",
                agent_id=owner.agent_id,
            )
        return role

    def require_global_admin(self, what: str, target: dict[str, Any] | None = None) -> None:
        self.check_scope("global_admin", target)
        if not self.principal.is_admin:
            raise AccessDenied(
                "permission_denied",
                f"{what} needs a global administrator.",
                required_role="global_admin",
                effective_role=None,
                target=target,
            )

    async def scope_filter(self, agent_col: Any, user_col: Any, *, shared: bool = True) -> ColumnElement[bool]:
        """The implicit list filter for a table's owner columns (docs/access.md, List scoping)."""
        p = self.principal
        if p.is_admin and p.agent_id is None:
            return true()
        shared_cond = and_(agent_col.is_(None), user_col == 0) if shared else false()
        if p.agent_id is not None:
            allowed = p.is_admin or p.agent_id in await self.agent_roles()
            return or_(agent_col == p.agent_id, shared_cond) if allowed else shared_cond
        users = [p.user_id, 0] if shared else [p.user_id]
        ids = list(await self.agent_roles())
        return or_(agent_col.in_(ids), and_(agent_col.is_(None), user_col.in_(users)))

    async def check_agent_filter(self, agent_id: int, slug: str | None = None) -> None:
        """An explicit agent filter the principal cannot read is a denial, not an empty list."""
        await self.authorize(
            Owner(agent_id=agent_id, user_id=-1, agent_slug=slug),
            "viewer",
            mutating=False,
            target={"type": "agent", "id": agent_id},
        )

    def check_user_filter(self, user_id: int) -> None:
        p = self.principal
        if not p.is_admin and user_id not in (p.user_id, 0):
            raise AccessDenied(
                "permission_denied",
                f"Only global administrators may filter by another user (user_id {user_id}); "
                f"omit user_id or pass your own ({p.user_id}).",
                required_role="global_admin",
                effective_role=None,
                target={"type": "user", "id": user_id},
            )
