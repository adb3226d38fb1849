"""What the job runner calls to run fetch, publish and update handlers (docs/engine.md, Steps and handlers).

Interface
---------
* ``HandlerContext`` — everything a handler may use besides its config: job/flow/step ids, the
  step type, ``dry_run``, a read-only view of ``engine_data``, an :class:`engine.http.Outbound`,
  the resolved ``files_roots``, the settings snapshot and the server version.
* Fetch: ``FETCHERS[slug].fetch(config, ctx) -> ItemList`` returns the source's items in source
  order with identifiers already normalised (> 255 chars → ``sha256:…``), **before** the common
  filters. ``engine.handlers.run_fetch(slug, config, ctx)`` is the one-stop call: defaults,
  handler, filters (``timeframe_limit``, ``search``, ``exclude_keywords``); its ``ItemList``
  carries ``source_count``, ``filtered_out``, ``skipped`` (reason → count, e.g. ``non_object``,
  ``oversized``) and ``source_type`` (the dedup source type: the slug, or ``webhook_payload``'s
  ``source_type`` field). Dedup, ``max_items`` and claims are the runner's.
* Publish/update: ``PUBLISHERS[slug].publish(config, packet, ctx)`` /
  ``.update(config, packet, ctx)`` → :class:`PublishResult`; ``engine.handlers.run_publish``
  dispatches on ``ctx.step_type``. ``packet`` is the newest input packet (index 0).
* Configs: :func:`prepare_config` = decrypt secret fields (``secret_unavailable``) + defaults +
  run-time validation (``handler_config_invalid``); :func:`with_defaults` does the last two on an
  already decrypted config. Handlers call ``with_defaults`` themselves too (idempotent).
* Errors: handlers raise :class:`engine.errors.StepError` (docs/engine.md, Outbound HTTP and files).

``PublishResult`` is a plain dict: ``{status: "published"|"updated"|"preview", url?, path?,
post_id?, status_code?, preview?, response?, engine_updates}``; ``response`` (first 1,000
characters of a webhook receiver's reply) is an addition. :func:`result_entry` gives the
``data.results`` element (``{handler, status, url?, …}``, without ``engine_updates``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict

from datamachine_mcp.engine.catalog import HANDLERS, HandlerSpec
from datamachine_mcp.engine.configs import handler_config_problem, open_secrets, problem_detail
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.items import ItemList
from datamachine_mcp.storage.crypto import MASK, SecretBox, SecretUnavailable, is_envelope


@dataclass(frozen=True)
class HandlerContext:
    job_id: int | None
    flow_id: int | None
    pipeline_id: int | None
    flow_step_id: str | None
    step_type: str
    dry_run: bool
    engine_data: Mapping[str, Any]
    outbound: Outbound
    files_roots: list[Path]
    settings: Mapping[str, Any]
    version: str
    extra: dict[str, Any] = field(default_factory=dict)


class PublishResult(TypedDict):
    status: str
    engine_updates: dict[str, Any]
    url: NotRequired[str]
    path: NotRequired[str]
    post_id: NotRequired[int | str]
    status_code: NotRequired[int]
    preview: NotRequired[Any]
    response: NotRequired[str]


class FetchHandler(Protocol):
    async def fetch(self, config: dict[str, Any], ctx: HandlerContext) -> ItemList: ...


class PublishHandler(Protocol):
    async def publish(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult: ...

    async def update(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult: ...


class _CodeByStepType(Mapping[str, Any]):
    """slug → handler code of the registered handlers serving ``step_types`` (a view of ``HANDLERS``)."""

    def __init__(self, *step_types: str) -> None:
        self._step_types = step_types

    def _specs(self) -> dict[str, HandlerSpec]:
        return {s.slug: s for s in HANDLERS.values() if set(s.step_types) & set(self._step_types)}

    def __getitem__(self, slug: str) -> Any:
        return self._specs()[slug].code

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs())

    def __len__(self) -> int:
        return len(self._specs())


FETCHERS: Mapping[str, FetchHandler] = _CodeByStepType("fetch")
PUBLISHERS: Mapping[str, PublishHandler] = _CodeByStepType("publish", "update")


def result_entry(handler: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data.results`` element of a publish/update packet for one handler's result."""
    out: dict[str, Any] = {"handler": handler, "status": result["status"]}
    for key in ("url", "path", "post_id", "status_code", "preview"):
        if result.get(key) is not None:
            out[key] = result[key]
    return out


