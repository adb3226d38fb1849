"""Bearer tokens as credentials (docs/access.md, Tokens): minting ``dm_<slug>_<64 hex>`` (only a salted
SHA-256 of the secret is stored) and verifying one into a principal, for the token tools, ``--token``
and HTTP bearer credentials alike."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.abilities.access import SCOPE_RANK, SCOPES, Principal
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import TOOLSETS
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Agent, AgentToken
from datamachine_mcp.storage.settings import SettingsStore
from datamachine_mcp.storage.timeutil import utcnow

log = logging.getLogger("datamachine.tokens")

TOKEN_RE = re.compile(r"^dm_([a-z0-9_-]{1,200})_([0-9a-f]{64})$")
_DUMMY_SALT = "00" * 16


def hash_secret(salt_hex: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode("ascii")).hexdigest()


def validate_capabilities(caps: list[str] | None) -> list[str] | None:
    """Token scopes: at least one of read/run/manage/admin; known toolsets only."""
    if caps is None:
        return None
    unknown = [c for c in caps if c not in SCOPES and not (c.startswith("toolset:") and c[8:] in TOOLSETS)]
    if unknown:
        raise AbilityError(
            "invalid_capabilities",
            f"Unknown capabilities: {', '.join(unknown)}. Use read, run, manage, admin or toolset:<name> "
            f"({', '.join(TOOLSETS)}).",
            unknown=unknown,
        )
    if not any(c in SCOPES for c in caps):
        raise AbilityError(
            "invalid_capabilities", "capabilities must include at least one of read, run, manage or admin."
        )
    return sorted(set(caps), key=lambda c: (c.startswith("toolset:"), SCOPE_RANK.get(c, 0), c))


@dataclass(frozen=True)
class Minted:
    raw: str
    row: AgentToken


async def mint(
    session: AsyncSession,
    *,
    slug_part: str,
    agent_id: int | None,
    user_id: int,
    label: str | None,
    capabilities: list[str] | None,
    expires_in: int | None,
    created_by: int | None,
) -> Minted:
    while True:
        secret = secrets.token_bytes(32).hex()
        lookup = secret[:12]
        taken = (await session.execute(select(AgentToken.token_id).where(AgentToken.lookup_key == lookup))).scalar()
        if taken is None:
            break
    salt = secrets.token_bytes(16).hex()
    now = utcnow()
    row = AgentToken(
        agent_id=agent_id,
        user_id=user_id,
        label=label,
        token_prefix=f"dm_{slug_part}_{secret[:8]}",
        lookup_key=lookup,
        salt=salt,
        token_hash=hash_secret(salt, secret),
        capabilities=capabilities,
        created_by_user_id=created_by,
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in) if expires_in else None,
    )
    session.add(row)
    await session.flush()
    return Minted(raw=f"dm_{slug_part}_{secret}", row=row)


class TokenRejected(Exception):
    """A bearer token that does not authenticate; ``reason`` is logged, never shown in detail."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def verify_token(
    db: Database, settings: SettingsStore, raw: str, *, transport: str, session_id: str | None = None
) -> Principal:
    """Verify a raw token. Raises ``TokenRejected``; rejections of known tokens leave a warning row."""
    match = TOKEN_RE.match(raw.strip())
    if match is None:
        log.debug("rejected a malformed token")
        raise TokenRejected("malformed")
    secret = match.group(2)
    async with db.read() as session:
        row = (
            await session.execute(select(AgentToken).where(AgentToken.lookup_key == secret[:12]))
        ).scalar_one_or_none()
        if row is None:
            hmac.compare_digest(hash_secret(_DUMMY_SALT, secret), "0" * 64)  # equalise timing
            log.debug("rejected an unknown token")
            raise TokenRejected("unknown")
        if not hmac.compare_digest(hash_secret(row.salt, secret), row.token_hash):
            log.debug("rejected a token with a wrong secret")
            raise TokenRejected("unknown")
        agent = await session.get(Agent, row.agent_id) if row.agent_id is not None else None
        snap = await settings.snapshot(session, access=True)
        now = utcnow()
        reason = None
        if row.revoked_at is not None:
            reason = "revoked"
        elif row.expires_at is not None and row.expires_at <= now:
            reason = "expired"
        elif row.agent_id is not None and (agent is None or agent.status != "active"):
            reason = "agent_inactive"
        # Copied out while the session is open: ending a read transaction expires its rows.
        token_id, user_id, caps = row.token_id, row.user_id, row.capabilities
        token_agent_id, token_prefix, rate_limit = row.agent_id, row.token_prefix, row.rate_limit_per_minute
        agent_slug = agent.agent_slug if agent is not None else None
        stale = row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60
    if reason is not None:
        async with db.write() as session:
            await write_log(
                session,
                "warning",
                f"token {token_id} rejected: {reason}",
                {"token_id": token_id, "reason_code": reason, "transport": transport},
                agent_id=token_agent_id,
                user_id=user_id,
            )
        raise TokenRejected(reason)
    if stale:
        try:
            async with db.write() as session:
                tok = await session.get(AgentToken, token_id)
                if tok is not None:
                    tok.last_used_at = now
        except Exception:  # best effort: a failed stamp must not refuse a valid token
            log.debug("could not record last use of token %s", token_id, exc_info=True)
    capabilities = frozenset(caps) if caps is not None else None
    is_admin = user_id in snap["admin_user_ids"] and (capabilities is None or "admin" in capabilities)
    return Principal(
        user_id=user_id,
        agent_id=token_agent_id,
        is_admin=is_admin,
        capabilities=capabilities,
        token_id=token_id,
        transport=transport,
        session_id=session_id,
        token_prefix=token_prefix,
        agent_slug=agent_slug,
        rate_limit_per_minute=rate_limit,
    )
