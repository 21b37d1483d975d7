"""The app that delayed-start tests run in real worker and beat processes.

``celery -A tests.apps.delay_app worker`` and ``durable beat --app tests.apps.delay_app``
read the store, Redis and the key prefix from ``DURABLE_DATABASE_URL``,
``DURABLE_REDIS_URL`` and ``DELAY_PREFIX``. Every run of the step's body is recorded in
Redis under the prefix, so a test can count runs and read the arguments they saw.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import redis
from celery import Celery

from durable import Durable


def build(
    database_url: str, redis_url: str, prefix: str, **settings: Any
) -> tuple[Celery, Durable]:
    """The app, its task and workflows, all keyed under ``prefix``; ``settings`` to Durable."""
    app = Celery(f"delay-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, **settings
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    @app.task(name="delay.record", shared=False)
    def record(name: str) -> str:
        """Note each run of the body: the names seen, in order."""
        client.rpush(f"{prefix}:seen", name)
        return f"hello {name}"

    @durable.workflow("delay.greet")
    def greet(ctx: Any, name: str, punctuation: str = "!") -> str:
        return str(ctx.step(record, name)) + punctuation

    @durable.workflow("delay.bounded", execution_timeout=timedelta(hours=2))
    def bounded(ctx: Any, name: str) -> str:
        return str(ctx.step(record, name))

    @durable.workflow("delay.wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    return app, durable


def seen(redis_url: str, prefix: str) -> list[str]:
    """The names the step's body ran with, in order."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return list(client.lrange(f"{prefix}:seen", 0, -1))
    finally:
        client.close()


if os.environ.get("DELAY_PREFIX"):
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["DELAY_PREFIX"],
    )
