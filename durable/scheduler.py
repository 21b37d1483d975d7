"""Schedules: start a workflow on a cron expression or a fixed interval, exactly once per fire.

PostgreSQL holds every schedule and its next fire (``durable_schedules``); Redis only indexes
the next fires, so that the beat's leader finds what is due without scanning the table.
Keys, under the configurable prefix ``P`` (default ``durable``):

- ``P:schedules`` sorted set, member = schedule name, score = next fire (epoch seconds);
- ``P:schedules:built`` string, present while the index is known complete.

The index is rebuilt from PostgreSQL when its marker is gone (a flush, a restart without
persistence), and every sweep fires what PostgreSQL says is due in case an entry went missing
some other way. A stale entry (a schedule paused, removed or moved) is corrected when it comes
due: the row, locked, is the truth.

**A fire** of schedule ``S`` at time ``T`` starts the run ``S@T`` (``T`` in ISO-8601 UTC,
``2026-01-01T03:00:00Z``). Only the leading beat fires (:mod:`durable.leader`), in one
transaction that locks the schedule's row, starts the runs and moves ``next_fire_at`` on.
Two beats that both believe they lead take turns on the row lock, and the second finds the
fire done; a leader killed between starting a run and committing leaves the fire due, and
its successor starts the same id again, which returns the existing run.

**Time.** A cron expression is read in the schedule's time zone, the way Debian's cron does
across daylight-saving changes (a 02:30 job runs once on both change days). An interval of
``every`` seconds fires on its multiples since the Unix epoch, so ids are predictable.

**Late fires.** A fire at most ``schedule_grace`` late is on time (a leader failover, a
slow tick); older fires were missed (every beat was down), and the catch-up policy decides:
``skip`` (default) starts none of them, ``once`` starts the latest, ``all`` starts each, the
newest ``schedule_catchup_limit`` at most. **Overlap** ``skip`` (default) starts nothing while
the run of the previous fire is still running; ``allow`` does not look.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
from celery.schedules import crontab, schedule
from cronsim import CronSim, CronSimError
from sqlalchemy import Connection

from durable.config import normalise_database_url
from durable.errors import ConfigurationError, DurableError
from durable.store import engine as store_engine
from durable.store import schedules as store
from durable.store.schedules import Definition

if TYPE_CHECKING:
    from durable.runtime import Durable, WorkflowRun

log = logging.getLogger(__name__)

CATCHUP = ("skip", "once", "all")
OVERLAP = ("skip", "allow")
TASK_WORKFLOW = "durable.task"
# ``Durable.start`` takes these as its own keywords.
RESERVED_KWARGS = ("name_or_fn", "workflow_id")
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
# A schedule whose fire failed (unknown workflow, database error) is tried again after this.
RETRY_AFTER = 10.0
SECOND = timedelta(seconds=1)


class InvalidSchedule(DurableError):
    """A schedule's definition is malformed: cron expression, time zone, interval or policy."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"schedule {name!r}: {reason}" if name else reason)


class ScheduleNotFound(DurableError):
    """No schedule exists with the name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r}")


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSettings:
    """The scheduler's tunables; see :class:`durable.config.Settings` for each."""

    leader_ttl: timedelta = timedelta(seconds=10)
    """Life of the beat leader's Redis lock; renewed every third of it. A stand-by takes over
    within this (plus a second) of the leader's death."""
    schedule_grace: timedelta = timedelta(seconds=60)
    """How late a fire may be and still count as on time rather than missed."""
    schedule_catchup_limit: int = 100
    """Most missed fires one catch-up of policy ``all`` starts (the newest ones)."""


def schedule_settings(durable: Durable) -> ScheduleSettings:
    """The scheduler's settings for ``durable`` (kept with the others in its settings)."""
    settings = durable.settings
    return ScheduleSettings(
        leader_ttl=settings.leader_ttl,
        schedule_grace=settings.schedule_grace,
        schedule_catchup_limit=settings.schedule_catchup_limit,
    )


# -- when a schedule fires ------------------------------------------------------------------


def fire_id(name: str, at: datetime) -> str:
    """The workflow id of schedule ``name``'s fire at ``at``: ``name@2026-01-01T03:00:00Z``."""
    return f"{name}@{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


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
        zone = _zone(timezone, name)
        if every is not None:
            return cls(None, _whole_seconds(every, name), zone.key)
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


def _zone(timezone: str, name: str) -> ZoneInfo:
    try:
        return ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(name, f"unknown time zone {timezone!r}") from None


def _whole_seconds(every: timedelta | float, name: str) -> int:
    seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
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


