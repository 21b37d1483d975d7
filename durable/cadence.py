"""When a schedule fires: a cron expression in a time zone, or every N whole seconds.

Pure time arithmetic, no I/O: :class:`Cadence` validates a definition and walks its fire
times (whole seconds, UTC); :func:`plan_fires` decides what one pass over a due schedule
starts under its catch-up policy; :func:`fire_id` names the run a fire starts. The rules
(Debian cron's reading of daylight-saving changes, intervals on multiples of the epoch, the
grace and catch-up policies) are in :mod:`durable.scheduler`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from durable import durations
from durable.errors import InvalidSchedule

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# The most on-time fires one pass starts (a long grace on a schedule of every second).
ON_TIME_LIMIT = 1000
SECOND = timedelta(seconds=1)


def fire_id(name: str, at: datetime) -> str:
    """The workflow id of schedule ``name``'s fire at ``at``: ``name@2026-01-01T03:00:00Z``."""
    return f"{name}@{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def parse_fire_id(workflow_id: str | None) -> tuple[str, datetime] | None:
    """The (schedule name, fire time) of a run id made by :func:`fire_id`, else None."""
    name, sep, when = (workflow_id or "").rpartition("@")
    if not sep or not name or len(when) != 20 or not when.endswith("Z"):
        return None
    try:
        return name, datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class Cadence:
    """When a schedule fires: a cron expression in a time zone, or every N whole seconds.

    Build it with :meth:`parse`, which validates; fire times are whole seconds in UTC.
    """

    cron: str | None
    every: int | None
    timezone: str

    @classmethod
    def parse(
        cls,
        cron: str | None,
        every: timedelta | float | None,
        timezone: str = "UTC",
        name: str = "",
    ) -> Cadence:
        """Validate a definition; raises :class:`InvalidSchedule` with a one-line reason."""
        if (cron is None) == (every is None):
            raise InvalidSchedule(name, "give either a cron expression or an interval (every)")
        zone = time_zone(timezone, name)
        if every is not None:
            return cls(None, whole_seconds(every, name), zone.key)
        expr = " ".join(str(cron).split())
        expr = NICKNAMES.get(expr.lower(), expr)
        try:
            CronSim(expr, datetime.now(zone))
        except CronSimError as exc:
            reason = str(exc).rstrip(".").lower()
            raise InvalidSchedule(name, f"invalid cron expression {cron!r}: {reason}") from None
        cadence = cls(expr, None, zone.key)
        if cadence.next_after(datetime.now(UTC)) is None:
            raise InvalidSchedule(name, f"cron expression {cron!r} never fires")
        return cadence

    @property
    def zone(self) -> ZoneInfo:
        """The time zone cron fields are read in."""
        return ZoneInfo(self.timezone)

    def next_after(self, t: datetime) -> datetime | None:
        """The first fire strictly after ``t``, or None if the expression never fires again."""
        if self.every is not None:
            return _epoch((math.floor(t.timestamp()) // self.every + 1) * self.every)
        assert self.cron is not None
        found = CronSim(self.cron, t.astimezone(self.zone))
        # On the day clocks go back, a local time given for the hour's second pass is read as
        # its first; the few extra steps move past ``t``.
        for _ in range(4):
            try:
                fire = next(found).astimezone(UTC)
            except StopIteration:
                return None
            if fire > t:
                return fire
        return None

    def newest(self, lo: datetime, hi: datetime, limit: int) -> list[datetime]:
        """The newest ``limit`` fires in ``[lo, hi]``, oldest first."""
        if limit <= 0 or hi < lo:
            return []
        if self.every is not None:
            top = math.floor(hi.timestamp()) // self.every
            bottom = max(math.ceil(lo.timestamp() / self.every), top - limit + 1)
            return [_epoch(k * self.every) for k in range(bottom, top + 1)]
        assert self.cron is not None
        start = hi.replace(microsecond=0) + SECOND  # going back yields fires before start
        found = CronSim(self.cron, start.astimezone(self.zone), reverse=True)
        fires: list[datetime] = []
        for fire in found:
            at = fire.astimezone(UTC)
            if at < lo or len(fires) >= limit:
                break
            if at <= hi:
                fires.append(at)
        return sorted(set(fires))


def time_zone(timezone: str, name: str) -> ZoneInfo:
    """The zone named ``timezone``; :class:`InvalidSchedule` for schedule ``name`` if none."""
    try:
        return ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(name, f"unknown time zone {timezone!r}") from None


def whole_seconds(every: timedelta | float, name: str) -> int:
    """An interval as whole seconds (at least 1); :class:`InvalidSchedule` otherwise."""
    seconds = durations.seconds(every)
    if seconds < 1 or seconds != int(seconds):
        raise InvalidSchedule(
            name, f"the interval must be a whole number of seconds, at least 1, not {seconds:g}"
        )
    return int(seconds)


@dataclass(frozen=True)
class FirePlan:
    """What one pass over a due schedule starts, and when it fires next."""

    fires: list[datetime]
    """Fire times to start, oldest first."""
    missed_since: datetime | None
    """The first missed fire (older than the grace) when some were not started."""
    next_fire_at: datetime | None


def plan_fires(
    cadence: Cadence, first: datetime, now: datetime, catchup: str, grace: timedelta, limit: int
) -> FirePlan:
    """Decide the fires due by ``now`` of a schedule whose next fire was ``first``."""
    if first > now:
        return FirePlan([], None, first)
    cut = now - grace
    on_time = cadence.newest(max(first, cut), now, ON_TIME_LIMIT)
    missed: list[datetime] = []
    if first < cut and catchup != "skip":
        count = 1 if catchup == "once" else limit
        missed = cadence.newest(first, cut - timedelta(microseconds=1), count)
    left_out = first < cut and (not missed or missed[0] > first)
    return FirePlan(missed + on_time, first if left_out else None, cadence.next_after(now))
