"""Firing schedules in-process, against real PostgreSQL and Redis: ids, leadership, overlap,
catch-up after downtime (simulated and real), stale index entries, broken schedules."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from durable import Durable
from durable.beat import Beat, ScheduleRunner
from durable.cadence import Cadence, fire_id
from durable.scheduler import Schedules
from durable.store import engine as store_engine
from tests.conftest import Background, clean_keys, clean_tables, make_app, query, wait_until


def execute(database_url: str, sql: str, **params: Any) -> None:
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql(sql, params)


@pytest.fixture
def build(database_url: str, redis_url: str, prefix: str) -> Iterator[Callable[..., Durable]]:
    """Make Durables on the test's prefix, with the scheduler settings a test wants."""
    clean_tables(database_url)
    execute(database_url, "TRUNCATE durable_schedules")

    def make(**settings: Any) -> Durable:
        settings = {"leader_ttl": 1, "schedule_grace": 30, **settings}
        _, durable = make_app(database_url, redis_url, prefix, **settings)

        @durable.workflow("jobs.report")
        def report(ctx: Any, region: str = "eu") -> str:
            return region

        return durable

    yield make
    execute(database_url, "TRUNCATE durable_schedules")
    clean_keys(redis_url, prefix)


@contextmanager
def running(*beats: Beat) -> Iterator[None]:
    threads = [Background(b.run) for b in beats]
    try:
        yield
    finally:
        for b in beats:
            b.stopping.set()
        for t in threads:
            t.join(5)


def fired(database_url: str, name: str) -> list[datetime]:
    rows = query(
        database_url, "SELECT id FROM durable_workflows WHERE id LIKE :p ORDER BY id", p=f"{name}@%"
    )
    return [datetime.fromisoformat(r.id.partition("@")[2]) for r in rows]


def gaps(times: list[datetime], step: int = 1) -> list[datetime]:
    """Fire times missing between the first and the last one."""
    have = set(times)
    span = int((times[-1] - times[0]).total_seconds()) // step
    expected = [times[0] + timedelta(seconds=step * k) for k in range(span + 1)]
    return [t for t in expected if t not in have]


def test_each_fire_starts_one_run_named_after_the_schedule_and_fire_time(
    build: Callable[..., Durable], database_url: str
) -> None:
    durable = build()
    schedules = Schedules(durable)
    schedules.add("tick", "jobs.report", every=1, overlap="allow", kwargs={"region": "us"})
    with running(Beat(durable, sweep_interval=0.5)):
        wait_until(lambda: len(fired(database_url, "tick")) >= 4, timeout=10, what="four fires")
    times = fired(database_url, "tick")
    assert gaps(times) == []
    started = query(
        database_url,
        "SELECT workflow_id, count(*) AS n FROM durable_history "
        "WHERE event = 'started' AND workflow_id LIKE 'tick@%' GROUP BY workflow_id",
    )
    assert len(started) == len(times) and all(r.n == 1 for r in started)
    (run,) = query(database_url, "SELECT name, kwargs FROM durable_workflows LIMIT 1")
    assert (run.name, run.kwargs) == ("jobs.report", {"region": "us"})
    info = schedules.get("tick")
    assert info.last_run_id == fire_id("tick", times[-1]) and info.last_status == "running"
    assert info.next_fire_at is not None and info.next_fire_at > times[-1]


def test_only_the_leader_fires_and_a_beat_that_loses_the_lock_stops_at_once(
    build: Callable[..., Durable], database_url: str, redis_url: str, prefix: str
) -> None:
    first, second = Beat(build(), sweep_interval=0.5), Beat(build(), sweep_interval=0.5)
    Schedules(first.durable).add("tick", "jobs.report", every=1, overlap="allow")
    client = redis.Redis.from_url(redis_url)
    with running(first, second):
        wait_until(lambda: len(fired(database_url, "tick")) >= 2, timeout=10, what="fires")
        leader, standby = (first, second) if first.leader.held() else (second, first)
        assert not standby.leader.held()
        assert standby.stats.schedule_runs_started == 0
        client.set(f"{prefix}:beat:leader", "an intruder", px=60_000)
        wait_until(lambda: not leader.leader.held(), timeout=2, what="the leader to step down")
        before = leader.stats.schedule_runs_started
        count = len(fired(database_url, "tick"))
        time.sleep(2.5)
        # Nobody leads: the intruder holds the lock, so no fire happens at all.
        assert leader.stats.schedule_runs_started == before
        assert len(fired(database_url, "tick")) == count
        client.delete(f"{prefix}:beat:leader")
        wait_until(lambda: first.leader.held() or second.leader.held(), timeout=3, what="a leader")
        wait_until(lambda: len(fired(database_url, "tick")) > count + 1, timeout=10, what="fires")
    # The fires due while nobody led were late, not lost: the grace covers them.
    assert gaps(fired(database_url, "tick")) == []
    client.close()


def test_overlap_skip_starts_nothing_while_the_last_run_still_runs(
    build: Callable[..., Durable], database_url: str
) -> None:
    durable = build()
    schedules = Schedules(durable)
    schedules.add("serial", "jobs.report", every=1)  # overlap skip by default
    schedules.add("parallel", "jobs.report", every=1, overlap="allow")
    beat = Beat(durable, sweep_interval=0.5)
    with running(beat):  # no worker: every run stays running
        wait_until(lambda: len(fired(database_url, "parallel")) >= 4, timeout=10, what="fires")
    assert len(fired(database_url, "serial")) == 1
    assert beat.stats.schedule_fires_skipped >= 2
    assert schedules.get("serial").last_status == "running"


