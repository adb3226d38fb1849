"""Base models for ability inputs and outputs, and field types shared by many tools.

Inputs are strict and closed (unknown fields are rejected), so the published JSON schema is what is
enforced; the only leniency is the two client forms read in ``input_forms`` (``"6"`` for an integer,
JSON text for an object or array). In outputs, a field
declared with ``Opt(...)`` is left out when it does not apply; every other field is always present.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, get_args

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator
from pydantic.fields import FieldInfo

from datamachine_mcp.storage.timeutil import iso, parse_datetime

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Input(BaseModel):
    """Base of every ability input model."""

    # defer_build: validators are built on first use, so starting the server does not build ~90 of them.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False, defer_build=True)

    # Unknown key -> the field to suggest, where a close match would miss or mislead.
    field_hints: ClassVar[Mapping[str, str]] = {}

    @field_validator("*", mode="after")
    @classmethod
    def _fits_64_bits(cls, value: Any, info: ValidationInfo) -> Any:
        # Ids, offsets and counts end up in SQL parameters, which hold 64 bits: refuse larger ones here
        # (a validation error on the field) rather than fail in the driver.
        for number in value if isinstance(value, list) else (value,):
            if type(number) is int and not INT64_MIN <= number <= INT64_MAX:
                raise ValueError(_range_text(info.field_name or "", cls.model_fields.get(info.field_name or "")))
        return value


def _rules(annotation: Any, found: list[Any]) -> list[Any]:
    """A field's constraints, including those of its list items (``list[Annotated[int, Field(ge=1)]]``)."""
    for arg in get_args(annotation):
        if isinstance(arg, FieldInfo):
            found += arg.metadata
        elif get_args(arg):
            _rules(arg, found)
    return found


def _range_text(name: str, field: FieldInfo | None) -> str:
    """The range a 64-bit field accepts, from its own minimum: "a positive id" for ids."""
    low = INT64_MIN
    for rule in _rules(field.annotation, list(field.metadata)) if field is not None else ():
        if isinstance(rule, annotated_types.Ge) and isinstance(rule.ge, int):
            low = rule.ge
        elif isinstance(rule, annotated_types.Gt) and isinstance(rule.gt, int):
            low = rule.gt + 1
    if low == 1 and (name.endswith("_id") or name.endswith("_ids")):
        return f"must be a positive id (1 to {INT64_MAX})"
    return f"must be from {low} to {INT64_MAX}"


def _is_none(value: Any) -> bool:
    return value is None


def Opt(description: str, **kwargs: Any) -> Any:
    """An output field that is omitted when it does not apply."""
    return Field(None, description=description, exclude_if=_is_none, **kwargs)


class Output(BaseModel):
    """Base of every ability output model: exactly the listed fields, ``|null`` ones always present."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True, defer_build=True)


def _parse_dt(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_datetime(value)
        except ValueError as exc:
            raise ValueError("must be an ISO 8601 date-time or 'YYYY-MM-DD HH:MM:SS' (UTC)") from exc
    return value


# Datetime inputs accept ISO 8601 or "YYYY-MM-DD HH:MM:SS", read as UTC.
DateTimeIn = Annotated[
    datetime,
    BeforeValidator(_parse_dt),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]

# Outputs carry ISO 8601 strings with a Z suffix.
Timestamp = Annotated[str, Field(description="ISO 8601 UTC timestamp")]


def ts(value: datetime | None) -> str | None:
    return iso(value)


def Id(description: str) -> Any:
    """An integer id field (≥ 1)."""
    return Field(default=None, ge=1, description=description)


PER_PAGE_DESC = "Page size"
OFFSET_DESC = "Rows to skip"


class PageOut(Output):
    total: int = Field(description="Rows matching the filters (before paging)")
    per_page: int = Field(description="Page size used")
    offset: int = Field(description="Offset used")
