"""Crashes for real: worker processes killed with SIGKILL, stopped with SIGTERM, two beats."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from durable import Durable
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


@pytest.fixture
def crash(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Workers, redis.Redis]]:
    clean_tables(database_url)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix)
    workers = Workers(env, tmp_path, "tests.apps.crash_app")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        yield durable, workers, client
    finally:
        beat.stopping.set()
        thread.join(5)
        workers.stop_all()
        clean_keys(redis_url, prefix)


def count(client: redis.Redis, prefix: str, kind: str) -> int:
    return int(client.get(f"{prefix}:count:{kind}") or 0)


def unacked(client: redis.Redis, prefix: str) -> list[str]:
    """Delivery tags of the messages taken from the queues and not acknowledged yet."""
    return list(client.hkeys(f"{prefix}:unacked"))


def age(client: redis.Redis, prefix: str, tags: list[str]) -> None:
    """Let the visibility timeout of these unacknowledged messages pass now.

    The workers' broker sweep (every second) then redelivers them, as Redis would an hour
    after their worker died: after durable ran their work again.
    """
    client.zadd(f"{prefix}:unacked_index", dict.fromkeys(tags, 0), xx=True)


def redelivered(client: redis.Redis, prefix: str) -> list[str]:
    """What each message the broker redelivered did (see ``tests/apps/crash_app.py``)."""
    return list(client.lrange(f"{prefix}:redelivered", 0, -1))


def redeliver_late(client: redis.Redis, prefix: str, tags: list[str]) -> list[str]:
    """Redeliver the killed worker's messages now; what each did once they all ran."""
    assert tags, "the killed worker held no message"
    assert redelivered(client, prefix) == []  # nothing came back before the re-run
    age(client, prefix, tags)
    return wait_until(
        lambda: (found := redelivered(client, prefix)) and len(found) >= len(tags) and found,
        timeout=30,
        what="the late redelivery",
    )


def holding(database_url: str, wid: str) -> bool:
    """Whether the run waits for signal ``go`` (``held``: its work before is done)."""
    return bool(
        query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = :wid AND kind = 'signal' "
            "AND status = 'waiting'",
            wid=wid,
        )
    )


def step_status(database_url: str, wid: str, seq: int) -> str | None:
    rows = query(
        database_url,
        f"SELECT status FROM durable_steps WHERE workflow_id = '{wid}' AND seq = {seq}",
    )
    return rows[0].status if rows else None


def test_sigkilled_step_runs_again_with_the_same_key(
    crash: Any, prefix: str, database_url: str
) -> None:
    durable, workers, client = crash
    first = workers.start("first")
    run = durable.start("crash.step", 30, held=True, workflow_id="kill-step")
    wait_until(lambda: count(client, prefix, "slow") == 1, timeout=30, what="the step to start")
    # The step began unclaimed (its first delivery, in the process that scheduled it); the
    # heartbeat claims it half-way to redispatch_after. Kill it once it holds a lease.
    wait_until(
        lambda: step_status(database_url, "kill-step", 1) == "started",
        timeout=30,
        what="the step's claim",
    )
    held = unacked(client, prefix)
    workers.kill(first)
    workers.start("second")
    wait_until(lambda: holding(database_url, "kill-step"), timeout=60, what="the re-run")
    # The killed worker's message is still unacknowledged in Redis. Redelivered after the
    # re-run, while the run goes on, it finds the step finished and does nothing.
    assert redeliver_late(client, prefix, held) == ["crash.slow kill-step#1 ignored"]
    durable.signal("kill-step", "go")
    assert run.result(timeout=60) == ["done on run 2", "after"]
    keys = client.lrange(f"{prefix}:keys:slow", 0, -1)
    assert keys == ["kill-step:1", "kill-step:1"]
    (step,) = query(
        database_url,
        "SELECT status, attempts, result FROM durable_steps "
        "WHERE workflow_id = 'kill-step' AND seq = 1",
    )
    assert (step.status, step.attempts, step.result) == ("completed", 2, "done on run 2")
    events = [
        r.event
        for r in query(
            database_url,
            "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'kill-step' ORDER BY pos",
        )
    ]
    assert events.count("step lease expired") == 1
    assert events.count("step completed") == 2  # the slow step once, the next step once
    assert count(client, prefix, "slow") == 2
    assert count(client, prefix, "after") == 1


