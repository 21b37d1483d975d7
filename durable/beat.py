"""``durable beat``: the timer service, the liveness sweep and the scheduler.

Every beat process, however many run, loops over:

1. **due timers** from the Redis index (claimed atomically by a Lua script), fired in
   PostgreSQL, where ``fired_at IS NULL`` is the exactly-once gate;
2. **due schedules**, on the one beat that holds the leader lock (:mod:`durable.leader`):
   each fire starts its run in a transaction that holds the schedule's row
   (:class:`ScheduleRunner`);
3. every ``sweep_interval`` seconds, **the sweep**: rebuild the indexes if Redis lost them,
   fire timers overdue in PostgreSQL (an entry lost from the index), re-dispatch steps whose
   lease expired (their worker died), steps whose message was never claimed, and runs owed
   an activation; the leader also fires schedules PostgreSQL says are due and, when the
   ``retention`` setting is set, purges runs that finished longer ago than that
   (:meth:`Beat.purge_expired`: one bounded batch per pass, every few minutes).

Each of these takes its rows with a conditional UPDATE (``SKIP LOCKED`` where it scans) or a
row lock, so two beats never act on the same row twice. At start every beat imports the
app's ``beat_schedule`` (:meth:`durable.scheduler.Schedules.import_beat_schedule`).

Users who keep Celery's own beat command run the same loop inside it::

    celery -A yourapp beat -S durable.beat:DurableScheduler
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery
from celery.beat import Scheduler
from celery.schedules import crontab

from durable import client, deadlines
from durable.cadence import Cadence, fire_id, plan_fires
from durable.core import Core
from durable.errors import DurableError, UnknownWorkflow, WorkflowIdConflict
from durable.leader import LeaderLock
from durable.scheduler import (
    RETRY_AFTER,
    ScheduleIndex,
    Schedules,
    ScheduleSettings,
    schedule_settings,
)
from durable.store import admin as admin_queries
from durable.store import engine as store_engine
from durable.store import limits as limit_queries
from durable.store import recovery, run_limits
from durable.store import schedules as schedule_queries
from durable.store import timers as timer_queries

log = logging.getLogger(__name__)

RETENTION_INTERVAL = 300.0
"""Seconds between retention passes (sooner while a backlog drains)."""
RETENTION_BATCH = 1000
"""Most runs one retention pass deletes, so that a pass never holds up the timers for long."""


@dataclass
class BeatStats:
    """Counters of what a beat did, for logs and tests."""

    timers_fired: int = 0
    steps_redispatched: int = 0
    steps_admitted: int = 0
    runs_admitted: int = 0
    activations_resent: int = 0
    index_rebuilds: int = 0
    lateness: list[float] = field(default_factory=list)
    schedule_runs_started: int = 0
    schedule_fires_skipped: int = 0
    schedule_index_rebuilds: int = 0
    runs_purged: int = 0


class Beat:
    """One beat process's loop; call :meth:`run` (blocking) or :meth:`tick` (tests).

    Args:
        durable: The app's ``Durable``.
        sweep_interval: Seconds between sweeps.
        max_wait: Longest pause between two ticks.
        beat_schedule: Celery ``beat_schedule`` entries to import at start (default: the
            app's ``beat_schedule``).
        retention_interval: Seconds between two retention passes that found no backlog.
        retention_batch: Most runs one retention pass deletes.
    """

    def __init__(
        self,
        durable: Core,
        sweep_interval: float = 1.0,
        max_wait: float = 0.1,
        beat_schedule: Mapping[str, Any] | None = None,
        retention_interval: float = RETENTION_INTERVAL,
        retention_batch: int = RETENTION_BATCH,
    ) -> None:
        self.durable = durable
        self.sweep_interval = sweep_interval
        self.max_wait = max_wait
        self.stats = BeatStats()
        self._last_sweep = 0.0
        self.stopping = threading.Event()
        self.settings = schedule_settings(durable)
        prefix = durable.settings.key_prefix
        ttl = self.settings.leader_ttl.total_seconds()
        self.leader = LeaderLock(lambda: durable.timer_index.client, prefix, ttl)
        self.schedules = ScheduleRunner(durable, self.settings, self.stats)
        self._beat_schedule = beat_schedule
        self._imported = False
        self.retention = durable.settings.retention
        self.retention_interval = retention_interval
        self.retention_batch = retention_batch
        self._next_purge = 0.0  # time.monotonic() of the next retention pass

    def run(self) -> None:
        """Loop until :attr:`stopping` is set (SIGTERM/SIGINT in the CLI)."""
        log.info("durable beat started")
        if self.retention is not None:
            log.info(
                "durable beat: runs finished more than %s ago are purged", _span(self.retention)
            )
        warn_if_evictable(self.durable.timer_index.client)
        try:
            while not self.stopping.is_set():
                if not self.safe_tick():
                    self.stopping.wait(1.0)
                    continue
                self.stopping.wait(self.wait_time())
        finally:
            self.leader.release()
        log.info("durable beat stopped")

    def safe_tick(self) -> bool:
        """:meth:`tick`, logging a failure instead of raising it; False if it failed."""
        try:
            self.tick()
        except DurableError as exc:  # a known condition (store unreachable): one line
            log.error("durable beat: iteration failed (%s); retrying", exc)
            return False
        except Exception as exc:
            if not store_engine.is_connection_failure(exc):
                log.exception("durable beat: iteration failed; retrying")
                return False
            # PostgreSQL went away under a statement sent outside the store's retries (the
            # sweep's reads): the same one line as StoreUnavailable, not a traceback.
            lost = store_engine.unavailable(self.durable.settings.database_url, exc)
            log.error("durable beat: iteration failed (%s); retrying", lost)
            return False
        return True

    def wait_time(self) -> float:
        """Seconds until the next tick: until the next timer, at most :attr:`max_wait`."""
        try:
            nxt = self.durable.timer_index.next_fire()
        except Exception:
            return self.max_wait
        if nxt is None:
            return self.max_wait
        return min(max(nxt - time.time(), 0.0), self.max_wait)

    def tick(self) -> None:
        """Fire due timers and, leading, due schedules; sweep when the interval has passed."""
        if not self._imported:
            self.import_beat_schedule()
        self.leader.tick()
        self.fire_due()
        if self.leader.held():
            self.schedules.fire_due(self.leader.confirm, self.leader.held)
        if time.monotonic() - self._last_sweep >= self.sweep_interval:
            self.sweep()
            if self.leader.held():
                self.schedules.sweep(self.leader.held)
                self.purge_expired()
            self._last_sweep = time.monotonic()

    def import_beat_schedule(self) -> None:
        """Import the app's ``beat_schedule`` as schedules (idempotent; done once at start)."""
        entries = self._beat_schedule
        if entries is None:
            entries = self.durable.app.conf.beat_schedule or {}
        report = Schedules(self.durable).import_beat_schedule(entries)
        for problem in report.problems:
            log.warning("durable beat: %s; not imported", problem)
        if report.added or report.updated or report.removed:
            log.info(
                "durable beat: beat_schedule imported: added %s, updated %s, removed %s",
                report.added,
                report.updated,
                report.removed,
            )
        self._imported = True

    def fire_due(self) -> int:
        """Fire the timers the Redis index says are due."""
        fired = 0
        while True:
            ids = self.durable.timer_index.claim_due(time.time(), 500)
            if not ids:
                return fired
            fired += self._fire(ids)

    def _fire(self, ids: list[int]) -> int:
        with self.durable.connect() as conn:
            fired = timer_queries.fire_timers(conn, ids)
        for timer in fired:
            self.stats.lateness.append(timer.lateness)
            deadlines.after_timer(self.durable, timer)
        self.stats.timers_fired += len(fired)
        del self.stats.lateness[:-1000]
        return len(fired)

    def sweep(self) -> None:
        """Repair what the fast path may have missed; see the module docstring."""
        durable = self.durable
        index = durable.timer_index
        if not index.is_built():
            with durable.connect() as conn:
                pending = timer_queries.pending_timers(conn)
            count = index.rebuild(pending)
            self.stats.index_rebuilds += 1
            log.info("durable beat: rebuilt the timer index from PostgreSQL (%d timers)", count)
        after = durable.settings.redispatch_after.total_seconds()
        with durable.connect() as conn:
            overdue = timer_queries.overdue_timers(conn, grace=1.0)
            expired = recovery.expire_step_leases(conn)
            stale = recovery.stale_scheduled_steps(conn, after)
            owed = recovery.owed_activations(conn, after)
        if overdue:
            self._fire(overdue)
        deadlines.enforce_step_deadlines(durable)
        for d in [*expired, *stale]:
            durable.send_step(d.workflow_id, d.seq, d.name, d.options)
        for wid, name in owed:
            durable.send_activation(wid, name)
        with durable.connect() as conn:
            keys = limit_queries.queued_keys(conn)
            run_keys = run_limits.queued_keys(conn)
        if keys:
            self.stats.steps_admitted += durable.admit(keys)
        if run_keys:
            self.stats.runs_admitted += durable.admit_runs(run_keys)
        self.stats.steps_redispatched += len(expired) + len(stale)
        self.stats.activations_resent += len(owed)
        if expired or stale or owed:
            log.info(
                "durable beat: re-sent %d step(s) with expired leases, %d unclaimed step(s), "
                "%d owed activation(s)",
                len(expired),
                len(stale),
                len(owed),
            )

    def purge_expired(self) -> int:
        """Delete one batch of runs that finished more than ``retention`` ago; leader only.

        Steps, timers, history, signals and events go with their run (``durable purge``
        does the same by hand). A pass runs at most every ``retention_interval`` seconds,
        but at the next sweep again after a full batch, so that a backlog drains batch by
        batch without holding up the timers in between. Returns how many runs went.
        """
        if self.retention is None or time.monotonic() < self._next_purge:
            return 0
        age, batch = self.retention.total_seconds(), self.retention_batch
        with self.durable.connect() as conn:
            purged = admin_queries.purge_runs(conn, age, batch)
        self.stats.runs_purged += purged
        backlog = purged >= batch
        self._next_purge = time.monotonic() + (0.0 if backlog else self.retention_interval)
        if purged:
            log.info(
                "durable beat: purged %d run(s) finished more than %s ago%s",
                purged,
                _span(self.retention),
                "; more to purge at the next sweep" if backlog else "",
            )
        return purged


def _span(duration: timedelta) -> str:
    """A duration as ``durable purge --older-than`` takes it: ``30d``, ``1d12h``, ``90s``."""
    left, parts = int(duration.total_seconds()), []
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, seconds)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


