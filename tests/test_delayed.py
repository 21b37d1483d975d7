"""Delayed and debounced starts: ``durable.start(..., start_at=, countdown=, debounce=)``.

In-process workers and beats for the semantics; real worker and beat processes (and a
private Redis, flushed) for the debounce and for surviving a flush and a beat restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from durable import Durable, activation, bulk
from durable.beat import Beat
from durable.dev.services import start_private_redis
from durable.errors import InvalidDuration, WorkflowCancelled, WorkflowIdConflict
from durable.store import delayed as delayed_queries
from durable.store import timers as timer_queries
from durable.testing import TestEnv
from tests.apps.delay_app import build, seen
from tests.conftest import (
    HISTORY_ROWS,
    ROOT,
    Background,
    Workers,
    clean_keys,
    clean_tables,
    query,
    wait_until,
)

HOUR = timedelta(hours=1)


@pytest.fixture
def delay(database_url: str, redis_url: str, prefix: str) -> Iterator[tuple[Celery, Durable]]:
    """The delay app on the shared Redis under the test's prefix; no worker, no beat."""
    clean_tables(database_url)
    app, durable = build(database_url, redis_url, prefix)
    yield app, durable
    clean_keys(redis_url, prefix)


@pytest.fixture
def running(delay: tuple[Celery, Durable]) -> Iterator[Durable]:
    """The delay app with an in-process worker and an in-process beat."""
    app, durable = delay
    beat = Beat(durable, sweep_interval=0.2)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        thread = Background(beat.run)
        yield durable
        beat.stopping.set()
        thread.join()


def start_timers(database_url: str, wid: str) -> list[Any]:
    """The run's ``start`` timers, oldest first."""
    return query(
        database_url,
        "SELECT id, fire_at, fired_at FROM durable_timers "
        "WHERE workflow_id = :wid AND purpose = 'start' ORDER BY id",
        wid=wid,
    )


def events(database_url: str, wid: str) -> list[str]:
    rows = query(
        database_url,
        f"SELECT event FROM {HISTORY_ROWS} WHERE workflow_id = :wid ORDER BY pos",
        wid=wid,
    )
    return [r.event for r in rows]


def run_row(database_url: str, wid: str) -> Any:
    rows = query(database_url, "SELECT * FROM durable_workflows WHERE id = :wid", wid=wid)
    return rows[0] if rows else None


def step_count(database_url: str, wid: str) -> int:
    rows = query(
        database_url, "SELECT count(*) AS n FROM durable_steps WHERE workflow_id = :wid", wid=wid
    )
    return int(rows[0].n)


def make_due(database_url: str, redis_url: str, prefix: str, wid: str) -> int:
    """Let the run's start time come now: its unfired start timer, in PostgreSQL and Redis.

    The beat then fires it on its ordinary path (the index claim), as it would have at the
    original time; returns the timer's id.
    """
    (timer,) = query(
        database_url,
        "UPDATE durable_timers SET fire_at = now() WHERE workflow_id = :wid "
        "AND purpose = 'start' AND fired_at IS NULL RETURNING id",
        wid=wid,
    )
    client = redis.Redis.from_url(redis_url)
    try:
        client.zadd(f"{prefix}:timers", {str(timer.id): time.time()})
    finally:
        client.close()
    return int(timer.id)


# -- a delayed start -----------------------------------------------------------------------------


