"""Step types and handlers as data: what exists, what each accepts, and the code that runs it.

Each step type is declared once, beside its code, as a ``StepType`` in a module of ``engine.steps``
(``STEP_TYPES = (…)``); each handler likewise as a ``HandlerSpec`` in a module of ``engine.handlers``
(``HANDLER = …``). The registries below collect them on first use, so the executor, the catalogue tools,
saved-config validation, control keys and wait kinds all derive from those declarations: a new step
type or handler is one new module (plus its test).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, Literal, TypeVar

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
        """The public FieldSpec shape: {type, required, default?, secret, description, enum?, min?, max?}."""
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
    # The coroutine that runs one step of this type: ``run(StepRun) -> StepResult``.
    run: Callable[..., Any] | None = None
    # A step that parks its job names its wait kind; its state lives in engine_data[wait_kind].
    wait_kind: str | None = None
    # A step whose commit claims items (dedup): jobs whose plan has none never touch claims.
    claims_items: bool = False
    position: int = 100  # listing order


@dataclass(frozen=True)
class HandlerSpec:
    slug: str
    label: str
    description: str
    step_types: tuple[str, ...]
    fields: dict[str, FieldSpec]
    # The code: an object with ``fetch`` (fetch handlers) and/or ``publish``/``update``.
    code: Any = None
    position: int = 100  # listing order

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

# Fields every fetch handler accepts (DM FetchHandlerSettings).
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

FETCH_ONLY = (FETCH,)

AI_FIELDS = ("provider", "model", "system_prompt", "temperature", "max_tokens", "skip_marker")


def handlers_for(step_type: str) -> list[HandlerSpec]:
    return [h for h in HANDLERS.values() if step_type in h.step_types]


T = TypeVar("T", StepType, HandlerSpec)


class Registry(Mapping[str, T], Generic[T]):
    """Specs declared in the modules of a package (attribute ``attr``: one spec or a tuple), loaded once
    on first use and ordered by ``position``; ``register`` adds one at run time (tests, plugins)."""

    def __init__(self, package: str, attr: str) -> None:
        self._package, self._attr = package, attr
        self._items: dict[str, T] | None = None

    def _load(self) -> dict[str, T]:
        if self._items is None:
            found: list[T] = []
            package = importlib.import_module(self._package)
            for info in pkgutil.iter_modules(package.__path__):
                module = importlib.import_module(f"{self._package}.{info.name}")
                declared = getattr(module, self._attr, ())
                found.extend(declared if isinstance(declared, tuple) else (declared,))
            self._items = {spec.slug: spec for spec in sorted(found, key=lambda s: s.position)}
        return self._items

    def register(self, spec: T) -> None:
        self._load()[spec.slug] = spec
        _derived_cache_clear()

    def unregister(self, slug: str) -> None:
        self._load().pop(slug, None)
        _derived_cache_clear()

    def __getitem__(self, slug: str) -> T:
        return self._load()[slug]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


STEP_TYPES: Registry[StepType] = Registry("datamachine_mcp.engine.steps", "STEP_TYPES")
HANDLERS: Registry[HandlerSpec] = Registry("datamachine_mcp.engine.handlers", "HANDLER")


@cache
def claiming_step_types() -> frozenset[str]:
    return frozenset(s.slug for s in STEP_TYPES.values() if s.claims_items)


@cache
def wait_kinds() -> tuple[str, ...]:
    """The wait kinds of parking step types (also their engine_data state keys)."""
    return tuple(s.wait_kind for s in STEP_TYPES.values() if s.wait_kind)


def _derived_cache_clear() -> None:
    claiming_step_types.cache_clear()
    wait_kinds.cache_clear()
