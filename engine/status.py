"""Job statuses: classes, display form and parsing (docs/engine.md, Job statuses)."""

from __future__ import annotations

PENDING, PROCESSING, WAITING = "pending", "processing", "waiting"
COMPLETED, NO_ITEMS, SKIPPED = "completed", "completed_no_items", "agent_skipped"
FAILED, CANCELLED = "failed", "cancelled"

ALL = (PENDING, PROCESSING, WAITING, COMPLETED, NO_ITEMS, SKIPPED, FAILED, CANCELLED)
ACTIVE = (PENDING, PROCESSING, WAITING)
FINAL = (COMPLETED, NO_ITEMS, SKIPPED, FAILED, CANCELLED)
SUCCESS = (COMPLETED, NO_ITEMS, SKIPPED)
# Backpressure and overlap count these (a parked job does not block new runs).
RUNNING = (PENDING, PROCESSING)

MAX_REASON = 500


def display(status: str, reason: str | None) -> str:
    """``"<base> - <reason>"`` or the bare base (DM HEAD's status display)."""
    return f"{status} - {reason}" if reason else status


def parse(text: str) -> tuple[str, str | None]:
    """A compound status (``"failed - timeout"``, ``"failed:timeout"``) → (base, reason), longest base first."""
    value = text.strip()
    for base in sorted(ALL, key=len, reverse=True):
        if value == base:
            return base, None
        for sep in (" - ", ":"):
            if value.startswith(base + sep):
                reason = value[len(base) + len(sep) :].strip()
                return base, reason or None
    raise ValueError(f"unknown job status {text!r}")


def clip_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason[:MAX_REASON]
