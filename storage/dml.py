"""Results of UPDATE and DELETE statements."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy.engine import CursorResult, Result


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched.

    ``Session.execute`` is typed as returning a plain ``Result``; for DML it is a ``CursorResult``,
    which carries the count.
    """
    return int(cast("CursorResult[Any]", result).rowcount or 0)