def test_a_delayed_run_is_written_at_once_and_runs_nothing_before_its_timer_fires(
    running: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    durable = running
    run = durable.start("delay.greet", "ada", workflow_id="later", countdown=HOUR)
    row = run_row(database_url, "later")
    assert row.status == "running" and row.start_at is not None
    assert row.start_at - row.created_at == HOUR
    assert run.status() == "running" and run.state == "PENDING"
    (timer,) = start_timers(database_url, "later")
    assert timer.fired_at is None and timer.fire_at == row.start_at
    assert durable.timer_index.missing([timer.id]) == []
    # The worker and the beat's sweeps run meanwhile; an activation finds the run not
    # started and runs nothing.
    assert activation.activate(durable, "later") == "busy-or-finished"
    wait_until(lambda: durable.timer_index.is_built(), what="a sweep")
    assert step_count(database_url, "later") == 0
    assert events(database_url, "later") == ["start delayed"]
    assert seen(redis_url, prefix) == []

    make_due(database_url, redis_url, prefix, "later")
    assert run.result(timeout=30) == "hello ada!"
    assert run_row(database_url, "later").start_at is None
    assert events(database_url, "later")[:4] == [
        "start delayed",
        "started",
        "timer fired",
        "step scheduled",
    ]
    assert seen(redis_url, prefix) == ["ada"]


def test_start_at_is_a_moment_and_the_test_clock_skips_to_it(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    at = datetime(2100, 1, 1, 9, 0, tzinfo=UTC)
    with TestEnv(durable) as env:
        run = durable.start("delay.greet", "bob", workflow_id="moment", start_at=at)
        assert run_row(database_url, "moment").start_at == at
        assert env.result(run, timeout=30) == "hello bob!"
    assert env.skipped > 0


def test_a_start_at_in_the_past_starts_at_the_beats_next_tick(
    running: Durable, redis_url: str, prefix: str
) -> None:
    durable = running
    past = datetime.now(UTC) - timedelta(minutes=5)
    run = durable.start("delay.greet", "late", workflow_id="overdue", start_at=past)
    assert run.result(timeout=30) == "hello late!"
    assert seen(redis_url, prefix) == ["late"]


def test_the_execution_timeout_counts_from_the_start_and_moves_with_a_debounce(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay

    def deadlines() -> list[Any]:
        return query(
            database_url,
            "SELECT fire_at, fired_at FROM durable_timers "
            "WHERE workflow_id = 'bounded' AND purpose = 'deadline' ORDER BY id",
        )

    durable.start("delay.bounded", "a", workflow_id="bounded", debounce=HOUR)
    first = run_row(database_url, "bounded")
    assert first.deadline_at == first.start_at + 2 * HOUR
    assert [d.fire_at for d in deadlines()] == [first.deadline_at]
    durable.start("delay.bounded", "b", workflow_id="bounded", debounce=HOUR)
    second = run_row(database_url, "bounded")
    assert second.deadline_at == second.start_at + 2 * HOUR
    assert [(d.fire_at, d.fired_at is None) for d in deadlines()] == [
        (first.deadline_at, False),
        (second.deadline_at, True),
    ]


def test_a_second_delayed_start_of_an_id_returns_the_run_unchanged(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.greet", "first", workflow_id="once", countdown=HOUR)
    before = run_row(database_url, "once")
    again = durable.start("delay.greet", "second", workflow_id="once", countdown=2 * HOUR)
    assert again.id == "once"
    after = run_row(database_url, "once")
    assert after.args == ["first"] and after.start_at == before.start_at
    assert len(start_timers(database_url, "once")) == 1
    with pytest.raises(WorkflowIdConflict):
        durable.start("delay.wait", workflow_id="once", countdown=HOUR)


def test_start_many_delays_every_run_to_one_start_time(
    running: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    durable = running
    durable.start("delay.greet", "kept", workflow_id="many-2", countdown=2 * HOUR)
    runs = durable.start_many(
        "delay.greet",
        [("a",), ("b",), ("c",)],
        workflow_ids=["many-1", "many-2", None],
        countdown=HOUR,
    )
    rows = {r.id: r for r in query(database_url, "SELECT * FROM durable_workflows")}
    assert len(rows) == 3 and rows["many-2"].args == ["kept"]
    assert rows["many-1"].start_at == rows[runs[2].id].start_at
    assert rows["many-1"].start_at - rows["many-1"].created_at == HOUR
    assert all(step_count(database_url, wid) == 0 for wid in rows)
    assert seen(redis_url, prefix) == []
    for run in runs:
        make_due(database_url, redis_url, prefix, run.id)
    assert [r.result(timeout=30) for r in runs] == ["hello a!", "hello kept!", "hello c!"]
    with pytest.raises(InvalidDuration):
        durable.start_many("delay.greet", [("x",)], workflow_ids=["never"], countdown=-5)
    assert run_row(database_url, "never") is None


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"countdown": -1}, InvalidDuration, "negative"),
        ({"countdown": float("inf")}, InvalidDuration, "finite"),
        ({"countdown": 5, "start_at": datetime.now(UTC)}, ValueError, "not ['start_at'"),
        ({"start_at": datetime(2100, 1, 1)}, ValueError, "timezone-aware"),
        ({"start_at": "2100-01-01T00:00:00Z"}, ValueError, "must be a datetime"),
        ({"debounce": 5}, ValueError, "needs a workflow_id"),
        ({"debounce": 5, "countdown": 5, "workflow_id": "x"}, ValueError, "one of"),
        ({"debounce": 0, "workflow_id": "x"}, InvalidDuration, "positive"),
        ({"debounce_max": 5, "workflow_id": "x"}, ValueError, "only meaningful with debounce"),
        ({"debounce": 5, "debounce_max": -1, "workflow_id": "x"}, InvalidDuration, "positive"),
    ],
)
def test_bad_timing_is_refused_in_one_line_and_writes_nothing(
    delay: tuple[Celery, Durable],
    database_url: str,
    options: dict[str, Any],
    error: type[Exception],
    says: str,
) -> None:
    _, durable = delay
    with pytest.raises(error) as raised:
        durable.start("delay.greet", "x", **options)
    assert says in str(raised.value) and "\n" not in str(raised.value)
    assert query(database_url, "SELECT id FROM durable_workflows") == []
    assert query(database_url, "SELECT id FROM durable_timers") == []


# -- cancel before the start ---------------------------------------------------------------------


def test_cancel_before_the_start_ends_the_run_and_its_timer_never_starts_it(
    running: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    durable = running
    run = durable.start("delay.greet", "cy", workflow_id="called-off", countdown=HOUR)
    (timer,) = start_timers(database_url, "called-off")
    durable.cancel("called-off")
    with pytest.raises(WorkflowCancelled):
        run.result(timeout=0)
    row = run_row(database_url, "called-off")
    assert row.status == "cancelled" and row.start_at is None and row.finished_at is not None
    assert (
        query(
            database_url,
            "SELECT id FROM durable_timers WHERE workflow_id = 'called-off' AND fired_at IS NULL",
        )
        == []
    )
    assert events(database_url, "called-off") == ["start delayed", "cancel requested", "cancelled"]
    # Its (retired) timer reaching the beat now changes nothing.
    assert durable.store(lambda c: timer_queries.fire_timers(c, [timer.id])) == []
    assert step_count(database_url, "called-off") == 0 and seen(redis_url, prefix) == []


def test_a_bulk_cancel_ends_the_runs_not_started_and_flags_the_others(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.greet", "p", workflow_id="pending-1", countdown=HOUR)
    durable.start("delay.greet", "q", workflow_id="pending-2", debounce=HOUR)
    durable.start("delay.wait", workflow_id="begun")
    done = bulk.run(durable, "cancel", bulk.RunFilter(status="running"))
    assert (done.acted, done.skipped) == (3, 0)
    rows = query(database_url, "SELECT id, status, cancel_requested FROM durable_workflows")
    assert sorted(rows) == [
        ("begun", "running", True),
        ("pending-1", "cancelled", True),
        ("pending-2", "cancelled", True),
    ]
    assert (
        query(
            database_url,
            "SELECT id FROM durable_timers WHERE workflow_id LIKE 'pending-%' AND fired_at IS NULL",
        )
        == []
    )


def test_a_signal_sent_before_the_start_is_kept_for_the_run(
    running: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    durable = running
    run = durable.start("delay.wait", workflow_id="early-signal", countdown=HOUR)
    durable.signal("early-signal", "go", {"n": 1})
    assert step_count(database_url, "early-signal") == 0
    make_due(database_url, redis_url, prefix, "early-signal")
    assert run.result(timeout=30) == {"n": 1}


# -- debounce ------------------------------------------------------------------------------------


def test_debounce_replaces_the_arguments_and_pushes_the_start_back(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.greet", "a", workflow_id="burst", debounce=HOUR)
    first = run_row(database_url, "burst")
    durable.start("delay.greet", "b", "?", workflow_id="burst", debounce=HOUR)
    second = run_row(database_url, "burst")
    assert second.args == ["b", "?"] and second.start_at > first.start_at
    timers = start_timers(database_url, "burst")
    assert [t.fired_at is None for t in timers] == [False, True]
    assert timers[1].fire_at == second.start_at
    assert events(database_url, "burst") == ["start delayed", "start debounced"]


def test_debounce_max_caps_how_far_the_start_moves(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    cap = timedelta(minutes=30)
    for name in ("a", "b", "c"):
        durable.start("delay.greet", name, workflow_id="capped", debounce=HOUR, debounce_max=cap)
        row = run_row(database_url, "capped")
        assert row.start_at == row.created_at + cap
    assert row.args == ["c"]


def test_debounce_of_an_ended_run_returns_it_and_starts_nothing(
    running: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    durable = running
    run = durable.start("delay.greet", "old", workflow_id="done", debounce=HOUR)
    make_due(database_url, redis_url, prefix, "done")
    assert run.result(timeout=30) == "hello old!"
    again = durable.start("delay.greet", "new", workflow_id="done", debounce=HOUR)
    assert again.id == "done" and again.result(timeout=0) == "hello old!"
    row = run_row(database_url, "done")
    assert row.args == ["old"] and row.start_at is None
    assert all(t.fired_at is not None for t in start_timers(database_url, "done"))
    assert "start debounced" not in events(database_url, "done")
    assert seen(redis_url, prefix) == ["old"]


def test_debounce_of_a_run_started_without_delay_returns_it_unchanged(
    running: Durable, database_url: str
) -> None:
    durable = running
    run = durable.start("delay.wait", workflow_id="plain")
    wait_until(lambda: step_count(database_url, "plain") == 1, what="the signal wait")
    durable.start("delay.wait", workflow_id="plain", debounce=HOUR)
    assert start_timers(database_url, "plain") == []
    durable.signal("plain", "go", "on")
    assert run.result(timeout=30) == "on"


def waiting_on_lock(database_url: str) -> bool:
    rows = query(
        database_url,
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'",
    )
    return bool(rows)


def test_a_debounce_racing_the_firing_loses_to_it_when_the_firing_commits_first(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.bounded", "a", workflow_id="race", debounce=HOUR)
    (timer,) = start_timers(database_url, "race")
    when = (None, 3600.0, None)
    with durable.transaction() as conn:
        fired = timer_queries.fire_timers(conn, [timer.id])
        assert [f.kind for f in fired] == ["start"]
        late = Background(
            lambda: durable.store(
                lambda c: delayed_queries.debounce_run(
                    c, "race", "delay.bounded", '["b"]', "{}", 7200.0, when
                )
            )
        )
        wait_until(lambda: waiting_on_lock(database_url), what="the debounce to wait")
    assert not late.join().written
    # Called again, start reads the run, sees it started, and returns it.
    assert durable.start("delay.bounded", "b", workflow_id="race", debounce=HOUR).id == "race"
    row = run_row(database_url, "race")
    assert row.args == ["a"] and row.start_at is None
    assert "start debounced" not in events(database_url, "race")
    assert unfired(database_url, "race") == ["deadline"]  # the started run keeps its timeout


def unfired(database_url: str, wid: str) -> list[str]:
    """The purposes of the run's unfired timers."""
    rows = query(
        database_url,
        "SELECT purpose FROM durable_timers WHERE workflow_id = :wid AND fired_at IS NULL "
        "ORDER BY id",
        wid=wid,
    )
    return [r.purpose for r in rows]


def test_a_cancel_racing_the_firing_flags_the_started_run_when_the_firing_commits_first(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.bounded", "a", workflow_id="race", countdown=HOUR)
    (timer,) = start_timers(database_url, "race")
    with durable.transaction() as conn:
        assert [f.kind for f in timer_queries.fire_timers(conn, [timer.id])] == ["start"]
        cancel = Background(lambda: durable.cancel("race"))
        wait_until(lambda: waiting_on_lock(database_url), what="the cancel to wait")
    cancel.join()
    row = run_row(database_url, "race")
    assert (row.status, row.cancel_requested, row.start_at) == ("running", True, None)
    assert unfired(database_url, "race") == ["deadline"]


def test_a_firing_racing_a_debounce_fires_nothing_when_the_debounce_commits_first(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.greet", "a", workflow_id="race", debounce=HOUR)
    (timer,) = start_timers(database_url, "race")
    when = (None, 3600.0, None)
    with durable.transaction() as conn:
        moved = delayed_queries.debounce_run(conn, "race", "delay.greet", '["b"]', "{}", None, when)
        assert moved.written
        firing = Background(
            lambda: durable.store(lambda c: timer_queries.fire_timers(c, [timer.id]))
        )
        wait_until(lambda: waiting_on_lock(database_url), what="the firing to wait")
    assert firing.join() == []
    row = run_row(database_url, "race")
    assert row.args == ["b"] and row.start_at is not None


# -- real processes ------------------------------------------------------------------------------


class Processes:
    """Worker and beat processes of ``tests.apps.delay_app`` on a Redis of the test's own."""

    def __init__(self, database_url: str, redis_url: str, prefix: str, logdir: Path) -> None:
        self.redis_url = redis_url
        self.logdir = logdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
        self.env.update(
            DURABLE_DATABASE_URL=database_url,
            DURABLE_REDIS_URL=redis_url,
            DELAY_PREFIX=prefix,
            PYTHONPATH=str(ROOT),
        )
        self.workers = Workers(self.env, logdir, "tests.apps.delay_app")
        self.beats: list[subprocess.Popen[bytes]] = []

    def start_beat(self, name: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "durable.cli", "beat", "--app", "tests.apps.delay_app"]
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [*command, "--sweep-interval", "0.5"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.beats.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.beats:
            if proc.poll() is None:
                self.kill(proc)
        self.workers.stop_all()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.logdir.glob("*.log"))


@pytest.fixture
def processes(
    database_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Processes]]:
    """A private Redis (the test flushes it), the app on it, and its processes."""
    url, stop = start_private_redis()
    clean_tables(database_url)
    _, durable = build(database_url, url, prefix)
    procs = Processes(database_url, url, prefix, tmp_path)
    try:
        yield durable, procs
    finally:
        procs.stop_all()
        stop()


def test_real_processes_a_debounced_start_fires_once_with_the_last_arguments(
    processes: tuple[Durable, Processes], database_url: str, prefix: str
) -> None:
    durable, procs = processes
    procs.workers.start("worker")
    procs.start_beat("beat")
    for name in ("a", "b", "c", "d", "e"):
        run = durable.start("delay.greet", name, workflow_id="typing", debounce=HOUR)
    assert query(database_url, "SELECT id, args FROM durable_workflows") == [("typing", ["e"])]
    assert [t.fired_at is None for t in start_timers(database_url, "typing")] == [False] * 4 + [
        True
    ]
    make_due(database_url, procs.redis_url, prefix, "typing")
    assert run.result(timeout=60) == "hello e!", procs.logs()
    assert seen(procs.redis_url, prefix) == ["e"]
    starts = [e for e in events(database_url, "typing") if e == "started"]
    assert starts == ["started"]


def test_real_processes_a_delayed_start_survives_a_redis_flush_and_a_beat_restart(
    processes: tuple[Durable, Processes], database_url: str, prefix: str
) -> None:
    durable, procs = processes
    beat = procs.start_beat("beat-1")
    run = durable.start("delay.greet", "flushed", workflow_id="survivor", countdown=HOUR)
    (timer,) = start_timers(database_url, "survivor")
    client = redis.Redis.from_url(procs.redis_url)
    wait_until(lambda: client.exists(f"{prefix}:timers:built"), what=procs.logs())
    assert client.zscore(f"{prefix}:timers", str(timer.id)) is not None
    procs.kill(beat)
    client.flushall()
    assert client.zscore(f"{prefix}:timers", str(timer.id)) is None

    procs.start_beat("beat-2")
    wait_until(
        lambda: client.zscore(f"{prefix}:timers", str(timer.id)) is not None,
        timeout=30,
        what="the index rebuilt from PostgreSQL: " + procs.logs(),
    )
    assert run.status() == "running" and step_count(database_url, "survivor") == 0
    procs.workers.start("worker")
    make_due(database_url, procs.redis_url, prefix, "survivor")
    assert run.result(timeout=60) == "hello flushed!", procs.logs()
    assert seen(procs.redis_url, prefix) == ["flushed"]
    client.close()


# -- the command line ----------------------------------------------------------------------------


def durable_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "durable.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_cli_start_takes_countdown_start_at_and_debounce(
    delay: tuple[Celery, Durable], database_url: str, redis_url: str, prefix: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env.update(
        DURABLE_DATABASE_URL=database_url,
        DURABLE_REDIS_URL=redis_url,
        DELAY_PREFIX=prefix,
        DURABLE_APP="tests.apps.delay_app",
        PYTHONPATH=str(ROOT),
    )
    done = durable_cli(
        env, "start", "delay.greet", "--id", "cli-1", "--args", '["z"]', "--countdown", "2h"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cli-1"
    row = run_row(database_url, "cli-1")
    assert row.start_at - row.created_at == timedelta(hours=2)

    at = "2100-01-01T09:00:00Z"
    done = durable_cli(
        env, "start", "delay.greet", "--id", "cli-2", "--args", '["y"]', "--start-at", at
    )
    assert done.returncode == 0, done.stderr
    assert run_row(database_url, "cli-2").start_at == datetime(2100, 1, 1, 9, tzinfo=UTC)

    for args in (["w"], ["v"]):
        done = durable_cli(
            env,
            "start",
            "delay.greet",
            "--id",
            "cli-3",
            "--args",
            f'["{args[0]}"]',
            "--debounce",
            "10m",
        )
        assert done.returncode == 0, done.stderr
    assert run_row(database_url, "cli-3").args == ["v"]

    shown = durable_cli(env, "show", "cli-2")
    assert shown.returncode == 0, shown.stderr
    assert "waiting for its start at 2100-01-01 09:00:00" in shown.stdout
    listed = durable_cli(env, "list", "--json")
    waits = {r["id"]: r["waiting"]["on"] for r in json.loads(listed.stdout)}
    assert waits == {"cli-1": "start", "cli-2": "start", "cli-3": "start"}

    for bad, says in (
        (["--start-at", "2100-01-01T09:00:00"], "time zone"),
        (["--countdown", "soon"], "not a duration"),
        (["--debounce", "5m"], "needs a workflow_id"),
    ):
        failed = durable_cli(env, "start", "delay.greet", *bad)
        assert failed.returncode != 0
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], failed.stderr
    assert len(query(database_url, "SELECT id FROM durable_workflows")) == 3


def test_delayed_starts_carry_their_attributes_and_a_debounce_replaces_them(
    delay: tuple[Celery, Durable], database_url: str
) -> None:
    _, durable = delay
    durable.start("delay.greet", "a", workflow_id="tagged", countdown=HOUR, attributes={"c": 1})
    assert run_row(database_url, "tagged").attributes == {"c": 1}
    assert [r.id for r in durable.list_runs(attributes={"c": 1})] == ["tagged"]
    durable.start("delay.greet", "b", workflow_id="bounced", debounce=HOUR, attributes={"c": 2})
    durable.start("delay.greet", "b", workflow_id="bounced", debounce=HOUR, attributes={"c": 3})
    assert run_row(database_url, "bounced").attributes == {"c": 3}
    durable.start("delay.greet", "c", workflow_id="bounced", debounce=HOUR)
    assert run_row(database_url, "bounced").attributes == {"c": 3}
    durable.start_many(
        "delay.greet",
        [("x",), ("y",)],
        workflow_ids=["many-a", "many-b"],
        countdown=HOUR,
        attributes_list=[{"batch": 7}, None],
    )
    assert run_row(database_url, "many-a").attributes == {"batch": 7}
    assert run_row(database_url, "many-b").attributes == {}
