"""The app of ``tests/test_postgres_crash.py``, run by real worker processes
(``celery -A tests.apps.pgcrash_app worker``) and a real beat
(``durable beat --app tests.apps.pgcrash_app:durable``).

Every step body, remote or local, records itself in Redis under the test's key prefix:
``<prefix>:runs`` counts the runs of each body by its idempotency key (a hash),
``<prefix>:running`` holds the keys of the bodies running now (a set) and ``<prefix>:ended``
counts the bodies that ended. A body whose key is in ``<prefix>:held`` waits, on its first
run, before it returns, until the test pushes to ``<prefix>:gate:<key>``. Each body returns
a fresh token with its value, so a body run again returns another result than the one
committed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery

from durable import Durable, current_step

STEP_SECONDS = 0.4
"""How long a body runs: long enough that the test finds bodies running."""


def build(database_url: str, redis_url: str, prefix: str) -> tuple[Celery, Durable]:
    """The app, its task and its workflow, all keyed under ``prefix``."""
    app = Celery(f"pgcrash-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(app, database_url=database_url, redis_url=redis_url, key_prefix=prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def wait_for_gate(key: str) -> None:
        """Wait (at most two minutes) for the test to open the body's gate; short reads,
        each within the client's socket timeout."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if client.blpop([f"{prefix}:gate:{key}"], timeout=1):
                return

    @contextmanager
    def body() -> Iterator[None]:
        key = str(current_step().idempotency_key)
        n = client.hincrby(f"{prefix}:runs", key, 1)
        client.sadd(f"{prefix}:running", key)
        try:
            time.sleep(STEP_SECONDS)
            if n == 1 and client.sismember(f"{prefix}:held", key):
                wait_for_gate(key)
            yield
        finally:
            client.srem(f"{prefix}:running", key)
            client.incr(f"{prefix}:ended")

    @app.task(name="pgcrash.add", shared=False)
    def add(value: int, n: int) -> dict[str, Any]:
        with body():
            return {"value": value + n, "token": uuid.uuid4().hex}

    def double(value: int) -> dict[str, Any]:
        with body():
            return {"value": value * 2, "token": uuid.uuid4().hex}

    @durable.workflow("pgcrash.order")
    def order(ctx: Any, start: int, pause: float) -> list[dict[str, Any]]:
        """Remote steps, a local step and a sleep, each value built on the one before."""
        done = [ctx.step(add, start, 1)]
        done.append(ctx.step(double, done[-1]["value"], local=True))
        done.append(ctx.step(add, done[-1]["value"], 2))
        ctx.sleep(pause)
        done.append(ctx.step(add, done[-1]["value"], 3))
        done.append(ctx.step(add, done[-1]["value"], 4))
        return done

    return app, durable


def expected_values(start: int) -> list[int]:
    """The values the steps of ``pgcrash.order(start, ...)`` return, in order."""
    values = [start + 1]
    values.append(values[-1] * 2)
    for n in (2, 3, 4):
        values.append(values[-1] + n)
    return values


if os.environ.get("PGCRASH_PREFIX"):
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["PGCRASH_PREFIX"],
    )
