"""The MCP server: the ability registry and resource declarations served through the low-level SDK.

The low-level ``Server`` is used (rather than ``MCPServer``'s function-signature tools) because every
tool is generated from a registry entry and must return coded ``{code, message, data}`` errors
and per-principal tool lists, which the decorator API cannot express.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.subscriptions import ListenHandler
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from datamachine_mcp.abilities.catalog import catalog_of
from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.principal import Principal, level_visible
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.abilities.runner import invoke, refusal
from datamachine_mcp.abilities.toolsets import unknown_tool_text
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.resources.registry import ResourceSpec, read
from datamachine_mcp.server.completions import complete
from datamachine_mcp.server.elicitation import Refused, settle, state_boundary
from datamachine_mcp.server.errors import request_error, tool_error
from datamachine_mcp.server.icons import SERVER_ICON
from datamachine_mcp.server.links import link_specs, resource_links
from datamachine_mcp.server.notifications import Notifications
from datamachine_mcp.server.prompts import offered, render
from datamachine_mcp.server.tool_listing import exposed_abilities, instructions, resource_twins, tool_definition

START_AFTER_SECONDS = 1.0  # a stdio session's engine starts after its first answer, or after this long
SETTLE_SECONDS = 0.1

PrincipalResolver = Callable[[ServerRequestContext[Any, Any]], Awaitable[Principal]]


class _Server(Server[Any]):
    """Advertises ``resources.listChanged`` however the transport starts a session (the HTTP session
    manager asks the server for its initialization options instead of being given them)."""

    def create_initialization_options(
        self, notification_options: NotificationOptions | None = None, *args: Any, **kwargs: Any
    ) -> InitializationOptions:
        chosen = notification_options or NotificationOptions(resources_changed=True)
        return super().create_initialization_options(chosen, *args, **kwargs)


class DataMachineServer:
    """Serves one ``Runtime``'s tools and resources through an MCP ``Server``.

    Any number of sessions, of any transport, may share one instance. Change notifications are the
    runtime's ``Notifications``: each handshake-era connection is attached to it on its requests and
    detached when it closes; listen streams open through it.

    ``abilities`` may be a ``Catalog`` of cached listings (server/tool_cache.py): tools are listed from
    them, and an ability's module is imported when the ability is first called or read through.
    """

    def __init__(
        self,
        runtime: Runtime,
        abilities: Mapping[str, Ability],
        resources: list[ResourceSpec],
        resolve_principal: PrincipalResolver,
    ) -> None:
        self.runtime = runtime
        self._registry = catalog_of(abilities).declared  # every tool, for saying why one is not offered here
        self.abilities = exposed_abilities(abilities, runtime)
        self.twins = resource_twins(abilities, runtime)
        self.resources = resources
        self.links = link_specs(self.abilities.declared.values(), resources)
        self.resolve_principal = resolve_principal
        self.notifications = Notifications.of(runtime)
        self._tools = {slug: tool_definition(a) for slug, a in self.abilities.declared.items()}
        # serve()'s: the first request after the handshake arrived; start the change watch; it has begun.
        self._answered: asyncio.Event | None = None
        self._watch_now: asyncio.Event | None = None
        self._watch_ready: asyncio.Event | None = None
        self.server: Server[Any] = _Server(
            "datamachine-mcp",
            version=runtime.version,
            title="Data Machine",
            instructions=instructions(abilities, runtime),
            icons=[SERVER_ICON],
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=self._listen,
            on_list_prompts=self._list_prompts,
            on_get_prompt=self._get_prompt,
            on_completion=self._complete,
        )
        # Seals the 2026-era request state of a question asked of the user (server/elicitation.py).
        self.server.middleware.append(state_boundary(runtime.box, self.server.name))

    def initialization_options(self) -> InitializationOptions:
        return self.server.create_initialization_options()

    async def resource_updated(self, uri: str) -> None:
        """Announce ``uri`` as changed (what a committed call does through the runtime's events)."""
        await self.notifications.resource_updated(uri)

    # --- connection and principal ---------------------------------------------------------------

    def _attach(self, ctx: ServerRequestContext[Any, Any]) -> Hashable | None:
        """The handshake-era connection of this request, attached to the notifications (and detached when
        it closes); None for a 2026-era request, whose client listens through subscriptions/listen."""
        self._answering()
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return None
        # One entry per client connection (the session object is per request; its connection is not).
        connection = getattr(ctx.session, "_connection", ctx.session)
        if self.notifications.attach(connection, ctx.session, self._probe):
            stack = getattr(connection, "exit_stack", None)
            if stack is not None:
                stack.callback(self.notifications.detach, connection)
        return connection

    async def _principal(self, ctx: ServerRequestContext[Any, Any]) -> Principal:
        key = self._attach(ctx)
        principal = await self.resolve_principal(ctx)
        if key is not None:  # also the sampling provider's back channel
            self.notifications.acting_as(key, principal)
        return principal

    async def _probe(self, uri: str, principal: Principal) -> str:
        """May ``principal`` be told that ``uri`` changed? Read it (the server's check writes no denial row)."""
        return await read(self.runtime, self.twins, self.resources, uri, principal, record_denials=False)

    # --- tools ----------------------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        try:
            principal = await self._principal(ctx)
        except CodedError as err:
            raise request_error(err) from None
        result = types.ListToolsResult(
            tools=[
                self._tools[slug]
                for slug, a in self.abilities.declared.items()
                if level_visible(principal, a.level, a.toolset)
            ]
        )
        return result

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        if params.name not in self.abilities:
            text = unknown_tool_text(
                params.name, self._registry, self.runtime.toolsets, self.runtime.tools, self.runtime.read_only
            )
            raise MCPError(code=types.INVALID_PARAMS, message=text)
        ability = self.abilities[params.name]
        try:
            principal = await self._principal(ctx)
        except CodedError as err:
            return tool_error(refusal(err))

        async def progress(value: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(value, total, message)

        # asks the user first, if the tool must
        arguments = await settle(ctx, params, ability, principal, self.runtime)
        if isinstance(arguments, Refused):
            return tool_error(refusal(arguments.error))
        if isinstance(arguments, types.InputRequiredResult):
            return arguments
        outcome = await invoke(
            self.runtime,
            ability,
            arguments,
            principal,
            request_id=str(ctx.request_id) if ctx.request_id is not None else None,
            progress=progress,
            client=ctx.session,
        )
        if outcome.error is not None:
            return tool_error(outcome.error)
        links = resource_links(ability, outcome.output or {}, self.links, self.twins)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=outcome.text), *links],
            structured_content=outcome.output,
        )

    # --- resources ------------------------------------------------------------------------------

    async def _list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        self._attach(ctx)
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
                if spec.template is None and spec.twin in self.twins
            ]
        )

    async def _list_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        self._attach(ctx)
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
                if spec.template is not None and spec.twin in self.twins
            ]
        )

    async def _read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        try:
            principal = await self._principal(ctx)
            text = await read(self.runtime, self.twins, self.resources, uri, principal)
        except CodedError as err:
            raise request_error(err, uri=uri) from None
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, text=text, mime_type="application/json")]
        )

    # --- prompts and completions ----------------------------------------------------------------

    async def _list_prompts(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        self._attach(ctx)
        return types.ListPromptsResult(prompts=[p.prompt() for p in offered(self.abilities)])

    async def _get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        self._attach(ctx)
        return render(params.name, params.arguments, offer=self.abilities, read_only=self.runtime.read_only)

    async def _complete(
        self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        try:
            principal = await self._principal(ctx)
        except CodedError as err:
            raise request_error(err) from None
        values, total = await complete(
            self.runtime, self.twins, principal, params.ref, params.argument.name, params.argument.value
        )
        return types.CompleteResult(
            completion=types.Completion(values=values, total=total, has_more=total > len(values))
        )

    # --- subscriptions --------------------------------------------------------------------------

    async def _subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        key = self._attach(ctx)
        with contextlib.suppress(CodedError):
            await self._principal(ctx)
        await self._watching()
        if key is not None:
            await self.notifications.subscribe(key, str(params.uri))
        return types.EmptyResult()

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        key = self._attach(ctx)
        if key is not None:
            self.notifications.unsubscribe(key, str(params.uri))
        return types.EmptyResult()

    async def _listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        """A 2026-era subscription stream, seeing only the updates its principal may read."""
        try:
            principal = await self._principal(ctx)
        except CodedError as err:
            raise request_error(err) from None
        uris = params.notifications.resource_subscriptions or ()
        await self._watching()
        async with self.notifications.listening(principal, self._probe, uris) as bus:
            return await ListenHandler(bus)(ctx, params)

    # --- serving ------------------------------------------------------------------------------

    async def serve(
        self, read_stream: Any, write_stream: Any, *, start: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Run one MCP connection (stdio). The watch for changes other processes make and ``start`` (the
        in-process engine) load the database layer, which the first answers do not wait for: they begin
        once the first request after the handshake is answered (or after ``START_AFTER_SECONDS``); a
        subscription starts the watch at once."""
        self._answered = asyncio.Event()
        self._watch_now = asyncio.Event()
        self._watch_ready = asyncio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            tg.start_soon(self._start_late, start)
            await self.server.run(read_stream, write_stream, self.initialization_options())
            self.notifications.close()
            tg.cancel_scope.cancel()

    async def _start_late(self, start: Callable[[], Awaitable[None]] | None) -> None:
        assert self._answered is not None and self._watch_now is not None and self._watch_ready is not None
        with anyio.move_on_after(START_AFTER_SECONDS):
            await self._answered.wait()
        await anyio.sleep(SETTLE_SECONDS)  # the answers are written before the imports hold the loop
        self._watch_now.set()
        await self._watch_ready.wait()
        if start is not None:
            await start()

    async def _watch(self) -> None:
        assert self._watch_now is not None
        await self._watch_now.wait()
        await self.notifications.watch_other_processes(self.runtime.db, ready=self._watch_ready)

    async def _watching(self) -> None:
        """A subscription is answered once the watch has read where things stand (stdio; an HTTP
        listener watches from its start)."""
        if self._watch_now is not None and self._watch_ready is not None:
            self._watch_now.set()
            await self._watch_ready.wait()

    def _answering(self) -> None:
        """A request other than initialize or ping arrived: the background may start once it is answered."""
        if self._answered is not None:
            self._answered.set()