# -- the Redis index ------------------------------------------------------------------------


class ScheduleIndex:
    """The sorted set of next fires, owned by this class with its key templates."""

    KEY = "{prefix}:schedules"
    BUILT_KEY = "{prefix}:schedules:built"

    def __init__(self, client: Callable[[], redis.Redis], prefix: str = "durable") -> None:
        self._client = client
        self.key = self.KEY.format(prefix=prefix)
        self.built_key = self.BUILT_KEY.format(prefix=prefix)

    def set(self, name: str, fire_at: datetime | None) -> None:
        """Index the schedule's next fire, or drop it when there is none."""
        if fire_at is None:
            self.remove(name)
        else:
            self._client().zadd(self.key, {name: fire_at.timestamp()})

    def remove(self, name: str) -> None:
        """Drop the schedule from the index."""
        self._client().zrem(self.key, name)

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Names whose indexed fire is due by ``now``, earliest first."""
        names = self._client().zrangebyscore(self.key, "-inf", now, start=0, num=limit)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def next_fire(self) -> float | None:
        """Epoch of the earliest indexed fire, or None."""
        first = self._client().zrange(self.key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def is_built(self) -> bool:
        """Whether the index is known complete (its marker survived)."""
        return bool(self._client().exists(self.built_key))

    def rebuild(self, entries: Iterable[tuple[str, float]]) -> int:
        """Index every (name, next fire) and mark the index complete, in one transaction."""
        mapping = dict(entries)
        pipe = self._client().pipeline(transaction=True)
        if mapping:
            pipe.zadd(self.key, mapping)
        pipe.set(self.built_key, "1")
        pipe.execute()
        return len(mapping)

    def scores(self) -> dict[str, float]:
        """Every indexed schedule and its score (tests, inspection)."""
        pairs: Any = self._client().zrange(self.key, 0, -1, withscores=True)
        return {k.decode(): float(v) for k, v in pairs}


# -- the Python API -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as stored, with the status of the run its last fire started."""

    name: str
    workflow: str
    args: list[Any]
    kwargs: dict[str, Any]
    cron: str | None
    every: timedelta | None
    timezone: str
    catchup: str
    overlap: str
    paused: bool
    origin: str
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    last_run_id: str | None
    last_status: str | None

    @classmethod
    def from_row(cls, row: Any) -> ScheduleInfo:
        """Build from a row of :mod:`durable.store.schedules`."""
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields; ``every`` in seconds."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["every"] = None if self.every is None else self.every.total_seconds()
        return data


@dataclass
class ImportReport:
    """What an import did: names added, updated, unchanged and removed, and its problems."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line for each entry or crontab line that could not be imported."""