def test_sigkilled_unclaimed_step_runs_again_with_the_same_key(
    crash: Any, prefix: str, database_url: str
) -> None:
    """A step killed while it ran unclaimed (its first delivery, in the process that
    scheduled it) is sent again by the sweep and claimed by another worker."""
    durable, workers, client = crash
    first = workers.start("first")
    run = durable.start("crash.second", 30, held=True, workflow_id="kill-unclaimed")
    wait_until(lambda: count(client, prefix, "slow") == 1, timeout=30, what="the step to start")
    (step,) = query(
        database_url,
        "SELECT status FROM durable_steps WHERE workflow_id = 'kill-unclaimed' AND seq = 2",
    )
    assert step.status == "scheduled"  # running, and not claimed
    held = unacked(client, prefix)
    workers.kill(first)
    workers.start("second")
    wait_until(lambda: holding(database_url, "kill-unclaimed"), timeout=60, what="the re-run")
    # The killed worker's message, redelivered after the re-run, is flagged as a
    # redelivery: it is claimed, finds the step finished, and does nothing.
    assert redeliver_late(client, prefix, held) == ["crash.slow kill-unclaimed#2 ignored"]
    durable.signal("kill-unclaimed", "go")
    assert run.result(timeout=60) == ["after", "done on run 2"]
    assert client.lrange(f"{prefix}:keys:slow", 0, -1) == ["kill-unclaimed:2"] * 2
    (step,) = query(
        database_url,
        "SELECT status, attempts, result FROM durable_steps "
        "WHERE workflow_id = 'kill-unclaimed' AND seq = 2",
    )
    # The killed attempt was never claimed, so it is not counted.
    assert (step.status, step.attempts, step.result) == ("completed", 1, "done on run 2")
    events = query(
        database_url,
        "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'kill-unclaimed' AND seq = 2 "
        "ORDER BY pos",
    )
    assert [e.event for e in events] == ["step scheduled", "step started", "step completed"]
    assert count(client, prefix, "slow") == 2


def test_sigkilled_activation_runs_again(crash: Any, prefix: str, database_url: str) -> None:
    durable, workers, client = crash
    first = workers.start("first")
    run = durable.start("crash.local", 30, held=True, workflow_id="kill-activation")
    wait_until(lambda: count(client, prefix, "local") == 1, timeout=30, what="the local step")
    held = unacked(client, prefix)
    workers.kill(first)
    workers.start("second")
    wait_until(lambda: holding(database_url, "kill-activation"), timeout=60, what="the re-run")
    # The killed activation's message, redelivered after the re-run, replays the run and
    # finds its local step recorded: it does not run it a third time.
    done = redeliver_late(client, prefix, held)
    assert done == ["durable.activate kill-activation suspended"], done
    assert count(client, prefix, "local") == 2
    durable.signal("kill-activation", "go")
    assert run.result(timeout=60) == ["local run 2", "after"]
    assert client.lrange(f"{prefix}:keys:local", 0, -1) == ["kill-activation:1"] * 2
    assert count(client, prefix, "after") == 1


def test_sigkilled_activation_keeps_the_attributes_it_set(
    crash: Any, prefix: str, database_url: str
) -> None:
    durable, workers, client = crash
    first = workers.start("first")
    run = durable.start("crash.tagged", 30, workflow_id="kill-tagged", attributes={"customer": 42})
    wait_until(lambda: count(client, prefix, "local") == 1, timeout=30, what="the local step")
    (before,) = durable.list_runs(attributes={"customer": 42, "stage": "started"})
    workers.kill(first)
    workers.start("second")
    assert run.result(timeout=60) == "local run 2"
    # The replay after the kill found the first set_attributes recorded: the same token and
    # draw, written once; then the second one merged.
    (after,) = durable.list_runs(attributes={"customer": 42})
    assert after.attributes == {**before.attributes, "stage": "done"}
    assert set(before.attributes) == {"customer", "stage", "token", "draw"}
    written = query(
        database_url,
        f"SELECT seq FROM {HISTORY_ROWS} WHERE workflow_id = 'kill-tagged' "
        "AND event = 'attributes set' ORDER BY seq",
    )
    assert [w.seq for w in written] == [1, 3]
    assert count(client, prefix, "local") == 2


