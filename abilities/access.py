"""Principals, roles and their enforcement (docs/access.md).

Every call runs as a ``Principal``. ``Access`` answers, for one call, what role the principal has
on a resource and builds the implicit list filter; it caches the principal's agents so a call
needs at most one query for them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, and_, bindparam, false, or_, select, true
from sqlalchemy.sql.base import Executable

from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.principal import (
    LEVEL_SCOPE,
    ROLE_RANK,
    SCOPE_RANK,
    SCOPE_ROLE,
    SCOPES,
    Level,
    Principal,
    Role,
    level_visible,
)
from datamachine_mcp.storage.models import Agent, AgentAccess
from datamachine_mcp.storage.reads import Rows

__all__ = [
    "LEVEL_SCOPE",
    "ROLE_RANK",
    "SCOPES",
    "SCOPE_RANK",
    "SCOPE_ROLE",
    "Access",
    "Level",
    "Owner",
    "Principal",
    "Role",
    "level_visible",
]


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


# Statements run per call are built once: building one costs more than running it on SQLite.
_UID: BindParameter[int] = bindparam("uid")
_AGENT_ROLES = (
    select(Agent.agent_id, Agent.owner_id, AgentAccess.role)
    .outerjoin(AgentAccess, and_(AgentAccess.agent_id == Agent.agent_id, AgentAccess.user_id == _UID))
    .where(or_(Agent.owner_id == _UID, AgentAccess.user_id == _UID))
)

# Runs a Core SELECT in the call's transaction (``AbilityContext.read``).
Run = Callable[[Executable, Mapping[str, Any] | None], Awaitable[Rows]]


@dataclass
class Access:
    """Role resolution for one principal within one call (one transaction)."""

    principal: Principal
    run: Run
    _roles: dict[int, str] | None = field(default=None, init=False)

    async def agent_roles(self) -> dict[int, str]:
        """``accessible(u)``: agent id → the user's role (owner = admin), one query per call."""
        if self._roles is None:
            uid = self.principal.user_id
            rows = await self.run(_AGENT_ROLES, {"uid": uid})
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
