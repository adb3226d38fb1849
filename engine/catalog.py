"""Step types and handlers as data (engine.md §15): what exists, what each accepts.

The catalogue is declarative: slugs, labels, the step types a handler serves and its config fields.
Abilities validate saved configs against it; the engine looks up the code that runs a handler in
``engine.handlers`` by the same slug.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FieldType = Literal["string", "integer", "number", "boolean", "object", "array"]


@dataclass(frozen=True)
class FieldSpec:
    type: FieldType
    description: str
    required: bool = False
    default: Any = None
    secret: bool = False
    enum: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    items: FieldType | None = None  # element type of an array
    # Step types the field applies to (None = all the handler's types); e.g. files.pattern is fetch-only.
    step_types: tuple[str, ...] | None = None
    # Extra validation of a string value (engine/configs.py): url = http(s); feed_url = http(s) or file:///
    # inside files_allowed_roots; directory = absolute, inside the roots; filename_template = a safe name.
    kind: Literal["url", "feed_url", "directory", "filename_template"] | None = None

    def public(self) -> dict[str, Any]:
        """The FieldSpec shape of abilities.md §3: {type, required, default?, secret, description, enum?, min?, max?}."""
        out: dict[str, Any] = {"type": self.type, "required": self.required, "secret": self.secret}
        if self.default is not None:
            out["default"] = self.default
        description = self.description
        if self.step_types is not None:
            description += f" ({'/'.join(self.step_types)} steps only)"
        out["description"] = description
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


@dataclass(frozen=True)
class StepType:
    slug: str
    label: str
    description: str
    uses_handler: bool
    multi_handler: bool = False
    queue_slot: Literal["prompt_queue", "config_patch_queue"] | None = None
    settings_fields: dict[str, FieldSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class HandlerSpec:
    slug: str
    label: str
    description: str
    step_types: tuple[str, ...]
    fields: dict[str, FieldSpec]

    @property
    def supports_test(self) -> bool:
        return "fetch" in self.step_types

    def fields_for(self, step_type: str) -> dict[str, FieldSpec]:
        """Fields that apply to ``step_type``, including the common fetch fields for fetch steps."""
        own = {n: f for n, f in self.fields.items() if f.step_types is None or step_type in f.step_types}
        return {**own, **COMMON_FETCH_FIELDS} if step_type == "fetch" else own

    def all_fields(self) -> dict[str, FieldSpec]:
        return {**self.fields, **COMMON_FETCH_FIELDS} if self.supports_test else dict(self.fields)


FETCH, PUBLISH, UPDATE = "fetch", "publish", "update"
PUBLISHING = (PUBLISH, UPDATE)

# engine.md §15.2: fields every fetch handler accepts (DM FetchHandlerSettings).
COMMON_FETCH_FIELDS: dict[str, FieldSpec] = {
    "max_items": FieldSpec("integer", "Items taken per run (0 = unlimited)", default=1, min=0, max=100),
    "timeframe_limit": FieldSpec(
        "string",
        "Drop dated items older than this",
        default="all_time",
        enum=("all_time", "24_hours", "72_hours", "7_days", "30_days"),
    ),
    "search": FieldSpec("string", "Comma-separated keywords; keep items whose title or body contains any"),
    "exclude_keywords": FieldSpec("string", "Comma-separated keywords; drop items containing any"),
}

_FETCH_ONLY = (FETCH,)
_PUBLISH_ONLY = PUBLISHING

HANDLERS: dict[str, HandlerSpec] = {
    h.slug: h
    for h in (
        HandlerSpec(
            "rss",
            "RSS / Atom feed",
            "Fetch items from an RSS 2.0, RSS 1.0/RDF or Atom feed.",
            (FETCH,),
            {
                "feed_url": FieldSpec(
                    "string",
                    "Feed URL: http(s), or file:///absolute/path of a feed file inside files_allowed_roots",
                    required=True,
                    kind="feed_url",
                )
            },
        ),
        HandlerSpec(
            "http_json",
            "HTTP JSON API",
            "GET a JSON API and map an array of objects to items.",
            (FETCH,),
            {
                "url": FieldSpec("string", "API URL (http or https)", required=True, kind="url"),
                "headers": FieldSpec("object", "Extra request headers (stored encrypted)", secret=True),
                "items_path": FieldSpec("string", 'Dotted path to the array ("" = the root)', default=""),
                "title_field": FieldSpec("string", "Dotted path of the title in each element", default="title"),
                "body_field": FieldSpec("string", "Dotted path of the body in each element", default="body"),
                "identifier_field": FieldSpec("string", "Dotted path of the item identifier", default="id"),
                "link_field": FieldSpec("string", "Dotted path of the item URL", default="url"),
                "date_field": FieldSpec("string", "Dotted path of the date (ISO 8601 or Unix seconds)"),
            },
        ),
        HandlerSpec(
            "files",
            "Files",
            "Read files from a directory (fetch), or write Markdown/JSON files into one (publish, update).",
            (FETCH, PUBLISH, UPDATE),
            {
                "directory": FieldSpec(
                    "string", "Absolute directory inside files_allowed_roots", required=True, kind="directory"
                ),
                "pattern": FieldSpec("string", "Glob of files to read", default="*", step_types=_FETCH_ONLY),
                "recursive": FieldSpec("boolean", "Descend into subdirectories", default=False, step_types=_FETCH_ONLY),
                "max_file_bytes": FieldSpec(
                    "integer", "Skip larger files", default=1048576, min=1, max=104857600, step_types=_FETCH_ONLY
                ),
                "encoding": FieldSpec("string", "Text encoding of the files", default="utf-8", step_types=_FETCH_ONLY),
                "format": FieldSpec(
                    "string", "Output format", default="markdown", enum=("markdown", "json"), step_types=_PUBLISH_ONLY
                ),
                "filename_template": FieldSpec(
                    "string",
                    "File name with {job_id} {flow_id} {date} {slug} {item_hash}; default {date}-{slug}.md/.json",
                    step_types=_PUBLISH_ONLY,
                    kind="filename_template",
                ),
                "overwrite": FieldSpec(
                    "boolean", "Replace an existing file (else add -2, -3, …)", default=False, step_types=_PUBLISH_ONLY
                ),
            },
        ),
        HandlerSpec(
            "webhook_payload",
            "Webhook payload",
            "Items from the inbound webhook request that started the job.",
            (FETCH,),
            {
                "items_path": FieldSpec("string", "Dotted path to an array of items (absent = one item)"),
                "title_path": FieldSpec("string", "Dotted path of the title (title_path or body_path required)"),
                "body_path": FieldSpec("string", "Dotted path of the body (title_path or body_path required)"),
                "identifier_path": FieldSpec("string", "Dotted path of the item identifier"),
                "item_identifier_template": FieldSpec(
                    "string", 'Identifier built from paths, e.g. "{event.id}-{action}"'
                ),
                "metadata": FieldSpec("object", "Extra metadata: name → dotted path"),
                "ignore_missing_paths": FieldSpec(
                    "boolean", "Missing paths give no items instead of failing", default=False
                ),
                "source_type": FieldSpec("string", "source_type recorded for dedup", default="webhook_payload"),
            },
        ),
        HandlerSpec(
            "webhook",
            "Webhook",
            "POST the item as JSON to a URL, signed with HMAC-SHA256 when a secret is set.",
            PUBLISHING,
            {
                "url": FieldSpec("string", "Receiver URL (http or https)", required=True, kind="url"),
                "secret": FieldSpec("string", "HMAC-SHA256 signing secret (stored encrypted)", secret=True),
                "headers": FieldSpec("object", "Extra request headers (stored encrypted)", secret=True),
                "include_engine_data": FieldSpec(
                    "array",
                    "engine_data keys sent along",
                    items="string",
                    default=["item_identifier", "source_url", "post_id", "published_url", "file_path"],
                ),
            },
        ),
        HandlerSpec(
            "wordpress",
            "WordPress",
            "Create (publish) or edit (update) posts through the WordPress REST API with an application password.",
            PUBLISHING,
            {
                "site_url": FieldSpec("string", "Site URL, e.g. https://example.com", required=True, kind="url"),
                "username": FieldSpec("string", "WordPress user name", required=True),
                "application_password": FieldSpec(
                    "string", "Application password (stored encrypted)", required=True, secret=True
                ),
                "post_type_base": FieldSpec("string", "REST base of the post type", default="posts"),
                "post_status": FieldSpec(
                    "string", "Status of new posts", default="draft", enum=("draft", "publish", "pending", "private")
                ),
                "categories": FieldSpec("array", "Category term ids", items="integer"),
                "tags": FieldSpec("array", "Tag term ids", items="integer"),
                "api_base": FieldSpec("string", "REST API base (default {site_url}/wp-json)", kind="url"),
                "post_id_key": FieldSpec(
                    "string", "engine_data key holding the post id to update", default="post_id", step_types=(UPDATE,)
                ),
            },
        ),
    )
}

_GATE_FIELDS = {
    "description": FieldSpec("string", "Shown to reviewers / sent with the notification"),
    "timeout_hours": FieldSpec("integer", "Hours before the wait times out (0 = none)", default=0, min=0, max=8760),
    "notify_url": FieldSpec("string", "URL notified (signed POST) when a job parks here", kind="url"),
}

STEP_TYPES: dict[str, StepType] = {
    s.slug: s
    for s in (
        StepType(
            "fetch", "Fetch", "Fetch new items from a source with one handler.", True, queue_slot="config_patch_queue"
        ),
        StepType(
            "ai",
            "AI",
            "Transform the item with an AI model (provider, model, prompts).",
            False,
            queue_slot="prompt_queue",
        ),
        StepType("publish", "Publish", "Publish the item with one or more handlers.", True, multi_handler=True),
        StepType(
            "update",
            "Update",
            "Update a previously published target with one or more handlers.",
            True,
            multi_handler=True,
        ),
        StepType(
            "approval",
            "Approval",
            "Park the job until a person accepts or rejects it.",
            False,
            settings_fields={
                **_GATE_FIELDS,
                "on_reject": FieldSpec(
                    "string", "What a rejection does to the job", default="skip", enum=("skip", "fail")
                ),
            },
        ),
        StepType(
            "webhook_gate",
            "Webhook gate",
            "Park the job until an HTTP POST to its resume URL arrives.",
            False,
            settings_fields=dict(
                _GATE_FIELDS,
                timeout_hours=FieldSpec(
                    "integer",
                    "Hours before the gate expires (0 = webhook_gate_default_expiry_hours)",
                    default=0,
                    min=0,
                    max=8760,
                ),
            ),
        ),
        StepType(
            "system_task",
            "System task",
            "Run a maintenance task (retention, recover_stuck_jobs, echo).",
            False,
            settings_fields={
                "task_type": FieldSpec(
                    "string", "Task to run", required=True, enum=("retention", "recover_stuck_jobs", "echo")
                ),
                "params": FieldSpec("object", "Task parameters", default={}),
            },
        ),
    )
}

AI_FIELDS = ("provider", "model", "system_prompt", "temperature", "max_tokens", "skip_marker")
PROVIDERS = ("openai", "anthropic", "sampling")


def handlers_for(step_type: str) -> list[HandlerSpec]:
    return [h for h in HANDLERS.values() if step_type in h.step_types]