def test_sigterm_lets_the_running_step_finish_once(
    crash: Any, prefix: str, database_url: str
) -> None:
    durable, workers, client = crash
    # A 2 s lease in the workers, the body running 8 s: through the warm shutdown the pool
    # child's heartbeat keeps the lease, so the other worker's sweep never re-sends it.
    workers.env = {**workers.env, "DURABLE_LEASE_TTL": "2"}
    first = workers.start("first")
    run = durable.start("crash.step", 8, workflow_id="term-step")
    wait_until(lambda: count(client, prefix, "slow") == 1, timeout=30, what="the step to start")
    first.send_signal(signal.SIGTERM)  # a deploy: warm shutdown
    workers.start("second")
    assert run.result(timeout=40) == ["done on run 1", "after"]
    first.wait(30)
    assert count(client, prefix, "slow") == 1
    assert count(client, prefix, "slow-done") == 1
    events = [
        r.event
        for r in query(
            database_url, "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'term-step'"
        )
    ]
    assert "step lease expired" not in events


def test_two_beats_fire_each_timer_once(
    crash: Any, prefix: str, database_url: str, redis_url: str
) -> None:
    durable, workers, client = crash
    _, other = build(database_url, redis_url, prefix)
    second_beat = Beat(other, sweep_interval=0.5)
    thread = Background(second_beat.run)
    try:
        workers.start("first", concurrency=2)
        runs = [durable.start("crash.nap", 1, workflow_id=f"nap-{i}") for i in range(30)]
        assert [r.result(timeout=60) for r in runs] == ["after"] * 30
    finally:
        second_beat.stopping.set()
        thread.join(5)
    fired = query(
        database_url,
        "SELECT workflow_id, count(*) AS n FROM durable_history "
        "WHERE event = 'timer fired' GROUP BY workflow_id",
    )
    assert len(fired) == 30 and all(r.n == 1 for r in fired)
    assert count(client, prefix, "after") == 30


def test_signal_sent_while_every_worker_is_down(crash: Any, prefix: str, database_url: str) -> None:
    durable, workers, client = crash
    first = workers.start("first")
    run = durable.start("crash.wait", workflow_id="sig-down")
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = "
            "'sig-down' AND kind = 'signal' AND status = 'waiting'",
        ),
        timeout=30,
        what="the wait",
    )
    workers.kill(first)
    durable.signal("sig-down", "go", {"approved": True})  # no worker runs at all
    (stored,) = query(
        database_url,
        "SELECT payload, consumed_seq FROM durable_signals WHERE workflow_id = 'sig-down'",
    )
    assert (stored.payload, stored.consumed_seq) == ({"approved": True}, None)
    # The activation message it sent is lost too (a Redis restarted meanwhile): the run is
    # owed an activation in PostgreSQL, and the beat's sweep sends it again.
    assert client.delete(f"{prefix}:celery") == 1
    workers.start("second")
    assert run.result(timeout=40) == [{"approved": True}, "after"]


def test_sigkill_mid_fanout_reruns_only_the_unfinished_steps(
    crash: Any, prefix: str, database_url: str
) -> None:
    durable, workers, client = crash
    first = workers.start("first", concurrency=2)
    run = durable.start("crash.fanout", 4, workflow_id="fan-kill")
    # Parts 1-3 committed (not merely run: a kill between a body's end and its commit
    # rightly runs that part again), part 0 still running.
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) AS n FROM durable_steps"
                " WHERE workflow_id = 'fan-kill' AND status = 'completed'",
            )[0].n
            == 3
            and count(client, prefix, "part:0") == 1
        ),
        timeout=40,
        what="the fan-out",
    )
    workers.kill(first)
    workers.start("second", concurrency=2)
    assert run.result(timeout=60) == [0, 10, 20, 30]
    assert count(client, prefix, "part:0") == 2  # the interrupted one ran again ...
    assert [count(client, prefix, f"part:{i}") for i in (1, 2, 3)] == [1, 1, 1]  # ... only it
    assert client.lrange(f"{prefix}:keys:part:0", 0, -1) == ["fan-kill:1", "fan-kill:1"]
