"""Races at the edges of the one-writer rule: a signal at its wait's deadline, and an
activation that lost its lease while it ran."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from durable import Durable, SignalTimeout
from durable.activation import activate
from durable.beat import Beat
from tests.apps.crash_app import build
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


def register_wait(durable: Durable) -> None:
    """A wait for ``go`` with a timeout; on timeout a second wait, without one, for ``go``.

    A signal that lost the race to the timeout is kept: the second wait takes it.
    """

    @durable.workflow("race.wait")
    def wait(ctx: Any) -> list[Any]:
        try:
            return ["signal", ctx.wait_for_signal("go", timeout=HOUR)]
        except SignalTimeout:
            return ["timeout", ctx.wait_for_signal("go")]


def waiting_timer(database_url: str, wid: str) -> int:
    """The unfired timeout timer of the run's wait at position 1, once it waits."""
    rows = query(
        database_url,
        "SELECT t.id FROM durable_timers t JOIN durable_steps s USING (workflow_id, seq)"
        " WHERE t.workflow_id = :wid AND t.seq = 1 AND t.purpose = 'timeout'"
        " AND t.fired_at IS NULL AND s.status = 'waiting'",
        wid=wid,
    )
    return int(rows[0].id) if rows else 0


def fire_now(durable: Durable, beat: Beat, timer_id: int) -> int:
    """Make the timer due now in the index and fire it as the beat's loop does."""
    durable.timer_index.add(timer_id, 0.0)
    return beat.fire_due()


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Make the calls on threads released together by a barrier; their values."""
    together = threading.Barrier(len(calls))

    def released(call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            together.wait(5)
            return call()

        return run

    threads = [Background(released(call)) for call in calls]
    return [thread.join() for thread in threads]


def outcome(database_url: str, wid: str) -> dict[str, Any]:
    """What the run's wait, its timer and the signal became."""
    wait = query(
        database_url,
        "SELECT status FROM durable_steps WHERE workflow_id = :wid AND seq = 1",
        wid=wid,
    )[0]
    taken = query(
        database_url,
        "SELECT consumed_seq FROM durable_signals WHERE workflow_id = :wid ORDER BY id",
        wid=wid,
    )
    fired = query(
        database_url,
        "SELECT fired_at IS NOT NULL AS fired FROM durable_timers"
        " WHERE workflow_id = :wid AND seq = 1",
        wid=wid,
    )
    events = query(
        database_url,
        "SELECT event, seq FROM " + HISTORY_ROWS + " WHERE workflow_id = :wid ORDER BY pos",
        wid=wid,
    )
    return {
        "wait": wait.status,
        "consumed_at": [r.consumed_seq for r in taken],
        "timer_fired": [r.fired for r in fired],
        "consumed_events": [r.seq for r in events if r.event == "signal consumed"],
    }


@pytest.mark.parametrize("first", ["timer", "signal"])
def test_a_signal_at_the_deadline_with_no_activation_between_loses_to_the_timer_and_is_kept(
    app: Celery, durable: Durable, database_url: str, first: str
) -> None:
    register_wait(durable)
    wid = f"race-{first}"
    durable.start("race.wait", workflow_id=wid)
    assert activate(durable, wid) == "suspended"  # the wait recorded, its timer set
    timer_id = waiting_timer(database_url, wid)
    assert timer_id
    beat = Beat(durable)
    # Both commits land before any activation replays the run: the signal is stored but
    # not taken, so the timer, which requires the wait still 'waiting', decides it.
    if first == "timer":
        assert fire_now(durable, beat, timer_id) == 1
        durable.signal(wid, "go", {"n": 1})
    else:
        durable.signal(wid, "go", {"n": 1})
        assert fire_now(durable, beat, timer_id) == 1
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        assert durable.run(wid).result(timeout=20) == ["timeout", {"n": 1}]
    assert outcome(database_url, wid) == {
        "wait": "timeout",
        "consumed_at": [2],  # kept for the later wait, taken once
        "timer_fired": [True],
        "consumed_events": [2],
    }


def test_a_timer_firing_after_the_signal_was_taken_changes_nothing(
    app: Celery, durable: Durable, database_url: str
) -> None:
    @durable.workflow("race.hold")
    def hold(ctx: Any) -> list[Any]:
        try:
            got = ["signal", ctx.wait_for_signal("go", timeout=HOUR)]
        except SignalTimeout:
            got = ["timeout", None]
        ctx.wait_for_signal("end")  # the run goes on: only the wait's status stops the timer
        return got

    wid = "race-taken"
    held = "SELECT 1 FROM durable_steps WHERE workflow_id = :wid AND seq = 2 AND status = 'waiting'"
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        run = durable.start("race.hold", workflow_id=wid)
        timer_id = wait_until(lambda: waiting_timer(database_url, wid), what="the wait")
        durable.signal(wid, "go", {"n": 1})
        wait_until(lambda: query(database_url, held, wid=wid), what="the signal taken")
        # The timer, due now, fires into a wait no longer 'waiting': no position moves, no
        # activation is owed.
        assert fire_now(durable, Beat(durable), timer_id) == 0
        assert outcome(database_url, wid) == {
            "wait": "completed",
            "consumed_at": [1],
            "timer_fired": [True],
            "consumed_events": [1],
        }
        durable.signal(wid, "end")
        assert run.result(timeout=20) == ["signal", {"n": 1}]


