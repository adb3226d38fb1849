"""``datamachine-mcp token create|list|revoke``: token management from the shell.

The CLI acts with local-owner authority and goes through the same abilities as tool calls, so its
actions are audited with ``transport = cli``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy import select

from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.registry import load_all
from datamachine_mcp.abilities.runner import invoke
from datamachine_mcp.abilities.tokens import token_info
from datamachine_mcp.server.bootstrap import ProcessConfig, StartupError, open_runtime
from datamachine_mcp.storage.models import Agent, AgentAccess, AgentToken, Job, Pipeline


async def run_token_command(cfg: ProcessConfig, args: argparse.Namespace) -> int:
    runtime = await open_runtime(cfg)
    owner = Principal(user_id=cfg.local_user, is_admin=True, transport="cli")
    abilities = load_all()
    try:
        if args.token_command == "create":
            arguments: dict[str, Any] = {"user_id": args.user}
            if args.token_agent:
                arguments["agent_slug"] = args.token_agent
            if args.label:
                arguments["label"] = args.label
            if args.capabilities:
                arguments["capabilities"] = [c.strip() for c in args.capabilities.split(",") if c.strip()]
            if args.expires_in is not None:
                arguments["expires_in"] = args.expires_in
            outcome = await invoke(runtime, abilities["create-agent-token"], arguments, owner)
            if outcome.error is not None:
                print(f"datamachine-mcp: {outcome.text}", file=sys.stderr)
                return 1
            assert outcome.output is not None
            print(outcome.output["raw_token"])  # the only thing on stdout, for scripts
            for warning in await _create_warnings(runtime, args.user, args.token_agent, outcome.output["token_id"]):
                print(f"datamachine-mcp: warning: {warning}", file=sys.stderr)
            return 0
        if args.token_command == "revoke":
            outcome = await invoke(runtime, abilities["revoke-agent-token"], {"token_id": args.token_id}, owner)
            if outcome.error is not None:
                print(f"datamachine-mcp: {outcome.text}", file=sys.stderr)
                return 1
            assert outcome.output is not None
            print(outcome.output["message"])
            return 0
        return await _list(runtime, args)
    finally:
        await runtime.db.dispose()


async def _create_warnings(runtime: Any, user_id: int, agent_slug: str | None, token_id: int) -> list[str]:
    """What makes a freshly minted token useless: no role on its agent, or a user id nothing knows."""
    warnings = []
    async with runtime.db.read() as session:
        admin = user_id in (await runtime.settings.snapshot(session, access=True))["admin_user_ids"]
        if agent_slug and not admin:
            agent = (await session.execute(select(Agent).where(Agent.agent_slug == agent_slug))).scalar_one()
            grant = select(AgentAccess.id).where(AgentAccess.agent_id == agent.agent_id, AgentAccess.user_id == user_id)
            if agent.owner_id != user_id and (await session.execute(grant)).first() is None:
                grant_args = f'{{"agent_slug": "{agent_slug}", "user_id": {user_id}, "role": "operator"}}'
                warnings.append(
                    f"user {user_id} has no role on agent '{agent_slug}', so every call with this token is "
                    f"refused; grant one first: grant-agent-access {grant_args}"
                )
        known = (
            select(AgentAccess.user_id).where(AgentAccess.user_id == user_id),
            select(Agent.owner_id).where(Agent.owner_id == user_id),
            select(AgentToken.user_id).where(AgentToken.user_id == user_id, AgentToken.token_id != token_id),
            select(Pipeline.user_id).where(Pipeline.user_id == user_id),
            select(Job.user_id).where(Job.user_id == user_id),
        )
        seen = admin
        for query in known:
            seen = seen or (await session.execute(query.limit(1))).first() is not None
    if not seen:
        warnings.append(
            f"user {user_id} has never been seen here (no agent, grant, token, pipeline or job); check the user id"
        )
    return warnings


async def _list(runtime: Any, args: argparse.Namespace) -> int:
    async with runtime.db.read() as session:
        query = select(AgentToken).order_by(AgentToken.token_id)
        if args.token_agent:
            agent = (await session.execute(select(Agent).where(Agent.agent_slug == args.token_agent))).scalar()
            if agent is None:
                raise StartupError(f"no agent with slug '{args.token_agent}'")
            query = query.where(AgentToken.agent_id == agent.agent_id)
        if args.user is not None:
            query = query.where(AgentToken.user_id == args.user)
        rows = [token_info(r) for r in (await session.execute(query)).scalars()]
    print(f"{'ID':>5}  {'PREFIX':<32} {'AGENT':>6} {'USER':>5}  {'LABEL':<16} {'SCOPES':<20} STATE")
    for r in rows:
        state = "revoked" if r["revoked_at"] else ("expires " + r["expires_at"] if r["expires_at"] else "active")
        scopes = ",".join(r["capabilities"]) if r["capabilities"] else "-"
        agent = str(r["agent_id"]) if r["agent_id"] else "-"
        print(
            f"{r['token_id']:>5}  {r['token_prefix']:<32} {agent:>6} {r['user_id']:>5}  {(r['label'] or '-'):<16} {scopes:<20} {state}"
        )
    return 0
