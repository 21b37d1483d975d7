"""The app the canvas crash test runs in real worker processes (``tests.apps.canvas_app``).

Each task counts the runs of its body in Redis under the test's key prefix. ``canvas.slow``
runs long the first time, so that the test can SIGKILL its worker in the middle of a chain.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from durable import Durable

LEASE_TTL = 3.0  # seconds: a killed worker's step is sent again soon after


def build(database_url: str, redis_url: str, prefix: str) -> tuple[Celery, Durable]:
    """The app and its tasks, all keyed under ``prefix``."""
    app = Celery(f"canvas-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, lease_ttl=LEASE_TTL
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def record(name: str) -> int:
        return int(client.incr(f"{prefix}:count:{name}"))

    @app.task(name="canvas.add", shared=False)
    def add(x: int, y: int) -> int:
        record("add")
        return x + y

    @app.task(name="canvas.mul", shared=False)
    def mul(x: int, y: int) -> int:
        record("mul")
        return x * y

    @app.task(name="canvas.slow", shared=False)
    def slow(x: int, seconds: float) -> int:
        """Runs ``seconds`` the first time, briefly after that."""
        time.sleep(seconds if record("slow") == 1 else 0.1)
        return x + 1

    @app.task(name="canvas.total", shared=False)
    def total(values: list[int]) -> int:
        record("total")
        return sum(values)

    return app, durable


if os.environ.get("CANVAS_PREFIX"):
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["CANVAS_PREFIX"],
    )
