"""The MCP server: the ability registry and resource declarations served through the low-level SDK.

The low-level ``Server`` is used (rather than ``MCPServer``'s function-signature tools) because every
tool is generated from a registry entry and must return structured ``{code, message, data}`` errors
and per-principal tool lists, which the decorator API cannot express.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from sqlalchemy import func, select

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.abilities.runner import error_text, invoke, refusal, visible
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.resources.registry import ResourceNotFound, ResourceSpec, read
from datamachine_mcp.server import tool_cache
from datamachine_mcp.server.delivery import Coalescer, PrincipalBus
from datamachine_mcp.server.sampling import SamplingBridge
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.timeutil import utcnow

log = logging.getLogger("datamachine.server")

RESOURCE_NOT_FOUND = -32002  # the 2025-11-25 "Resource not found" code
INPUT_CODES = frozenset({"invalid_input", "input_too_large"})  # refused for the request's parameters
WATCH_SECONDS = 1.0
INSTRUCTIONS = (
    "Data Machine automation engine. Pipelines are reusable step templates (fetch → ai → publish …); flows "
    "are configured, schedulable instances of a pipeline; running a flow creates a job. Agents own resources "
    "and share them through roles (viewer < operator < admin). Call whoami first to see who you act as. "
    "Errors start with a stable code (e.g. 'flow_not_found: …') and carry {code, message, data}."
)

PrincipalResolver = Callable[[ServerRequestContext[Any, Any]], Awaitable[Principal]]


def exposed_abilities(abilities: dict[str, Ability], runtime: Runtime) -> dict[str, Ability]:
    """Tools that exist in this process: ``--toolsets`` and ``--read-only`` remove the others."""
    return {
        slug: a
        for slug, a in abilities.items()
        if (runtime.toolsets is None or a.toolset in runtime.toolsets) and (a.read_only or not runtime.read_only)
    }


def tool_definition(ability: Ability, schemas: dict[str, Any] | None = None) -> types.Tool:
    hints = ability.annotations()
    return types.Tool(
        name=ability.slug,
        title=ability.title,
        description=ability.description,
        input_schema=schemas["input"] if schemas else ability.input_schema,
        output_schema=schemas["output"] if schemas else ability.output_schema,
        annotations=types.ToolAnnotations(
            title=hints["title"],
            read_only_hint=hints["readOnlyHint"],
            destructive_hint=hints["destructiveHint"],
            idempotent_hint=hints["idempotentHint"],
            open_world_hint=hints["openWorldHint"],
        ),
    )


class DataMachineServer:
    """Wires one ``Runtime`` into an MCP ``Server`` and delivers change notifications (engine.md §14)."""

    def __init__(
        self,
        runtime: Runtime,
        abilities: dict[str, Ability],
        resources: list[ResourceSpec],
        resolve_principal: PrincipalResolver,
    ) -> None:
        self.runtime = runtime
        self.abilities = exposed_abilities(abilities, runtime)
        self.resources = resources
        self.resolve_principal = resolve_principal
        cached = tool_cache.schemas(self.abilities, runtime.data_dir / "cache", runtime.version)
        self._tools = {slug: tool_definition(a, cached.get(slug)) for slug, a in self.abilities.items()}
        self.bus = InMemorySubscriptionBus()
        # Legacy-era sessions by connection, with the URIs each subscribed to.
        self._sessions: dict[int, Any] = {}
        self._subscriptions: dict[int, set[str]] = {}
        # Who each connection and each open listen stream acts as: notifications go to readers only.
        self._principals: dict[int, Principal] = {}
        self._listeners: Counter[Principal] = Counter()
        self._bus_hidden: set[tuple[Principal, str]] = set()
        self._seen: dict[tuple[Principal, str], bool] = {}
        self._updates = Coalescer(self._deliver_updated)
        runtime.events = self
        self.sampling = SamplingBridge(runtime.engine)
        if runtime.engine is not None:
            runtime.engine.events = self
            runtime.engine.sampling = self.sampling
        self.server: Server[Any] = Server(
            "datamachine-mcp",
            version=runtime.version,
            title="Data Machine",
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=self._listen,
        )

    def initialization_options(self) -> InitializationOptions:
        return self.server.create_initialization_options(NotificationOptions(resources_changed=True))

    # --- principal ------------------------------------------------------------------------------

    def _remember(self, ctx: ServerRequestContext[Any, Any]) -> int:
        """Track handshake-era connections for notifications; 2026-era clients use subscriptions/listen."""
        # One entry per client connection (the session object is per request; its connection is not).
        key = id(getattr(ctx.session, "_connection", ctx.session))
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._sessions[key] = ctx.session
        return key

    async def _principal(self, ctx: ServerRequestContext[Any, Any]) -> Principal:
        key = self._remember(ctx)
        principal = await self.resolve_principal(ctx)
        self._principals[key] = principal
        if key in self._sessions:  # the sampling provider's back channel (engine.md §16.3)
            self.sampling.remember(key, ctx.session, principal.user_id, principal.session_id)
        return principal

    # --- tools ----------------------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        try:
            principal = await self._principal(ctx)
        except CodedError as err:
            raise request_error(err) from None
        return types.ListToolsResult(
            tools=[self._tools[slug] for slug, a in self.abilities.items() if visible(a, principal)]
        )

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        ability = self.abilities.get(params.name)
        if ability is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name}")
        try:
            principal = await self._principal(ctx)
        except CodedError as err:
            return tool_error(refusal(err))

        async def progress(value: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(value, total, message)

        outcome = await invoke(
            self.runtime,
            ability,
            params.arguments,
            principal,
            request_id=str(ctx.request_id) if ctx.request_id is not None else None,
            progress=progress,
            client=ctx.session,
        )
        if outcome.error is not None:
            return tool_error(outcome.error)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=outcome.text)],
            structured_content=outcome.output,
        )

    # --- resources ------------------------------------------------------------------------------

    async def _list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        self._remember(ctx)
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=spec.uri,
                    name=spec.name,
                    title=spec.title,
                    description=spec.description,
                    mime_type="application/json",
                )
                for spec in self.resources
                if spec.template is None and spec.twin in self.abilities
            ]
        )

    async def _list_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        self._remember(ctx)
        return types.ListResourceTemplatesResult(
            resource_templates=[
                types.ResourceTemplate(
                    uri_template=spec.uri,
                    name=spec.name,
                    title=spec.title,
                    description=spec.description,
                    mime_type="application/json",
                )
                for spec in self.resources
                if spec.template is not None and spec.twin in self.abilities
            ]
        )

    async def _read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        try:
            principal = await self._principal(ctx)
            text = await read(self.runtime, self.abilities, self.resources, uri, principal)
        except CodedError as err:
            raise request_error(err, uri=uri) from None
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, text=text, mime_type="application/json")]
        )

    async def _subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        key = self._remember(ctx)
        with contextlib.suppress(CodedError):
            await self._may_read(await self._principal(ctx), uri, {})  # remembers what it can see now
        self._subscriptions.setdefault(key, set()).add(uri)
        return types.EmptyResult()

    async def _listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        """A 2026-era subscription stream, seeing only the updates its principal may read."""
        principal = await self._principal(ctx)
        self._listeners[principal] += 1
        try:
            return await ListenHandler(PrincipalBus(self.bus, self._bus_hidden, principal))(ctx, params)
        finally:
            self._listeners[principal] -= 1
            if self._listeners[principal] <= 0:
                del self._listeners[principal]

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        key = self._remember(ctx)
        self._subscriptions.get(key, set()).discard(str(params.uri))
        return types.EmptyResult()

    # --- EventSink: notifications after commit --------------------------------------------------

    async def resource_updated(self, uri: str) -> None:
        """Schedule ``resources/updated`` for ``uri`` (coalesced per URI, engine.md §14.1)."""
        if self._listeners or any(uri in uris for uris in self._subscriptions.values()):
            self._updates.push(uri)  # nobody subscribed: nothing to schedule (the engine's common case)

    async def _deliver_updated(self, uri: str) -> None:
        seen: dict[Principal, bool] = {}
        for key, uris in list(self._subscriptions.items()):
            session = self._sessions.get(key)
            principal = self._principals.get(key)
            if (
                uri in uris
                and session is not None
                and principal is not None
                and await self._may_read(principal, uri, seen)
            ):
                await _best_effort(session.send_resource_updated(uri))
        hidden = {(p, uri) for p in list(self._listeners) if not await self._may_read(p, uri, seen)}
        self._bus_hidden |= hidden
        try:
            await self.bus.publish(ResourceUpdated(uri=uri))  # listeners filter synchronously
        finally:
            self._bus_hidden -= hidden

    async def _may_read(self, principal: Principal, uri: str, seen: dict[Principal, bool]) -> bool:
        """Whether ``principal`` may be told that ``uri`` changed: it can read it, or could until it was
        deleted (a hidden resource reads as not found, so only what was seen before counts)."""
        if principal.is_admin and principal.agent_id is None:
            return True  # the owner and site admins read everything
        if principal in seen:
            return seen[principal]
        key = (principal, uri)
        try:
            await read(self.runtime, self.abilities, self.resources, uri, principal, record_denials=False)
            allowed = self._seen[key] = True
        except ResourceNotFound:
            allowed = self._seen.pop(key, False)
        except Exception:
            allowed = False
        seen[principal] = allowed
        return allowed

    async def resources_list_changed(self) -> None:
        for session in list(self._sessions.values()):
            await _best_effort(session.send_resource_list_changed())
        await self.bus.publish(ResourcesListChanged())

    # --- EngineEvents: the engine's committed changes ----------------------------------------

    async def jobs_changed(self, job_ids: Iterable[int]) -> None:
        for job_id in sorted(set(job_ids)):
            await self.resource_updated(f"datamachine://jobs/{job_id}")

    async def flows_changed(self, flows: Iterable[tuple[int, int]]) -> None:
        for flow_id, pipeline_id in sorted(set(flows)):
            await self.resource_updated(f"datamachine://flows/{flow_id}")
            await self.resource_updated(f"datamachine://pipelines/{pipeline_id}")

    # --- serving ------------------------------------------------------------------------------

    async def serve(self, read_stream: Any, write_stream: Any) -> None:
        """Run the MCP session; meanwhile watch for job changes made by other processes."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_other_processes)
            await self.server.run(read_stream, write_stream, self.initialization_options())
            self._updates.close()
            tg.cancel_scope.cancel()

    async def _watch_other_processes(self) -> None:
        """Poll ``jobs.updated_at`` for subscribed job URIs once a second (engine.md §14.3)."""
        seen: datetime | None = None
        while True:
            await anyio.sleep(WATCH_SECONDS)
            subscribed = {
                int(uri.rsplit("/", 1)[1])
                for uris in self._subscriptions.values()
                for uri in uris
                if uri.startswith("datamachine://jobs/") and uri.rsplit("/", 1)[1].isdigit()
            }
            try:
                async with self.runtime.db.read() as session:
                    if seen is None:
                        seen = (await session.execute(select(func.max(Job.updated_at)))).scalar() or utcnow()
                        continue
                    if not subscribed:
                        seen = (await session.execute(select(func.max(Job.updated_at)))).scalar() or seen
                        continue
                    rows = (
                        await session.execute(
                            select(Job.job_id, Job.updated_at).where(Job.job_id.in_(subscribed), Job.updated_at > seen)
                        )
                    ).all()
            except Exception:
                log.debug("change watch failed", exc_info=True)
                continue
            if rows:
                seen = max(r[1] for r in rows)
                await self.jobs_changed(r[0] for r in rows)


async def _best_effort(send: Awaitable[None]) -> None:
    """Notifications are advisory: a gone client must not fail the call that changed something."""
    try:
        await send
    except Exception:
        log.debug("notification not delivered", exc_info=True)


def tool_error(error: dict[str, Any]) -> types.CallToolResult:
    """A refused tool call: ``is_error`` with the text ``"<code>: <message>"`` and ``{code, message, data}``."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=error_text(error))], structured_content=error, is_error=True
    )


def request_error(err: CodedError, *, uri: str | None = None) -> MCPError:
    """A refused request other than a tool call (listing tools, reading a resource, listening) as a
    JSON-RPC error: resource-not-found, invalid params (the input) or invalid request (the rest)."""
    error = refusal(err)
    if isinstance(err, ResourceNotFound):
        code = RESOURCE_NOT_FOUND
    elif err.code in INPUT_CODES:
        code = types.INVALID_PARAMS
    else:
        code = types.INVALID_REQUEST
    return MCPError(code=code, message=error_text(error), data=None if uri is None else {"uri": uri, **error["data"]})
