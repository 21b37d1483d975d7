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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import Connection

from durable import client, schedule_import
from durable.cadence import Cadence, fire_id
from durable.config import normalise_database_url
from durable.errors import ConfigurationError, InvalidSchedule, ScheduleNotFound
from durable.schedule_import import ImportReport
from durable.store import engine as store_engine
from durable.store import schedules as store
from durable.store.schedules import Definition

if TYPE_CHECKING:
    from durable.client import WorkflowRun
    from durable.core import Core

log = logging.getLogger(__name__)

CATCHUP = ("skip", "once", "all")
OVERLAP = ("skip", "allow")
# ``Durable.start`` takes these as its own keywords.
RESERVED_KWARGS = ("name_or_fn", "workflow_id")
# A schedule whose fire failed (unknown workflow, database error) is tried again after this.
RETRY_AFTER = 10.0


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


def schedule_settings(durable: Core) -> ScheduleSettings:
    """The scheduler's settings for ``durable`` (kept with the others in its settings)."""
    settings = durable.settings
    return ScheduleSettings(
        leader_ttl=settings.leader_ttl,
        schedule_grace=settings.schedule_grace,
        schedule_catchup_limit=settings.schedule_catchup_limit,
    )


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
class ScheduleInfo(Definition):
    """A schedule as stored: its definition, then its state and its last fire's run."""

    paused: bool
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
        durable: Core | None = None,
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
        wid = fire_id(name, at)
        run = client.start(durable, info.workflow, *info.args, workflow_id=wid, **info.kwargs)
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
        return schedule_import.import_beat_schedule(
            self, beat_schedule, timezone=timezone, prune=prune
        )

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
        return schedule_import.import_crontab(
            self, text, timezone=timezone, catchup=catchup, overlap=overlap
        )

    def prune(self, origin: str, keep: builtins.list[str]) -> builtins.list[str]:
        """Remove the schedules of ``origin`` whose names are not in ``keep``; their names."""
        removed: builtins.list[str] = self._store(lambda c: store.prune(c, origin, keep))
        for gone in removed:
            self._index(gone, None)
        return removed

    def check_not_taken(self, name: str) -> None:
        """Raise :class:`InvalidSchedule` if ``name`` exists and did not come from a crontab."""
        try:
            existing = self.get(name)
        except ScheduleNotFound:
            return
        if existing.origin != "crontab":
            raise InvalidSchedule(name, "a schedule of that name exists and is not from a crontab")