class ScheduleRunner:
    """The leader's work: fire due schedules and keep their Redis index whole."""

    def __init__(
        self,
        durable: Core,
        settings: ScheduleSettings | None = None,
        stats: BeatStats | None = None,
    ) -> None:
        self.durable = durable
        self.settings = settings or schedule_settings(durable)
        self.stats = stats or BeatStats()
        self.index = ScheduleIndex(lambda: durable.timer_index.client, durable.settings.key_prefix)
        self._retry_at: dict[str, float] = {}

    def fire_due(self, confirm: Callable[[], bool], leading: Callable[[], bool]) -> int:
        """Fire the schedules the index says are due; ``confirm`` is asked once if any are."""
        names = self.index.due(time.time())
        if not names or not confirm():
            return 0
        return self._fire_each(names, leading)

    def sweep(self, leading: Callable[[], bool]) -> int:
        """Rebuild the index if Redis lost it; fire what PostgreSQL says is due."""
        if not self.index.is_built():
            with self.durable.connect() as conn:
                pending = schedule_queries.pending_schedules(conn)
            count = self.index.rebuild(pending)
            self.stats.schedule_index_rebuilds += 1
            log.info("durable beat: rebuilt the schedule index from PostgreSQL (%d)", count)
        with self.durable.connect() as conn:
            due = schedule_queries.due_schedules(conn)
        return self._fire_each(due, leading)

    def _fire_each(self, names: list[str], leading: Callable[[], bool]) -> int:
        started = 0
        for name in names:
            if not leading():  # lost the lock: stop before the next fire
                break
            if self._retry_at.get(name, 0.0) > time.monotonic():
                continue
            try:
                started += self.fire(name)
                self._retry_at.pop(name, None)
            except UnknownWorkflow as exc:
                # Trying again cannot help until a deploy registers it: pause, loudly.
                log.error(
                    "durable beat: schedule %s starts %s, which this app does not register; "
                    "paused (durable schedule resume %s once a deploy registers it)",
                    name,
                    exc.name,
                    name,
                )
                self._pause(name)
            except Exception as exc:
                log.error(
                    "durable beat: schedule %s could not fire (%s); retrying in %gs",
                    name,
                    exc,
                    RETRY_AFTER,
                    exc_info=not isinstance(exc, DurableError),
                )
                self._retry_at[name] = time.monotonic() + RETRY_AFTER
                self._postpone(name)
        return started

    def _pause(self, name: str) -> None:
        with self.durable.connect() as conn:
            schedule_queries.pause(conn, name)
        try:
            self.index.set(name, None)
        except redis.RedisError:  # the sweep's rebuild leaves a paused schedule out anyway
            log.warning("durable beat: could not drop paused schedule %s from the index", name)

    def _postpone(self, name: str) -> None:
        # Behind the other due entries, so that one broken schedule does not hold them up.
        try:
            self.index.set(name, datetime.now(UTC) + timedelta(seconds=RETRY_AFTER))
        except redis.RedisError:
            log.warning("durable beat: could not postpone schedule %s in the index", name)

    def fire(self, name: str) -> int:
        """Fire schedule ``name`` if it is due; returns the number of runs started.

        One transaction: lock the row, start the runs (each idempotent by id), move the next
        fire on. A crash before the commit leaves the fire due, and firing it again starts
        the same ids, which return the runs already started.
        """
        with self.durable.transaction() as conn:
            row = schedule_queries.lock_schedule(conn, name)
            if row is None or row.paused or row.next_fire_at is None:
                self.index.remove(name)
                return 0
            if row.next_fire_at > row.now:  # a stale index entry
                self.index.set(name, row.next_fire_at)
                return 0
            cadence = Cadence.parse(row.cron, row.every, row.timezone, name)
            grace, limit = self.settings.schedule_grace, self.settings.schedule_catchup_limit
            plan = plan_fires(cadence, row.next_fire_at, row.now, row.catchup, grace, limit)
            fires = self._overlap(row, plan.fires)
            last_run = self._start(row, fires)
            last_fire = fires[-1] if fires else None
            schedule_queries.advance(conn, name, plan.next_fire_at, last_fire, last_run)
        self.index.set(name, plan.next_fire_at)
        if plan.missed_since is not None:
            log.info(
                "durable beat: schedule %s: fires missed since %s not started (catch-up %s)",
                name,
                plan.missed_since.isoformat(),
                row.catchup,
            )
        self.stats.schedule_runs_started += len(fires)
        return len(fires)

    def _overlap(self, row: Any, fires: list[datetime]) -> list[datetime]:
        if fires and row.overlap == "skip" and row.last_status == "running":
            log.info(
                "durable beat: schedule %s: %d fire(s) skipped, run %s still running",
                row.name,
                len(fires),
                row.last_run_id,
            )
            self.stats.schedule_fires_skipped += len(fires)
            return []
        return fires

    def _start(self, row: Any, fires: list[datetime]) -> str | None:
        """Start a run per fire, all in one statement (a catch-up may bring many)."""
        if not fires:
            return None
        ids = [fire_id(row.name, at) for at in fires]
        try:
            client.start_many(
                self.durable,
                row.workflow,
                [row.args] * len(ids),
                workflow_ids=ids,
                kwargs_list=[row.kwargs] * len(ids),
            )
        except WorkflowIdConflict as exc:
            log.warning("durable beat: schedule %s: %s; fire left as it is", row.name, exc)
        return ids[-1]


