"""Agents toolset: bearer tokens (docs/access.md, Tokens).

Minting and verifying tokens (``dm_<slug>_<64 hex>``, only a salted SHA-256 of the secret stored) is in
``abilities.token_auth``; ``TokenRejected`` and ``verify_token`` are importable from here too.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import func, or_, select

from datamachine_mcp.abilities.access import ROLE_RANK, SCOPE_RANK, Principal
from datamachine_mcp.abilities.agent_common import AgentSelector, agent_owner, find_agent
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Output, PageOut, ts
from datamachine_mcp.abilities.token_auth import TokenRejected as TokenRejected
from datamachine_mcp.abilities.token_auth import mint, validate_capabilities
from datamachine_mcp.abilities.token_auth import verify_token as verify_token
from datamachine_mcp.storage.models import Agent, AgentToken
from datamachine_mcp.storage.timeutil import utcnow


class TokenInfo(Output):
    token_id: int = Field(description="Token id")
    agent_id: int | None = Field(description="Agent of an agent token; null for a user token")
    user_id: int = Field(description="User the token acts as")
    label: str | None = Field(description="Label")
    token_prefix: str = Field(description="Display prefix (never enough to authenticate)")
    capabilities: list[str] | None = Field(description="Scopes narrowing the token; null = none")
    created_at: str = Field(description="ISO 8601 UTC")
    expires_at: str | None = Field(description="Expiry (ISO 8601 UTC); null = never")
    revoked_at: str | None = Field(description="Revocation time; null while valid")
    last_used_at: str | None = Field(description="Last successful use (updated at most once a minute)")


def token_info(row: AgentToken) -> dict[str, Any]:
    return {
        "token_id": row.token_id,
        "agent_id": row.agent_id,
        "user_id": row.user_id,
        "label": row.label,
        "token_prefix": row.token_prefix,
        "capabilities": row.capabilities,
        "created_at": ts(row.created_at),
        "expires_at": ts(row.expires_at),
        "revoked_at": ts(row.revoked_at),
        "last_used_at": ts(row.last_used_at),
    }


def _within_caller(p: Principal, caps: list[str] | None, token_user_is_admin: bool) -> None:
    """A token never widens its creator's rights (docs/access.md, Scopes and capabilities)."""
    if caps is not None and "admin" in caps and not token_user_is_admin:
        raise AbilityError("invalid_capabilities", "The admin scope is only for tokens of global administrators.")
    if p.capabilities is None:
        return
    if caps is None:
        raise AbilityError(
            "invalid_capabilities",
            f"Your token is narrowed to '{p.ceiling}'; the new token needs capabilities within it.",
        )
    ceiling = max(SCOPE_RANK[c] for c in caps if c in SCOPE_RANK)
    if ceiling > SCOPE_RANK[p.ceiling or "read"]:
        raise AbilityError(
            "invalid_capabilities",
            f"Requested capabilities are wider than your own (at most '{p.ceiling}'); narrow them.",
        )
    caller_sets = p.toolsets
    new_sets = frozenset(c[8:] for c in caps if c.startswith("toolset:")) or None
    if caller_sets is not None and (new_sets is None or not new_sets <= caller_sets):
        raise AbilityError(
            "invalid_capabilities",
            f"Your token is limited to toolsets {', '.join(sorted(caller_sets))}; the new token must be too.",
        )


class CreateTokenIn(AgentSelector):
    user_id: int | None = Field(None, ge=1, description="User it acts as")
    label: str | None = Field(None, max_length=100, description="Label")
    capabilities: list[str] | None = Field(
        None,
        max_length=20,
        description="read, run, manage, admin, toolset:<name>; null = all",
    )
    expires_in: int | None = Field(None, ge=60, le=63072000, description="Lifetime (seconds)")


class CreateTokenOut(Output):
    token_id: int = Field(description="Token id")
    raw_token: str = Field(description="The bearer token; shown only here, store it now")
    token_prefix: str = Field(description="Display prefix")
    agent_id: int | None = Field(description="Agent of an agent token; null for a user token")
    user_id: int = Field(description="User the token acts as")
    label: str | None = Field(description="Label")
    capabilities: list[str] | None = Field(description="Scopes; null = no narrowing")
    expires_at: str | None = Field(description="Expiry (ISO 8601 UTC); null = never")
    message: str = Field(description="Reminder that the token cannot be shown again")


@ability(
    "create-agent-token",
    toolset="agents",
    level="any",
    description=("Create a bearer token (agent or user) for HTTP or --token; shown once."),
)
async def create_agent_token(ctx: AbilityContext, inp: CreateTokenIn) -> CreateTokenOut:
    p = ctx.principal
    caps = validate_capabilities(inp.capabilities)
    agent = await find_agent(ctx.session, inp.agent_id, inp.agent_slug)
    user_id = inp.user_id if inp.user_id is not None else p.user_id
    target = {"type": "agent", "id": agent.agent_id} if agent else {"type": "user", "id": user_id}
    if agent is not None:
        await ctx.access.authorize(agent_owner(agent), "admin", mutating=True, target=target)
    elif p.agent_id is not None:
        raise AccessDenied(
            "permission_denied",
            "An agent-bound session can only create tokens of its own agent; give agent_id or agent_slug.",
            required_role="global_admin",
            effective_role=None,
            target=target,
        )
    if user_id != p.user_id:
        ctx.access.require_global_admin("Creating a token for another user", target)
    snap = await ctx.settings(access=True)
    _within_caller(p, caps, user_id in snap["admin_user_ids"])
    slug_part = agent.agent_slug if agent else f"user-{user_id}"
    minted = await mint(
        ctx.session,
        slug_part=slug_part,
        agent_id=agent.agent_id if agent else None,
        user_id=user_id,
        label=inp.label.strip() if inp.label else None,
        capabilities=caps,
        expires_in=inp.expires_in,
        created_by=p.user_id if p.transport != "cli" else None,
    )
    row = minted.row
    await ctx.audit(
        f"token {row.token_id} ({row.token_prefix}) created for user {user_id}",
        target=("agent_token", row.token_id),
        agent_id=row.agent_id,
        capabilities=caps,
    )
    return CreateTokenOut(
        token_id=row.token_id,
        raw_token=minted.raw,
        token_prefix=row.token_prefix,
        agent_id=row.agent_id,
        user_id=user_id,
        label=row.label,
        capabilities=caps,
        expires_at=ts(row.expires_at),
        message="Store this token now; it cannot be shown again.",
    )


