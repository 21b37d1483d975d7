"""Durations as the API takes them (a ``timedelta`` or seconds) and as stored (seconds).

:func:`seconds` converts a duration already known to be sound. Durations given to durable
are checked where they are given rather than where they are stored, by :func:`checked`.

``ctx.sleep``, a step's ``timeout``, a signal wait's ``timeout``, a workflow's
``execution_timeout`` and the duration settings accept a ``timedelta`` or a number of
seconds. Each must be finite, not negative, and at most :data:`MAX_DURATION` (a century):
anything longer overflows the time arithmetic of Python or PostgreSQL once added to now,
and failed the run with a raw database error instead of refusing the call.

Example::

    checked("ctx.sleep", timedelta(days=30))     # 2592000.0
    checked("ctx.sleep", float("nan"))           # InvalidDuration: ... not a finite number
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, overload

from durable.errors import InvalidDuration

MAX_DURATION = timedelta(days=365 * 100)
"""Longest duration accepted anywhere."""


@overload
def seconds(value: timedelta | float) -> float: ...
@overload
def seconds(value: timedelta | float | None) -> float | None: ...
def seconds(value: timedelta | float | None) -> float | None:
    """``value`` in seconds: a ``timedelta``'s total, a number as a float, None as None."""
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def checked(what: str, value: Any, *, positive: bool = False) -> float:
    """``value`` (a ``timedelta`` or seconds) as seconds, or :class:`InvalidDuration`.

    Args:
        what: What the duration is for, for the message (``ctx.sleep``, ``timeout``...).
        value: A ``timedelta``, an ``int`` or a ``float``.
        positive: Refuse zero too.
    """
    if isinstance(value, timedelta):
        amount = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            amount = float(value)
        except OverflowError:
            raise InvalidDuration(what, value, "is too large") from None
    else:
        raise InvalidDuration(what, value, "must be a timedelta or a number of seconds")
    if not math.isfinite(amount):
        raise InvalidDuration(what, value, "is not a finite number of seconds")
    if amount < 0 or (positive and amount == 0):
        raise InvalidDuration(what, value, "must be positive" if positive else "is negative")
    if amount > MAX_DURATION.total_seconds():
        raise InvalidDuration(what, value, f"is longer than {MAX_DURATION.days} days")
    return amount


def sleep_seconds(value: Any) -> float:
    """A sleep's length in seconds: checked as :func:`checked`, a negative one taken as 0."""
    if isinstance(value, timedelta) and value < timedelta(0):
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return 0.0
    return checked("ctx.sleep", value)


def optional_checked(what: str, value: Any, *, positive: bool = False) -> float | None:
    """Like :func:`checked`, with ``None`` passed through (no limit)."""
    return None if value is None else checked(what, value, positive=positive)
