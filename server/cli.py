"""The ``datamachine-mcp`` command line.

``datamachine-mcp`` (= ``serve``) speaks MCP over stdio, or with ``--http [HOST:]PORT`` over streamable HTTP
(bearer tokens, webhook routes); ``worker`` runs only the engine; ``migrate`` upgrades a database;
``token create|list|revoke`` manage bearer tokens with local-owner authority.
Heavy imports happen after argument parsing so ``--help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

EXIT_CONFIG = 2


def _common(parser: argparse.ArgumentParser, *, sub: bool = True) -> None:
    # Subcommands repeat the options; SUPPRESS keeps their defaults from erasing values given earlier.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument(
        "--db",
        default=default,
        metavar="PATH_OR_URL",
        help="SQLite file path or postgresql:// URL (env DATAMACHINE_DB; "
        "default $XDG_DATA_HOME/datamachine-mcp/datamachine.db)",
    )
    parser.add_argument(
        "--data-dir",
        default=default,
        metavar="DIR",
        help="Data directory for the secret key and files (env DATAMACHINE_DATA_DIR)",
    )
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="stderr diagnostics level (env DATAMACHINE_LOG_LEVEL; default warning, info for the worker command)",
    )


def build_parser() -> argparse.ArgumentParser:
    from datamachine_mcp.server.bootstrap import version

    parser = argparse.ArgumentParser(
        prog="datamachine-mcp",
        description="Data Machine automation engine as an MCP server: stdio, or streamable HTTP with --http. "
        "Without a command: serve.",
    )
    parser.add_argument("--version", action="version", version=f"datamachine-mcp {version()}")
    _common(parser, sub=False)
    _serve_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="Serve MCP over stdio, or over HTTP with --http (the default command)")
    _common(serve)
    _serve_options(serve)

    work = sub.add_parser("worker", help="Run the engine (worker, scheduler, maintenance) without MCP")
    _common(work)
    work.add_argument(
        "--concurrency", type=int, default=argparse.SUPPRESS, metavar="N", help="Jobs run at once (default 4)"
    )
    _public_url(work)

    mig = sub.add_parser("migrate", help="Bring the database schema to the newest revision")
    _common(mig)

    token = sub.add_parser("token", help="Create, list or revoke bearer tokens (local-owner authority)")
    _common(token)
    tsub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = tsub.add_parser("create", help="Mint a token; prints the raw token once on stdout")
    _common(create)
    create.add_argument("--user", type=int, required=True, help="User id the token acts as")
    create.add_argument("--agent", dest="token_agent", help="Agent slug for an agent token (omit for a user token)")
    create.add_argument("--label", help='Label, e.g. "ci-pipeline"')
    create.add_argument("--capabilities", help="Comma-separated scopes: read,run,manage,admin,toolset:<name>")
    create.add_argument("--expires-in", type=int, metavar="SECONDS", help="Lifetime in seconds (60..63072000)")
    lst = tsub.add_parser("list", help="List tokens (metadata only)")
    _common(lst)
    lst.add_argument("--agent", dest="token_agent", help="Only this agent's tokens")
    lst.add_argument("--user", type=int, help="Only tokens acting as this user")
    rev = tsub.add_parser("revoke", help="Revoke a token by id")
    _common(rev)
    rev.add_argument("token_id", type=int, help="Token id (see token list)")
    return parser


def _public_url(parser: argparse.ArgumentParser, *, sub: bool = True) -> None:
    parser.add_argument(
        "--public-url",
        default=argparse.SUPPRESS if sub else None,
        metavar="URL",
        help="Base of generated URLs: webhook_url, gate resume URLs (env DATAMACHINE_PUBLIC_URL; "
        "with --http default http://HOST:PORT)",
    )


def _serve_options(parser: argparse.ArgumentParser, *, sub: bool = True) -> None:
    default = argparse.SUPPRESS if sub else None
    parser.add_argument(
        "--http",
        default=default,
        metavar="[HOST:]PORT",
        help="Serve MCP over streamable HTTP at /mcp (bearer tokens), with the webhook routes and /health, "
        "instead of stdio (env DATAMACHINE_HTTP; HOST defaults to 127.0.0.1)",
    )
    _public_url(parser, sub=sub)
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=default,
        metavar="ORIGIN",
        help="With --http: also accept browser requests from this origin, e.g. https://app.example "
        "(repeatable; env DATAMACHINE_ALLOW_ORIGINS, comma-separated)",
    )
    parser.add_argument("--token", default=default, help="Act as this bearer token's identity (env DATAMACHINE_TOKEN)")
    parser.add_argument(
        "--local-user",
        type=int,
        default=default,
        metavar="N",
        help="User id of the local owner (env DATAMACHINE_LOCAL_USER; default 1)",
    )
    parser.add_argument("--agent", default=default, metavar="SLUG", help="Run the local owner in this agent's context")
    parser.add_argument(
        "--toolsets",
        default=default,
        metavar="LIST",
        help="Tools to list: core (default, a small set for the whole journey), all, or comma-separated "
        "toolset names and core (env DATAMACHINE_TOOLSETS)",
    )
    parser.add_argument(
        "--tools",
        default=default,
        metavar="NAME,...",
        help="Also list these single tools (env DATAMACHINE_TOOLS)",
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        default=default,
        help="Expose only read-only tools (env DATAMACHINE_READ_ONLY=1)",
    )
    parser.add_argument(
        "--no-worker",
        action="store_true",
        default=default,
        help="Do not run jobs in this process (a separate `datamachine-mcp worker` does)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=default, metavar="N", help="Jobs this process runs at once (default 4)"
    )


def _setup_logging(level: str | None, default: str = "warning") -> None:
    from datamachine_mcp.server.bootstrap import env

    name = (level or env("LOG_LEVEL") or default).upper()
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, name, logging.WARNING), format="%(levelname)s %(name)s: %(message)s"
    )


def _config(args: argparse.Namespace) -> Any:
    from datamachine_mcp.server.bootstrap import (
        ProcessConfig,
        env,
        parse_tools,
        parse_toolsets,
        resolve_data_dir,
        resolve_db,
    )

    db = resolve_db(getattr(args, "db", None))
    data_dir = resolve_data_dir(getattr(args, "data_dir", None), db)
    local_user = getattr(args, "local_user", None) or int(env("LOCAL_USER", "1") or 1)
    serving = args.command in (None, "serve")
    origins = getattr(args, "allow_origin", None) or (env("ALLOW_ORIGINS") or "").split(",")
    return ProcessConfig(
        db=db,
        data_dir=data_dir,
        local_user=local_user,
        agent=getattr(args, "agent", None) if serving else None,
        token=(getattr(args, "token", None) or env("TOKEN")) if serving else None,
        toolsets=parse_toolsets(getattr(args, "toolsets", None) or env("TOOLSETS")),
        tools=parse_tools(getattr(args, "tools", None) or env("TOOLS"), data_dir) if serving else frozenset(),
        read_only=bool(getattr(args, "read_only", None) or env("READ_ONLY") in ("1", "true", "yes")),
        worker=not getattr(args, "no_worker", None),
        concurrency=max(1, getattr(args, "concurrency", None) or int(env("CONCURRENCY", "4") or 4)),
        public_base_url=getattr(args, "public_url", None) or env("PUBLIC_URL"),
        http=(getattr(args, "http", None) or env("HTTP")) if serving else None,
        allow_origins=tuple(o.strip() for o in origins if o.strip()),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A standalone worker is a service: its start and stop notices (INFO) show by default.
    _setup_logging(args.log_level, "info" if args.command == "worker" else "warning")
    from datamachine_mcp.server.bootstrap import StartupError

    try:
        cfg = _config(args)
        if args.command == "migrate":
            return asyncio.run(_migrate(cfg))
        if args.command == "token":
            return asyncio.run(_token(cfg, args))
        if args.command == "worker":
            from datamachine_mcp.server.worker_cli import run_worker

            return asyncio.run(run_worker(cfg))
        if cfg.http:
            from datamachine_mcp.server.http_serve import serve_http

            return asyncio.run(serve_http(cfg, cfg.http))
        from datamachine_mcp.server.stdio import serve_stdio

        return asyncio.run(serve_stdio(cfg))
    except StartupError as exc:
        print(f"datamachine-mcp: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


async def _migrate(cfg: Any) -> int:
    from datamachine_mcp.storage.db import Database
    from datamachine_mcp.storage.migrate import MigrationError, current_revision, migrate

    db = Database(cfg.db)
    try:
        before = await current_revision(db)
        ran = await migrate(db)
        after = await current_revision(db)
    except MigrationError as exc:
        print(f"datamachine-mcp: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        await db.dispose()
    state = f"migrated from {before or 'empty'} to {after}" if ran else f"already at {after}"
    print(f"{db.describe()}: {state}", file=sys.stderr)
    return 0


async def _token(cfg: Any, args: argparse.Namespace) -> int:
    from datamachine_mcp.server.tokens_cli import run_token_command

    return await run_token_command(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
