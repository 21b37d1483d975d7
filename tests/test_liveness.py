"""Leases stay alive while their holder works, and only then."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import redis
from celery.contrib.testing.worker import start_worker

from durable.beat import Beat
from durable.liveness import Heartbeat
from durable.store import runs as run_queries
from durable.store import steps as step_queries
from tests.apps.crash_app import build
from tests.conftest import (
    HISTORY_ROWS,
    ROOT,
    Background,
    Workers,
    clean_keys,
    clean_tables,
    make_app,
    query,
    wait_until,
)
from tests.store_helpers import schedule_step


def test_a_step_longer_than_its_lease_is_not_run_twice(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    # A 1.5 s lease renewed every 0.5 s; the step takes 4 s, the sweep runs every 0.2 s.
    app, durable = make_app(database_url, redis_url, prefix, lease_ttl=1.5, redispatch_after=1)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="t.long", shared=False)
    def long_step() -> str:
        client.incr(f"{prefix}:count:long")
        time.sleep(4)
        return "done"

    @durable.workflow("wf.long_step")
    def wf(ctx: Any) -> str:
        return str(ctx.step(long_step))

    beat = Beat(durable, sweep_interval=0.2)
    thread = Background(beat.run)
    try:
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
            assert durable.start("wf.long_step", workflow_id="long-1").result(timeout=30) == "done"
        assert int(client.get(f"{prefix}:count:long") or 0) == 1
    finally:
        beat.stopping.set()
        thread.join(5)
        clean_keys(redis_url, prefix)
    assert beat.stats.steps_redispatched == 0
    events = [
        r.event
        for r in query(
            database_url, "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'long-1'"
        )
    ]
    assert "step lease expired" not in events


def test_a_prefork_child_keeps_its_steps_lease_by_heartbeat(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A real ``celery worker -P prefork -c 2``: the heartbeat runs in the pool child."""
    clean_tables(database_url)
    # A 1.5 s lease (renewed every 0.5 s) in the workers and the beat; the body runs 6 s.
    settings = {"DURABLE_LEASE_TTL": "1.5", "DURABLE_REDISPATCH_AFTER": "1"}
    env = {
        **os.environ,
        **settings,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix, lease_ttl=1.5, redispatch_after=1)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    workers = Workers(env, tmp_path, "tests.apps.crash_app")
    beat = Beat(durable, sweep_interval=0.2)
    thread = Background(beat.run)
    lease_sql = (
        "SELECT lease_owner, lease_expires_at FROM durable_steps"
        " WHERE workflow_id = 'prefork-lease' AND seq = 1 AND status = 'started'"
    )
    expiries: list[Any] = []
    owners: set[str] = set()

    def watch() -> bool:
        """Note each lease expiry seen while the body runs; True once the body is done."""
        for row in query(database_url, lease_sql):
            owners.add(row.lease_owner)
            if not expiries or row.lease_expires_at != expiries[-1]:
                expiries.append(row.lease_expires_at)
        return int(client.get(f"{prefix}:count:slow-done") or 0) > 0

    try:
        workers.start("prefork", concurrency=2)
        run = durable.start("crash.step", 6, workflow_id="prefork-lease")
        wait_until(watch, timeout=60, interval=0.1, what="the long step to finish")
        assert run.result(timeout=30) == ["done on run 1", "after"]
        assert int(client.get(f"{prefix}:count:slow") or 0) == 1  # the body ran once
    finally:
        beat.stopping.set()
        thread.join(5)
        workers.stop_all()
        clean_keys(redis_url, prefix)
    assert len(owners) == 1  # one attempt, one token, no other worker took it
    # The expiry moved forward while the body ran: renewed by the pool child's heartbeat.
    assert len(expiries) >= 4, expiries
    assert expiries == sorted(expiries)
    # One claim: a copy the sweep may send while the first message waits for a busy pool
    # (unclaimed past redispatch_after) finds the step started and is ignored.
    attempts = query(
        database_url,
        "SELECT attempts FROM durable_steps WHERE workflow_id = 'prefork-lease' AND seq = 1",
    )
    assert [r.attempts for r in attempts] == [1]
    events = [
        r.event
        for r in query(
            database_url,
            "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'prefork-lease'",
        )
    ]
    assert "step lease expired" not in events


def test_the_heartbeat_renews_only_the_tokens_still_held() -> None:
    renewed: list[list[str]] = []
    beat = Heartbeat(lambda tokens: renewed.append(tokens) or len(tokens), interval=0.05)
    beat.hold("w#1")
    beat.hold("w#2")
    beat.hold("w#2")  # a step's run and the activation it continues, one token
    wait_until(lambda: renewed and renewed[-1] == ["w#1", "w#2"], what="both renewed")
    beat.release("w#1")  # an attempt that ended, however it ended
    beat.release("w#2")
    count = len(renewed)
    wait_until(lambda: len(renewed) > count + 1, what="more renewals")
    assert renewed[-1] == ["w#2"]  # still held once
    beat.release("w#2")
    assert beat.held() == []


def test_renewal_extends_the_listed_tokens_leases_only(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    _, durable = make_app(database_url, redis_url, prefix)
    with durable.connect() as conn:
        for wid in ("held-1", "dropped-1"):
            assert run_queries.insert_run(conn, wid, "wf.any", "[]", "{}")
            assert schedule_step(conn, wid, 1, "t.any", "[]", "{}", "{}")
            assert step_queries.claim_step(conn, wid, 1, f"w#{wid}", 1.0)
        assert run_queries.renew_leases(conn, ["w#held-1"], 3600.0) == 1
        # An attempt that gave up: its lease is dropped for the sweep.
        assert run_queries.drop_step_lease(conn, "dropped-1", 1, "w#dropped-1")
        assert not run_queries.drop_step_lease(conn, "held-1", 1, "w#someone-else")
    rows = {
        r.workflow_id: r.left
        for r in query(
            database_url,
            "SELECT workflow_id, extract(epoch FROM lease_expires_at - now()) AS left"
            " FROM durable_steps",
        )
    }
    assert rows["held-1"] > 3000 and rows["dropped-1"] <= 0
