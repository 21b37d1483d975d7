"""Leases stay alive while their holder works, and only then."""

from __future__ import annotations

import time
from typing import Any

import redis
from celery.contrib.testing.worker import start_worker

from durable.beat import Beat
from tests.conftest import HISTORY_ROWS, Background, clean_keys, clean_tables, make_app, query


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