def _spec(handler: HandlerSpec | str) -> HandlerSpec:
    if isinstance(handler, HandlerSpec):
        return handler
    spec = HANDLERS.get(handler)
    if spec is None:
        raise StepError("handler_not_found", f"Handler '{handler}' is not registered")
    return spec


def with_defaults(handler: HandlerSpec | str, step_type: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults applied and the config validated for a run (``handler_config_invalid``).

    Path and URL *safety* (``kind`` fields) is not judged here: the handlers check the actual
    directory, file name and URL and fail with ``path_not_allowed``/``url_not_allowed``.
    A secret field still holding an envelope (not decrypted) → ``secret_unavailable``.
    """
    spec = _spec(handler)
    if step_type not in spec.step_types:
        raise StepError("handler_config_invalid", f"Handler '{spec.slug}' does not serve {step_type} steps")
    fields = spec.fields_for(step_type)
    cleaned: dict[str, Any] = {}
    for name, value in config.items():
        spec_field = fields.get(name)
        if spec_field is not None and spec_field.secret:
            if value == MASK:
                continue
            if is_envelope(value):
                raise StepError(
                    "secret_unavailable", f"The secret field '{name}' of handler '{spec.slug}' is still encrypted"
                )
        if value is not None:
            cleaned[name] = value
    problem = handler_config_problem(spec, step_type, cleaned, check_kinds=False)
    if problem is not None:
        raise StepError(
            "handler_config_invalid",
            f"Invalid config for handler '{spec.slug}': {problem_detail(problem)}",
            diagnostics={"handler": spec.slug, **{k: v for k, v in problem.items() if k != "field_specs"}},
        )
    out = {name: copy.deepcopy(f.default) for name, f in fields.items() if f.default is not None}
    out.update(cleaned)
    for name in fields:
        out.setdefault(name, None)
    return out


def prepare_config(
    handler: HandlerSpec | str, step_type: str, config: Mapping[str, Any], box: SecretBox
) -> dict[str, Any]:
    """Decrypt secret fields (``secret_unavailable`` on failure), then :func:`with_defaults`."""
    spec = _spec(handler)
    try:
        opened = open_secrets(spec, config, box)
    except SecretUnavailable as exc:
        raise StepError(
            "secret_unavailable", f"A secret of handler '{spec.slug}' cannot be decrypted: {exc}", retryable=False
        ) from exc
    return with_defaults(spec, step_type, opened)


def packet_parts(packet: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(data, metadata)`` of an input packet (empty dicts when absent or malformed)."""
    if not isinstance(packet, Mapping):
        return {}, {}
    data = packet.get("data")
    metadata = packet.get("metadata")
    return (dict(data) if isinstance(data, Mapping) else {}), (dict(metadata) if isinstance(metadata, Mapping) else {})


def packet_title_body(packet: Mapping[str, Any] | None) -> tuple[str, str]:
    data, _ = packet_parts(packet)
    title = data.get("title")
    body = data.get("body")
    if body is None:
        body = data.get("content_string")
    return ("" if title is None else str(title)), ("" if body is None else str(body))


def item_identity(packet: Mapping[str, Any] | None, engine_data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(item_identifier, source_url)`` from the packet's metadata, else from engine_data."""
    _, metadata = packet_parts(packet)
    identifier = metadata.get("item_identifier") or engine_data.get("item_identifier")
    source_url = metadata.get("source_url") or engine_data.get("source_url")
    return (None if identifier is None else str(identifier)), (None if source_url is None else str(source_url))
