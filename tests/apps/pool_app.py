"""The app the connection tests run in real worker processes (``celery -A tests.apps.pool_app``).

Configured by the environment alone (``DURABLE_DATABASE_URL``, ``DURABLE_REDIS_URL``,
``DURABLE_DATABASE_POOLER``, ``DURABLE_POOL_SIZE``), as a deployment would be, with every
Redis key under ``POOL_PREFIX``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun

from durable import Durable


def build(prefix: str, redis_url: str, **settings: Any) -> tuple[Celery, Durable]:
    """The app, its tasks and workflows, keyed under ``prefix``; ``settings`` to Durable."""
    app = Celery(f"pool-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(app, redis_url=redis_url, key_prefix=prefix, **settings)

    client = redis.Redis.from_url(redis_url)

    @app.task(name="pool.add", shared=False)
    def add(x: int, y: int, pause: float = 0.0) -> int:
        """``x + y``, after ``pause`` seconds; notes the process that ran it."""
        client.sadd(f"{prefix}:pids", os.getpid())
        time.sleep(pause)
        return x + y

    @app.task(name="pool.held", shared=False)
    def held(x: int, y: int) -> int:
        """``x + y``; the child stays busy a moment after it (see ``hold_child``)."""
        return x + y

    @durable.workflow("pool.sum")
    def sum_workflow(ctx: Any, n: int, pause: float = 0.0) -> int:
        total = ctx.step(add, n, 1, pause)
        total = ctx.step(add, total, 10, pause)
        return int(ctx.step(add, total, 100, pause))

    @durable.workflow("pool.signalled")
    def signalled_workflow(ctx: Any, n: int) -> dict[str, Any]:
        ctx.set_event("stage", "waiting")
        got = ctx.wait_for_signal("go")
        return {"got": got, "sum": ctx.step(add, n, 1)}

    @durable.workflow("pool.hops")
    def hops_workflow(ctx: Any, n: int) -> int:
        total = ctx.step(held, n, 1)
        total = ctx.step(held, total, 10)
        return int(ctx.step(held, total, 100))

    return app, durable


@task_postrun.connect(weak=False, dispatch_uid="pool-app-hold-child")
def hold_child(task: Any = None, **_: Any) -> None:
    """Keep the child busy 0.2 s after ``pool.held`` returns, its next step already sent.

    A ``prefork`` worker hands a message to an idle child only, so a run of ``pool.hops``
    alone on a ``-c 2`` worker has each step after its first run on the other child.
    """
    if task is not None and task.name == "pool.held":
        time.sleep(0.2)


if os.environ.get("POOL_PREFIX"):
    app, durable = build(os.environ["POOL_PREFIX"], os.environ["DURABLE_REDIS_URL"])