class Schedules:
    """Add, list, pause, resume, remove and trigger schedules; what ``durable schedule`` runs.

    Example::

        schedules = Schedules(durable)
        schedules.add("nightly-report", "reports.nightly", cron="0 3 * * *",
                      timezone="Europe/Paris", args=["eu"])
        schedules.add("heartbeat", "ops.ping", every=30, overlap="allow")
        schedules.trigger("nightly-report")          # one run now, outside the schedule

    Given only a database (``Schedules(database_url=...)``), writes reach the Redis index
    when the beat's leader next sweeps, within a second or so, and ``trigger`` (which starts
    a run) is unavailable.
    """

    def __init__(
        self,
        durable: Durable | None = None,
        *,
        database_url: str | None = None,
        connect_retries: int = 3,
    ) -> None:
        self.durable = durable
        self.index: ScheduleIndex | None = None
        if durable is not None:
            settings = durable.settings
            database_url, connect_retries = settings.database_url, settings.connect_retries
            self.index = ScheduleIndex(lambda: durable.timer_index.client, settings.key_prefix)
        if not database_url:
            raise ConfigurationError("Schedules needs a Durable or a database_url")
        self._url, self._retries = normalise_database_url(database_url), connect_retries

    def _store(self, fn: Callable[[Connection], Any]) -> Any:
        def attempt() -> Any:
            with store_engine.autocommit(self._url).connect() as conn:
                return fn(conn)

        return store_engine.with_retry(self._url, attempt, self._retries)

    def _index(self, name: str, fire_at: datetime | None) -> None:
        if self.index is None:
            return
        try:
            self.index.set(name, fire_at)
        except redis.RedisError:
            log.warning("durable: could not index schedule %s; the beat's sweep will", name)

    def add(
        self,
        name: str,
        workflow: str,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        catchup: str = "skip",
        overlap: str = "skip",
    ) -> ScheduleInfo:
        """Create the schedule, or redefine it (a paused one stays paused).

        The first fire is the first one after now. An identical definition changes nothing.
        Raises :class:`InvalidSchedule` for a bad cron expression, time zone, interval or
        policy, and ``UnknownWorkflow`` when the app is known and lacks the workflow.
        """
        definition = self.define(
            name, workflow, cron, every, args, kwargs, timezone, catchup, overlap, "api"
        )
        self.save(definition)
        return self.get(name)

    def define(
        self,
        name: str,
        workflow: str,
        cron: str | None,
        every: timedelta | float | None,
        args: Iterable[Any],
        kwargs: Mapping[str, Any] | None,
        timezone: str,
        catchup: str,
        overlap: str,
        origin: str,
    ) -> Definition:
        """Validate a definition without writing it."""
        if not name or name != name.strip() or any(ord(c) < 32 for c in name):
            raise InvalidSchedule(name, "a name must be non-empty, without surrounding spaces")
        cadence = Cadence.parse(cron, every, timezone, name)
        if catchup not in CATCHUP:
            raise InvalidSchedule(name, f"catch-up must be skip, once or all, not {catchup!r}")
        if overlap not in OVERLAP:
            raise InvalidSchedule(name, f"overlap must be skip or allow, not {overlap!r}")
        if self.durable is not None:
            workflow = self.durable.workflow_name(workflow)
        kwargs = dict(kwargs or {})
        if set(kwargs) & set(RESERVED_KWARGS):
            raise InvalidSchedule(name, f"keywords {', '.join(RESERVED_KWARGS)} are reserved")
        args = list(args)
        try:
            json.dumps([args, kwargs])
        except (TypeError, ValueError) as exc:
            raise InvalidSchedule(name, f"arguments are not JSON-serialisable: {exc}") from None
        every_td = None if cadence.every is None else timedelta(seconds=cadence.every)
        return Definition(
            name=name,
            workflow=workflow,
            args=args,
            kwargs=kwargs,
            cron=cadence.cron,
            every=every_td,
            timezone=cadence.timezone,
            catchup=catchup,
            overlap=overlap,
            origin=origin,
        )

    def save(self, definition: Definition) -> str:
        """Write a validated definition; returns ``added``, ``updated`` or ``unchanged``."""
        cadence = Cadence.parse(definition.cron, definition.every, definition.timezone)
        next_fire = cadence.next_after(datetime.now(UTC))
        outcome, paused = self._store(lambda c: store.upsert_schedule(c, definition, next_fire))
        if outcome != "unchanged":
            self._index(definition.name, None if paused else next_fire)
        return str(outcome)

    def get(self, name: str) -> ScheduleInfo:
        """The schedule named ``name``; raises :class:`ScheduleNotFound`."""
        row = self._store(lambda c: store.get_schedule(c, name))
        if row is None:
            raise ScheduleNotFound(name)
        return ScheduleInfo.from_row(row)

    def list(self) -> builtins.list[ScheduleInfo]:
        """Every schedule, by name."""
        return [ScheduleInfo.from_row(r) for r in self._store(store.list_schedules)]

    def pause(self, name: str) -> ScheduleInfo:
        """Stop firing the schedule until :meth:`resume`; fires meanwhile are not made up."""
        if not self._store(lambda c: store.pause(c, name)):
            raise ScheduleNotFound(name)
        self._index(name, None)
        return self.get(name)

    def resume(self, name: str) -> ScheduleInfo:
        """Fire the schedule again, from its first fire after now."""
        info = self.get(name)
        cadence = Cadence.parse(info.cron, info.every, info.timezone, name)
        next_fire = cadence.next_after(datetime.now(UTC))
        if not self._store(lambda c: store.resume(c, name, next_fire)):
            raise ScheduleNotFound(name)
        self._index(name, next_fire)
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete the schedule; runs it started are kept."""
        if not self._store(lambda c: store.delete_schedule(c, name)):
            raise ScheduleNotFound(name)
        self._index(name, None)

    def trigger(self, name: str) -> WorkflowRun:
        """Start one run of the schedule now, id ``name@<now>``, whatever its policies."""
        if self.durable is None:
            raise ConfigurationError("triggering a schedule starts a run: it needs the app")
        durable, info = self.durable, self.get(name)
        at = self._store(store.now).replace(microsecond=0)
        run = durable.start(info.workflow, *info.args, workflow_id=fire_id(name, at), **info.kwargs)
        self._store(lambda c: store.record_run(c, name, at, run.id))
        return run

    def import_beat_schedule(
        self, beat_schedule: Mapping[str, Any], *, timezone: str | None = None, prune: bool = True
    ) -> ImportReport:
        """Import Celery ``beat_schedule`` entries as schedules of the ``durable.task`` workflow.

        Each entry's task runs as one durable step; its crontab is read in ``timezone``
        (default: the app's ``timezone``, else UTC). With ``prune``, schedules imported
        before whose entries are gone are removed. An entry that cannot be imported (a
        ``solar`` schedule, a crontab restricting both days) is reported in ``problems``.
        """
        if timezone is None:
            conf = self.durable.app.conf if self.durable is not None else {}
            timezone = str(conf.get("timezone") or "UTC")
        report = ImportReport()
        for name, entry in beat_schedule.items():
            try:
                definition = beat_entry(self, name, entry, timezone)
                getattr(report, self.save(definition)).append(name)
            except DurableError as exc:
                report.problems.append(f"beat_schedule entry {name!r}: {_reason(exc)}")
        if prune:
            keep = builtins.list(beat_schedule)
            report.removed = self._store(lambda c: store.prune(c, "beat_schedule", keep))
            for gone in report.removed:
                self._index(gone, None)
        return report

    def import_crontab(
        self, text: str, *, timezone: str = "UTC", catchup: str = "skip", overlap: str = "skip"
    ) -> ImportReport:
        """Turn crontab lines that name a workflow or a task into schedules.

        Mapped commands: ``durable start NAME [--args JSON] [--kwargs JSON]``,
        ``celery call TASK [--args JSON] [--kwargs JSON] [--queue Q]``, and a bare workflow or
        task name the app knows. Each schedule is named after its workflow or task (``-2``,
        ``-3`` for repeats). ``CRON_TZ=`` lines set the time zone of the lines after them.
        Every other line is reported in ``problems``; nothing is written for it.
        """
        report, seen = ImportReport(), Counter[str]()
        for number, line in enumerate(text.splitlines(), 1):
            try:
                mapped = crontab_line(self, line, timezone)
                if isinstance(mapped, str):
                    timezone = mapped
                if not isinstance(mapped, tuple):
                    continue
                expr, workflow, args, kwargs = mapped
                base = str(args[0]) if workflow == TASK_WORKFLOW else workflow
                seen[base] += 1
                name = base if seen[base] == 1 else f"{base}-{seen[base]}"
                definition = self.define(
                    name, workflow, expr, None, args, kwargs, timezone, catchup, overlap, "crontab"
                )
                self._check_not_taken(name)
                getattr(report, self.save(definition)).append(name)
            except DurableError as exc:
                report.problems.append(f"line {number}: {_reason(exc)}: {line.strip()}")
        return report

    def _check_not_taken(self, name: str) -> None:
        try:
            existing = self.get(name)
        except ScheduleNotFound:
            return
        if existing.origin != "crontab":
            raise InvalidSchedule(name, "a schedule of that name exists and is not from a crontab")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InvalidSchedule):
        return exc.reason
    return str(exc).strip("'\"") or type(exc).__name__


# -- importing Celery beat_schedule entries and crontab lines --------------------------------


def beat_entry(schedules: Schedules, name: str, entry: Mapping[str, Any], tz: str) -> Definition:
    """A ``beat_schedule`` entry as a definition of the ``durable.task`` workflow."""
    if not isinstance(entry, Mapping) or "task" not in entry or "schedule" not in entry:
        raise InvalidSchedule(name, "an entry needs a 'task' and a 'schedule'")
    spec, cron, every = entry["schedule"], None, None
    if isinstance(spec, crontab):
        cron = celery_crontab_expression(spec, name)
    elif isinstance(spec, schedule):
        every = getattr(spec, "run_every", None)
    elif isinstance(spec, timedelta | int | float):
        every = spec
    else:
        raise InvalidSchedule(name, f"a {type(spec).__name__} schedule cannot be imported")
    call = [entry["task"], list(entry.get("args") or ()), dict(entry.get("kwargs") or {})]
    if entry.get("options"):
        call.append(dict(entry["options"]))
    return schedules.define(
        name, TASK_WORKFLOW, cron, every, call, None, tz, "skip", "skip", "beat_schedule"
    )


def celery_crontab_expression(spec: Any, name: str = "") -> str:
    """The cron expression of a Celery ``crontab`` (minute hour day month weekday)."""
    parts = []
    for attr in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week"):
        value = getattr(spec, f"_orig_{attr}")
        if not isinstance(value, str | int):
            value = ",".join(str(v) for v in sorted(value))
        parts.append(str(value).replace(" ", ""))
    if parts[2] != "*" and parts[4] != "*":
        # Celery runs on days matching both; cron on days matching either.
        raise InvalidSchedule(
            name, "a crontab restricting both day_of_month and day_of_week has no cron equivalent"
        )
    return " ".join(parts)


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_REDIRECT = re.compile(r"^(\d?>>?|&>|\d?>&\d|<)")


def crontab_line(
    schedules: Schedules, line: str, timezone: str
) -> str | tuple[str, str, list[Any], dict[str, Any]] | None:
    """Read one crontab line: None (nothing to do), a time zone (``CRON_TZ=``) or a schedule.

    A schedule is (cron expression, workflow, args, kwargs). Raises :class:`InvalidSchedule`
    with the reason the line cannot be mapped.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    assignment = _ASSIGNMENT.match(text)
    if assignment:
        if assignment.group(1) not in ("CRON_TZ", "TZ"):
            return None
        return _zone(assignment.group(2).strip().strip("'\""), "").key
    if text.startswith("@"):
        nickname, _, command = text.partition(" ")
        if nickname.lower() not in NICKNAMES:
            raise InvalidSchedule("", f"{nickname} has no time to schedule")
        expr = NICKNAMES[nickname.lower()]
    else:
        parts = text.split(None, 5)
        if len(parts) < 6:
            raise InvalidSchedule("", "not a crontab line (five time fields, then a command)")
        expr, command = " ".join(parts[:5]), parts[5]
    Cadence.parse(expr, None, timezone)
    return (expr, *crontab_command(schedules, command.strip()))


def crontab_command(schedules: Schedules, command: str) -> tuple[str, list[Any], dict[str, Any]]:
    """The (workflow, args, kwargs) a crontab command runs; raises :class:`InvalidSchedule`."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise InvalidSchedule("", f"cannot read the command ({exc})") from None
    words = _drop_redirects(words)
    if any(w in ("|", "||", "&&", ";", "&") for w in words) or "%" in command:
        raise InvalidSchedule("", "a shell pipeline cannot be mapped")
    program = os.path.basename(words[0]) if words else ""
    if program == "durable" and "start" in words:
        # A fixed --id would give every fire one run: the fire's own id replaces it.
        ignored = {"--id", "--app", "-A", "--database-url"}
        name, args, kwargs, _ = _call(words[words.index("start") + 1 :], ignored)
        return name, args, kwargs
    if program == "celery" and "call" in words:
        ignored = {"--eta", "--countdown", "--expires", "--serializer", "--app", "-A"}
        task, args, kwargs, queue = _call(words[words.index("call") + 1 :], ignored)
        return TASK_WORKFLOW, [task, args, kwargs, *([{"queue": queue}] if queue else [])], {}
    durable = schedules.durable
    if durable is not None and len(words) == 1:
        if words[0] in durable.registry:
            return words[0], [], {}
        if words[0] in durable.app.tasks:
            return TASK_WORKFLOW, [words[0], [], {}], {}
    raise InvalidSchedule(
        "", "the command names no workflow or task (use durable start NAME or celery call TASK)"
    )


def _drop_redirects(words: list[str]) -> list[str]:
    kept: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif _REDIRECT.match(word):
            skip_next = word in (">", ">>", "<", "&>", "1>", "2>", "1>>", "2>>")
        else:
            kept.append(word)
    return kept


def _call(words: list[str], ignored: set[str]) -> tuple[str, list[Any], dict[str, Any], str]:
    """Read ``NAME [--args JSON] [--kwargs JSON] [--queue Q]``, skipping ``ignored`` options."""
    found: dict[str, str] = {"--args": "[]", "--kwargs": "{}", "--queue": ""}
    short = {"-a": "--args", "-k": "--kwargs", "-Q": "--queue"}
    name = None
    pairs = iter(words)
    for word in pairs:
        key, eq, value = word.partition("=")
        key = short.get(key, key)
        if key in found or key in ignored:
            found[key] = value if eq else next(pairs, "")
        elif word.startswith("-"):
            raise InvalidSchedule("", f"option {key} cannot be mapped")
        elif name is None:
            name = word
        else:
            raise InvalidSchedule("", f"unexpected argument {word!r}")
    if not name:
        raise InvalidSchedule("", "no workflow or task name")
    try:
        args, kwargs = json.loads(found["--args"]), json.loads(found["--kwargs"])
    except ValueError as exc:
        raise InvalidSchedule("", f"arguments are not valid JSON ({exc})") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidSchedule("", "--args must be a JSON array and --kwargs a JSON object")
    return name, args, kwargs, found["--queue"]