def backdate(database_url: str, name: str, to: datetime) -> None:
    execute(
        database_url,
        "UPDATE durable_schedules SET next_fire_at = %(to)s WHERE name = %(name)s",
        to=to,
        name=name,
    )


@pytest.mark.parametrize(
    ("catchup", "limit", "expected"),
    [("skip", 100, 0), ("once", 100, 1), ("all", 100, 5), ("all", 3, 3)],
)
def test_catch_up_policies_after_simulated_downtime(
    build: Callable[..., Durable], database_url: str, catchup: str, limit: int, expected: int
) -> None:
    durable = build(schedule_catchup_limit=limit)
    # Hourly, at a minute at least 20 minutes from now: its recent fires are all missed.
    minute = (datetime.now(UTC).minute + 30) % 60
    cadence = Cadence.parse(f"{minute} * * * *", None)
    Schedules(durable).add("hourly", "jobs.report", cron=cadence.cron, catchup=catchup)
    now = datetime.now(UTC)
    missed = cadence.newest(now - timedelta(hours=5, minutes=1), now, 5)
    assert len(missed) == 5
    backdate(database_url, "hourly", missed[0])  # every beat was down for five fires
    runner = ScheduleRunner(durable)
    assert runner.sweep(lambda: True) == expected
    started = fired(database_url, "hourly")
    assert started == missed[len(missed) - expected :]
    info = Schedules(durable).get("hourly")
    assert info.next_fire_at == cadence.next_after(datetime.now(UTC))
    assert runner.sweep(lambda: True) == 0  # nothing is due twice


def test_a_catch_up_starts_all_its_runs_in_one_statement(
    build: Callable[..., Durable], database_url: str
) -> None:
    durable = build()
    minute = (datetime.now(UTC).minute + 30) % 60
    cadence = Cadence.parse(f"{minute} * * * *", None)
    schedules = Schedules(durable)
    schedules.add(
        "hourly", "jobs.report", cron=cadence.cron, catchup="all", kwargs={"region": "us"}
    )
    now = datetime.now(UTC)
    missed = cadence.newest(now - timedelta(hours=5, minutes=1), now, 5)
    backdate(database_url, "hourly", missed[0])
    assert ScheduleRunner(durable).sweep(lambda: True) == 5
    rows = query(
        database_url, "SELECT created_at, kwargs FROM durable_workflows WHERE id LIKE 'hourly@%'"
    )
    # One statement gives every run its transaction's time; five starts would give five.
    assert len(rows) == 5 and len({r.created_at for r in rows}) == 1
    assert [r.kwargs for r in rows] == [{"region": "us"}] * 5


def test_catch_up_after_real_downtime(build: Callable[..., Durable], database_url: str) -> None:
    durable = build(schedule_grace=0.5)
    schedules = Schedules(durable)
    for catchup in ("skip", "all"):
        schedules.add(catchup, "jobs.report", every=1, overlap="allow", catchup=catchup)
    with running(Beat(durable, sweep_interval=0.5)):
        wait_until(lambda: len(fired(database_url, "all")) >= 2, timeout=10, what="fires")
    time.sleep(3)  # every beat is down for three seconds
    with running(Beat(durable, sweep_interval=0.5)):
        before = len(fired(database_url, "skip"))
        wait_until(lambda: len(fired(database_url, "skip")) >= before + 2, timeout=10, what="fires")
    assert len(gaps(fired(database_url, "skip"))) >= 2  # the downtime's fires were skipped
    assert gaps(fired(database_url, "all")) == []  # ... or all started late


def test_stale_index_entries_are_corrected_when_they_come_due(
    build: Callable[..., Durable], database_url: str
) -> None:
    durable = build()
    schedules, store_only = Schedules(durable), Schedules(database_url=database_url)
    schedules.add("gone", "jobs.report", every=3600)
    schedules.add("paused", "jobs.report", every=3600)
    schedules.add("moved", "jobs.report", every=3600)
    store_only.remove("gone")  # no Redis at hand: the index still has them
    store_only.pause("paused")
    assert schedules.index is not None
    past = datetime.now(UTC) - timedelta(seconds=5)
    for name in ("gone", "paused", "moved"):
        schedules.index.set(name, past)
    runner = ScheduleRunner(durable)
    assert runner.fire_due(lambda: True, lambda: True) == 0
    moved = schedules.get("moved").next_fire_at
    assert moved is not None
    assert schedules.index.scores() == {"moved": moved.timestamp()}
    assert query(database_url, "SELECT id FROM durable_workflows") == []


def test_a_broken_schedule_does_not_hold_up_the_others(
    build: Callable[..., Durable], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    durable = build()
    Schedules(database_url=database_url).add("broken", "not.deployed", every=1, overlap="allow")
    Schedules(durable).add("fine", "jobs.report", every=1, overlap="allow")
    with running(Beat(durable, sweep_interval=0.5)):
        wait_until(lambda: len(fired(database_url, "fine")) >= 3, timeout=10, what="fires")
    assert fired(database_url, "broken") == []
    # Stored without an app to check it, it is paused at its first fire, not retried forever.
    assert "schedule broken starts not.deployed, which this app does not register; paused" in (
        caplog.text
    )
    assert Schedules(durable).get("broken").paused
    assert caplog.text.count("schedule broken") == 1