def warn_if_evictable(client: redis.Redis) -> None:
    """Warn when Redis may evict keys without a TTL, as durable's indexes are."""
    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", ""))
    except redis.RedisError:  # CONFIG is often disabled on managed Redis
        return
    if policy.startswith("allkeys"):
        log.warning(
            "durable beat: Redis maxmemory-policy is %s, which can evict the timer and schedule "
            "indexes; the beat rebuilds them, but fires may be late. Prefer noeviction.",
            policy,
        )


class DurableScheduler(Scheduler):
    """Celery's beat running durable's loop (``-S durable.beat:DurableScheduler``).

    The app's ``beat_schedule`` entries are imported as schedules of the ``durable.task``
    workflow, fired exactly once by whichever ``celery beat`` (or ``durable beat``) leads;
    timers and the recovery sweep run here too, so no separate ``durable beat`` is needed.
    """

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        self.beat: Beat | None = None
        super().__init__(app, *args, **kwargs)

    def setup_schedule(self) -> None:
        """Import the app's ``beat_schedule`` (and Celery's result clean-up, as its beat does)."""
        entries = dict(self.app.conf.beat_schedule or {})
        conf = self.app.conf
        expiring = conf.result_backend and conf.result_expires
        if expiring and not self.app.backend.supports_autoexpire:
            cleanup = {
                "task": "celery.backend_cleanup",
                "schedule": crontab("0", "4", "*"),
                "options": {"expires": 12 * 3600},
            }
            entries.setdefault("celery.backend_cleanup", cleanup)
        self.beat = Beat(Core.of(self.app), beat_schedule=entries)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One iteration of durable's beat loop; returns the seconds to wait."""
        assert self.beat is not None
        return self.beat.wait_time() if self.beat.safe_tick() else 1.0

    def sync(self) -> None:
        """Nothing to write: the schedules live in PostgreSQL."""

    def close(self) -> None:
        """Give up the leader lock so that another beat takes over at once."""
        if self.beat is not None:
            self.beat.leader.release()
        super().close()

    @property
    def info(self) -> str:
        """Shown in ``celery beat``'s banner."""
        return "durable: schedules in PostgreSQL, fired by the beat holding the leader lock"
