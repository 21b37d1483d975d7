"""The soak: load, faults, a quiet drain, then the checks of :mod:`chaos.checks`.

For ``seconds`` (default 300) it starts ``chaos.order`` workflows at a steady pace over the
first 70 % of the time, sends each its ``go`` signal (a third before the workflow waits),
and injects faults on a timeline drawn from the seed:

- SIGKILL of a random worker (its whole prefork pool) every few seconds, restarted a few
  seconds later; at least one worker is left running;
- SIGKILL of a random beat every 10-25 s, restarted a few seconds later;
- a Redis restart (it comes back empty: queues, unacknowledged messages, timer and schedule
  indexes and the leader lock are lost) at 30 % of the time, and a ``FLUSHALL`` at 50 %;
- a PostgreSQL fast restart at 40 % and an immediate one (crash recovery; commits made with
  ``synchronous_commit = off`` may be lost, as durable's design allows) at 70 %.

Then every process is left running (a crashed one restarted), missing signals are sent, and
the soak waits (bounded) for every workflow to finish before checking.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from chaos.app import ORDER, SCHEDULE, SCHEMA, TICK, TICK_EVERY, build
from chaos.checks import Check, run_checks
from chaos.servers import Child, beats, pick_alive, workers
from durable.dev.servers import PrivateRedis, RestartablePostgres
from durable.dev.services import create_database
from durable.errors import DurableError, WorkflowNotRunning
from durable.store import engine as store_engine
from durable.store.migrate import upgrade

TICK_SECONDS = 0.1
LOAD_SHARE = 0.7  # starts are spread over this share of the soak


def say(message: str) -> None:
    """One line of progress, with the time."""
    print(f"{datetime.now():%H:%M:%S} {message}", flush=True)


@dataclass(order=True)
class Event:
    """A fault (or a restart after one) due at ``at`` (seconds into the soak)."""

    at: float
    label: str = field(compare=False)
    action: Callable[[], None] = field(compare=False)


class Soak:
    """One soak: its servers, processes, load and faults."""

    def __init__(self, seconds: float, workflows: int, seed: int, logdir: Path) -> None:
        self.seconds = seconds
        self.workflows = workflows
        self.rng = random.Random(seed)
        self.logdir = logdir
        self.postgres = RestartablePostgres(state_dir=logdir / "servers")
        self.redis = PrivateRedis(state_dir=logdir / "servers")
        self.children: list[Child] = []
        self.workers: list[Child] = []
        self.beats: list[Child] = []
        self.url = ""
        self.durable: Any = None
        self.started: dict[str, int] = {}
        self.signals: list[tuple[float, str, int]] = []  # (due, workflow id, i), a heap
        self.faults: list[str] = []
        self.events: list[Event] = []
        self.t0 = 0.0

    # -- set-up and tear-down ------------------------------------------------------------------

    def set_up(self) -> None:
        """Start both servers, the schema, the processes, and the schedule."""
        self.postgres.start()
        self.redis.start()
        self.url = create_database(self.postgres.url, "chaos")
        with psycopg.connect(self.libpq_url, autocommit=True) as conn:
            # Commits durable flushes must survive a crash of the server, as in production; the
            # throwaway server turns synchronous_commit off for everything else.
            conn.execute("ALTER DATABASE chaos SET synchronous_commit = on")
        upgrade(self.url)
        with psycopg.connect(self.libpq_url, autocommit=True) as conn:
            conn.execute(SCHEMA)
        _, self.durable = build(self.url, self.redis.url)
        env = {
            **os.environ,
            "CHAOS_DATABASE_URL": self.url,
            "CHAOS_REDIS_URL": self.redis.url,
            "DURABLE_DATABASE_URL": self.url,
            "DURABLE_REDIS_URL": self.redis.url,
        }
        env.pop("CELERY_BROKER_URL", None)
        self.workers = workers(env, self.logdir)
        self.beats = beats(env, self.logdir)
        self.children = [*self.workers, *self.beats]
        for child in self.children:
            child.start()
        self.durable.schedules.add(SCHEDULE, TICK, every=TICK_EVERY, catchup="all", overlap="allow")

    @property
    def libpq_url(self) -> str:
        """The chaos database as libpq reads it."""
        return self.url.replace("postgresql+psycopg://", "postgresql://", 1)

    def tear_down(self) -> None:
        """Kill every process and stop both servers; each step runs whatever fails."""
        for child in self.children:
            with contextlib.suppress(Exception):
                child.kill()
        with contextlib.suppress(Exception):
            store_engine.dispose_all()
        for server in (self.redis, self.postgres):
            with contextlib.suppress(Exception):
                server.stop()

    # -- the timeline --------------------------------------------------------------------------

    def plan(self) -> list[Event]:
        """Every fault of the soak, drawn from the seed."""
        events: list[Event] = []
        t = 3.0
        while (t := t + self.rng.uniform(4.0, 9.0)) < self.seconds:
            events.append(Event(t, "kill a worker", self.kill_worker))
        t = 5.0
        while (t := t + self.rng.uniform(10.0, 25.0)) < self.seconds:
            events.append(Event(t, "kill a beat", self.kill_beat))
        share = self.seconds
        events += [
            Event(0.3 * share, "restart Redis (empty)", self.restart_redis),
            Event(
                0.4 * share, "restart PostgreSQL (fast shutdown)", lambda: self.restart_pg(False)
            ),
            Event(0.5 * share, "FLUSHALL Redis", self.flush_redis),
            Event(
                0.7 * share,
                "restart PostgreSQL (immediate shutdown)",
                lambda: self.restart_pg(True),
            ),
        ]
        heapq.heapify(events)
        return events

    def later(self, delay: float, label: str, action: Callable[[], None]) -> None:
        """Queue ``action`` ``delay`` seconds from now (a restart after a kill)."""
        heapq.heappush(self.events, Event(self.now() + delay, label, action))

    def now(self) -> float:
        """Seconds since the soak began."""
        return time.monotonic() - self.t0

    # -- faults ------------------------------------------------------------------------------

    def kill_worker(self) -> None:
        """SIGKILL a random worker (not the last one running); restart it in 1-4 s."""
        victim = pick_alive(self.workers, self.rng)
        if victim is not None:
            victim.sigkill()
            self.faults.append(f"SIGKILL {victim.name}")
            self.later(self.rng.uniform(1.0, 4.0), f"start {victim.name}", victim.start)

    def kill_beat(self) -> None:
        """SIGKILL a random beat (not the last one running); restart it in 1-5 s."""
        victim = pick_alive(self.beats, self.rng)
        if victim is not None:
            victim.sigkill()
            self.faults.append(f"SIGKILL {victim.name}")
            self.later(self.rng.uniform(1.0, 5.0), f"start {victim.name}", victim.start)

    def restart_redis(self) -> None:
        """Stop Redis and start it again, empty, on the same port."""
        self.redis.stop()
        time.sleep(1.0)
        self.redis.start()
        self.faults.append("Redis restarted empty")

    def flush_redis(self) -> None:
        """Delete every key of every Redis database."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            client.flushall()
        finally:
            client.close()
        self.faults.append("Redis FLUSHALL")

    def restart_pg(self, immediate: bool) -> None:
        """Restart PostgreSQL with its data, fast (clean) or immediate (crash recovery)."""
        self.postgres.restart(immediate)
        self.faults.append(f"PostgreSQL {'immediate' if immediate else 'fast'} restart")

    # -- load --------------------------------------------------------------------------------

    def start_due(self) -> None:
        """Start the workflows whose planned start has come."""
        due = min(
            self.workflows, int(self.now() / (self.seconds * LOAD_SHARE) * self.workflows) + 1
        )
        for i in range(len(self.started), due):
            wid = f"order-{i}"
            try:
                self.durable.start(ORDER, i, workflow_id=wid)
            except DurableError as exc:
                say(f"start of {wid} failed ({exc}); trying again")
                return
            self.started[wid] = i
            delay = 0.0 if self.rng.random() < 1 / 3 else self.rng.uniform(2.0, 15.0)
            heapq.heappush(self.signals, (self.now() + delay, wid, i))

    def signal_due(self, everything: bool = False) -> None:
        """Send the ``go`` signals whose time has come (``everything``: all of them)."""
        retry: list[tuple[float, str, int]] = []
        while self.signals and (everything or self.signals[0][0] <= self.now()):
            _, wid, i = heapq.heappop(self.signals)
            if not self.send_go(wid, i):
                retry.append((self.now() + 1.0, wid, i))
        for item in retry:
            heapq.heappush(self.signals, item)

    def send_go(self, wid: str, i: int) -> bool:
        """Send the signal once: after a failed call, look before sending again."""
        try:
            if self.go_sent(wid):
                return True
            self.durable.signal(wid, "go", {"n": i})
        except WorkflowNotRunning as exc:
            say(f"signal to {wid}: {exc}")
            return True
        except (DurableError, psycopg.Error, OSError) as exc:
            say(f"signal to {wid} failed ({type(exc).__name__}); trying again")
            return False
        return True

    def go_sent(self, wid: str) -> bool:
        """Whether a ``go`` signal to ``wid`` is stored."""
        with psycopg.connect(self.libpq_url, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT count(*) FROM durable_signals WHERE workflow_id = %s AND name = 'go'",
                (wid,),
            ).fetchone()
        return bool(row and row[0])

    # -- the soak ----------------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart a process that exited without being killed (and say so)."""
        for child in self.children:
            if child.exited_by_itself():
                say(f"{child.name} exited by itself; restarting it:\n{child.log_tail()}")
                self.faults.append(f"{child.name} exited by itself")
                child.kill()
                child.start()

    def run_faults(self) -> None:
        """The fault window: faults on their timeline, starts and signals as they fall due."""
        self.events = self.plan()
        self.t0 = time.monotonic()
        planned = f"{len(self.events)} faults planned"
        say(f"soak: {self.workflows} workflows over {self.seconds:.0f} s, {planned}")
        while self.now() < self.seconds:
            while self.events and self.events[0].at <= self.now():
                event = heapq.heappop(self.events)
                say(event.label)
                event.action()
            self.start_due()
            self.signal_due()
            self.supervise()
            time.sleep(TICK_SECONDS)

    def drain(self, limit: float) -> bool:
        """Faults over: every process up, every signal sent; wait for the workflows to end."""
        for event in sorted(self.events):  # restarts still pending
            if event.label.startswith("start "):
                event.action()
        self.events = []
        for child in self.children:
            if not child.alive:
                child.start()
        self.start_due()
        end = time.monotonic() + limit
        last_report = 0.0
        while time.monotonic() < end:
            self.start_due()
            self.signal_due(everything=True)
            self.supervise()
            running = self.running()
            if running == 0 and len(self.started) == self.workflows and not self.signals:
                return True
            if time.monotonic() - last_report > 10:
                say(f"drain: {running} workflow(s) still running")
                last_report = time.monotonic()
            time.sleep(0.5)
        return False

    def running(self) -> int:
        """How many orders are still running (-1 when PostgreSQL cannot be asked)."""
        try:
            with psycopg.connect(self.libpq_url, autocommit=True, connect_timeout=3) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM durable_workflows WHERE status = 'running' AND name = %s",
                    (ORDER,),
                ).fetchone()
        except psycopg.Error:
            return -1
        return int(row[0]) if row else -1

    def finish_schedule(self) -> datetime:
        """Pause the schedule; wait (briefly) for its last runs; returns when it was paused."""
        paused = datetime.now(UTC)
        self.durable.schedules.pause(SCHEDULE)
        end = time.monotonic() + 30
        with psycopg.connect(self.libpq_url, autocommit=True) as conn:
            while time.monotonic() < end:
                row = conn.execute(
                    "SELECT count(*) FROM durable_workflows WHERE name = %s AND status = 'running'",
                    (TICK,),
                ).fetchone()
                if row is not None and row[0] == 0:
                    break
                time.sleep(0.5)
        return paused

    def run(self, drain_limit: float) -> list[Check]:
        """The whole soak; returns the checks."""
        self.set_up()
        self.run_faults()
        say(f"faults over ({len(self.faults)}); draining (at most {drain_limit:.0f} s)")
        drained = self.drain(drain_limit)
        if not drained:
            say("drain: not every workflow finished in time")
        until = self.finish_schedule()
        return run_checks(self.libpq_url, self.started, until)
