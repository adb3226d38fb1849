"""Base models for ability inputs and outputs, and field types shared by many tools.

Inputs are strict and closed (unknown fields are rejected), so the published JSON schema is what is
enforced; the only leniency is the two client forms read in ``input_forms`` (``"6"`` for an integer,
JSON text for an object or array). In outputs, a field
declared with ``Opt(...)`` is left out when it does not apply; every other field is always present.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from datamachine_mcp.storage.timeutil import iso, parse_datetime

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Input(BaseModel):
    """Base of every ability input model."""

    # defer_build: validators are built on first use, so starting the server does not build ~90 of them.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False, defer_build=True)

    # Unknown key -> the field to suggest, where a close match would miss or mislead.
    field_hints: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="after")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        # Ids, offsets and counts end up in SQL parameters, which hold 64 bits: refuse larger ones here
        # (a validation error on the field) rather than fail in the driver.
        for number in value if isinstance(value, list) else (value,):
            if type(number) is int and not INT64_MIN <= number <= INT64_MAX:
                raise ValueError(f"must be between {INT64_MIN} and {INT64_MAX}")
        return value


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
