"""Durations as the API takes them (a ``timedelta`` or seconds) and as stored (seconds)."""

from __future__ import annotations

from datetime import timedelta
from typing import overload


@overload
def seconds(value: timedelta | float) -> float: ...
@overload
def seconds(value: timedelta | float | None) -> float | None: ...
def seconds(value: timedelta | float | None) -> float | None:
    """``value`` in seconds: a ``timedelta``'s total, a number as a float, None as None."""
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