def test_a_signal_and_the_timeout_in_the_same_instant_give_exactly_one_outcome(
    app: Celery, durable: Durable, database_url: str
) -> None:
    register_wait(durable)
    beat = Beat(durable)
    ids = [f"race-now-{i}" for i in range(12)]
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False):
        runs = [durable.start("race.wait", workflow_id=wid) for wid in ids]
        timers = [wait_until(lambda w=w: waiting_timer(database_url, w)) for w in ids]
        for wid, timer_id in zip(ids, timers, strict=True):
            at_once(
                lambda w=wid: durable.signal(w, "go", {"to": w}),
                lambda t=timer_id: fire_now(durable, beat, t),
            )
        results = [run.result(timeout=30) for run in runs]
    for wid, result in zip(ids, results, strict=True):
        found = outcome(database_url, wid)
        if result[0] == "signal":  # the activation took the signal before the timer fired
            assert result == ["signal", {"to": wid}]
            assert found["wait"] == "completed" and found["consumed_at"] == [1]
        else:  # the timer fired first; the signal was kept for the second wait
            assert result == ["timeout", {"to": wid}]
            assert found["wait"] == "timeout" and found["consumed_at"] == [2]
        assert found["timer_fired"] == [True]
        assert found["consumed_events"] == found["consumed_at"]  # taken once, never twice


@pytest.fixture
def stalling(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Workers, redis.Redis]]:
    """Worker processes of the crash app with 2 s leases, and a beat sweeping for them."""
    clean_tables(database_url)
    settings = {"DURABLE_LEASE_TTL": "2", "DURABLE_REDISPATCH_AFTER": "2"}
    env = {
        **os.environ,
        **settings,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix, lease_ttl=2, redispatch_after=2)
    workers = Workers(env, tmp_path, "tests.apps.crash_app")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        yield durable, workers, client
    finally:
        beat.stopping.set()
        thread.join(5)
        for proc in workers.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
        workers.stop_all()
        clean_keys(redis_url, prefix)


def test_an_activation_that_lost_its_lease_commits_nothing(
    stalling: Any, prefix: str, database_url: str
) -> None:
    durable, workers, client = stalling

    def runs_of(kind: str) -> int:
        return int(client.get(f"{prefix}:count:{kind}") or 0)

    first = workers.start("stalled")
    run = durable.start("crash.gated", workflow_id="stale-1")
    wait_until(lambda: runs_of("gated") == 1, timeout=30, what="the first local step run")
    held = list(client.hkeys(f"{prefix}:unacked"))  # the stalled activation's message
    assert held
    # The process stalls (SIGSTOP: no heartbeat, no progress) in the middle of the local
    # step. Its lease runs out; the sweep sends the activation again, to another worker.
    os.killpg(first.pid, signal.SIGSTOP)
    workers.start("takeover")
    wait_until(lambda: runs_of("gated") == 2, timeout=30, what="the takeover's local step run")
    # The stalled activation wakes up and finishes its local step first, while the takeover
    # still runs its own: its commit must be refused, and it must go no further.
    client.rpush(f"{prefix}:gate:1", "go")
    os.killpg(first.pid, signal.SIGCONT)
    wait_until(
        lambda: not set(held) & set(client.hkeys(f"{prefix}:unacked")),
        timeout=30,
        what="the stalled activation to end",
    )
    rows = query(
        database_url,
        "SELECT seq, status, result FROM durable_steps WHERE workflow_id = 'stale-1'",
    )
    assert rows == []  # nothing of the stalled activation's was written
    client.rpush(f"{prefix}:gate:2", "go")
    assert run.result(timeout=30) == ["local run 2", "after"]
    steps = query(
        database_url,
        "SELECT seq, kind, status, result FROM durable_steps WHERE workflow_id = 'stale-1'"
        " ORDER BY seq",
    )
    assert [(s.seq, s.kind, s.status, s.result) for s in steps] == [
        (1, "local", "completed", "local run 2"),
        (2, "task", "completed", "after"),
    ]
    events = query(
        database_url,
        "SELECT seq, event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'stale-1'"
        " AND event LIKE 'step %' ORDER BY pos",
    )
    assert [(e.seq, e.event) for e in events].count((1, "step completed")) == 1
    assert runs_of("after") == 1  # the step after it was scheduled and run once