class ListTokensIn(AgentSelector):
    user_id: int | None = Field(None, ge=1, description="Whose user tokens")
    include_inactive: bool = Field(False, description="Include inactive tokens")
    per_page: int = Field(50, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class ListTokensOut(PageOut):
    tokens: list[TokenInfo] = Field(description="Tokens, newest first (metadata only)")


@ability(
    "list-agent-tokens",
    toolset="agents",
    level="any",
    read_only=True,
    idempotent=True,
    description=("List an agent's (or your) bearer tokens, never their values."),
)
async def list_agent_tokens(ctx: AbilityContext, inp: ListTokensIn) -> ListTokensOut:
    p = ctx.principal
    agent = await find_agent(ctx.session, inp.agent_id, inp.agent_slug)
    if agent is not None:
        await ctx.access.authorize(
            agent_owner(agent), "admin", mutating=False, target={"type": "agent", "id": agent.agent_id}
        )
        query = select(AgentToken).where(AgentToken.agent_id == agent.agent_id)
    else:
        user_id = inp.user_id if inp.user_id is not None else p.user_id
        if p.agent_id is not None:
            raise AccessDenied(
                "permission_denied",
                "An agent-bound session can only list its agent's tokens; give agent_id or agent_slug.",
                required_role="global_admin",
                effective_role=None,
            )
        if user_id != p.user_id:
            ctx.access.require_global_admin("Listing another user's tokens", {"type": "user", "id": user_id})
        query = select(AgentToken).where(AgentToken.agent_id.is_(None), AgentToken.user_id == user_id)
    if not inp.include_inactive:
        now = utcnow()
        query = query.where(
            AgentToken.revoked_at.is_(None), or_(AgentToken.expires_at.is_(None), AgentToken.expires_at > now)
        )
    total = (await ctx.session.execute(select(func.count()).select_from(query.subquery()))).scalar() or 0
    rows = await ctx.session.execute(
        query.order_by(AgentToken.created_at.desc(), AgentToken.token_id.desc()).limit(inp.per_page).offset(inp.offset)
    )
    return ListTokensOut.model_validate(
        {
            "tokens": [token_info(r) for r in rows.scalars()],
            "total": total,
            "per_page": inp.per_page,
            "offset": inp.offset,
        }
    )


class RevokeTokenIn(AgentSelector):
    token_id: int = Field(ge=1, description="Token")


class RevokeTokenOut(Output):
    token_id: int = Field(description="Token id")
    agent_id: int | None = Field(description="Agent of the token; null for a user token")
    revoked_at: str = Field(description="Revocation time (ISO 8601 UTC)")
    changed: bool = Field(description="False if the token was already revoked")
    message: str = Field(description="Human-readable result")


@ability(
    "revoke-agent-token",
    toolset="agents",
    level="any",
    destructive=True,
    idempotent=True,
    description="Revoke a bearer token at once.",
)
async def revoke_agent_token(ctx: AbilityContext, inp: RevokeTokenIn) -> RevokeTokenOut:
    p = ctx.principal
    unknown = AbilityError("token_not_found", f"Token {inp.token_id} not found.", token_id=inp.token_id)
    # The selector is resolved first, so its errors never depend on whether the token id exists.
    agent = await find_agent(ctx.session, inp.agent_id, inp.agent_slug)
    row = await ctx.session.get(AgentToken, inp.token_id)
    if row is None:
        raise unknown
    if agent is not None and row.agent_id != agent.agent_id:
        raise unknown
    if row.user_id != p.user_id:
        # Tokens the caller may not manage are answered exactly like unknown ids, so ids reveal nothing.
        if row.agent_id is None:
            if not p.is_admin or not p.scope_allows("admin"):
                raise unknown
        else:
            token_agent = await ctx.session.get(Agent, row.agent_id)
            role = await ctx.access.effective_role(agent_owner(token_agent)) if token_agent else None
            if role is None or ROLE_RANK[role] < ROLE_RANK["admin"] or not p.scope_allows("manage"):
                raise unknown
    changed = row.revoked_at is None
    if changed:
        row.revoked_at = utcnow()
        await ctx.audit(
            f"token {row.token_id} ({row.token_prefix}) revoked",
            target=("agent_token", row.token_id),
            changes=["revoked_at"],
            agent_id=row.agent_id,
        )
    return RevokeTokenOut(
        token_id=row.token_id,
        agent_id=row.agent_id,
        revoked_at=ts(row.revoked_at) or "",
        changed=changed,
        message=f"Token {row.token_id} revoked." if changed else f"Token {row.token_id} was already revoked.",
    )
