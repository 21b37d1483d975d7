"""The app the broker tests run, in-process and in real worker processes, on either broker.

``celery -A tests.apps.rabbit_app worker`` builds it from the environment: ``BROKER_TEST_URL``
(``redis://`` or ``amqp://``), ``BROKER_TEST_PREFIX``, ``DURABLE_DATABASE_URL`` and
``DURABLE_REDIS_URL`` (the timer index, on Redis whatever the broker). Each test is kept
apart from the others by its prefix: on Redis every broker key starts with it; on RabbitMQ
it names the test's own queue and direct exchange on the shared vhost, which the test
deletes afterwards.

Every task records each run of its body in Redis under the prefix, so a test can count runs
and read the idempotency keys they saw.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun

from durable import Durable, RetryPolicy, current_step

LEASE_TTL = 4.0
"""Seconds a dead worker's step stays owned: short, so a killed step is re-sent quickly."""


def broker_settings(broker_url: str, prefix: str) -> dict[str, Any]:
    """The Celery settings of a test's app on ``broker_url``, isolated by ``prefix``."""
    settings: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        # No pidbox queues or fanout exchange left behind on a shared RabbitMQ.
        "worker_enable_remote_control": False,
    }
    if broker_url.startswith("amqp"):
        # Every message goes to the queue named prefix, through the direct exchange of the
        # same name (Celery's defaults follow task_default_queue). No AMQP heartbeats: an
        # in-process worker's event loop would otherwise sleep until the next heartbeat
        # check before it notices that it is asked to stop.
        settings.update(task_default_queue=prefix, broker_heartbeat=0)
    else:
        settings["broker_transport_options"] = {
            "global_keyprefix": f"{prefix}:",
            # Sweep for abandoned messages every second (the visibility timeout stays Redis's
            # hour), so that a test that ages one sees its late redelivery at once.
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    return settings


def build(
    broker_url: str, database_url: str, redis_url: str, prefix: str
) -> tuple[Celery, Durable]:
    """The app, its tasks and workflows, all keyed under ``prefix``."""
    app = Celery(f"brokers-{prefix}", set_as_current=False)
    app.conf.update(broker_settings(broker_url, prefix))
    durable = Durable(
        app,
        database_url=database_url,
        redis_url=redis_url,
        key_prefix=prefix,
        lease_ttl=LEASE_TTL,
        redispatch_after=LEASE_TTL,
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def note_redelivery(
        task: Any = None, args: Any = None, kwargs: Any = None, retval: Any = None, **_: Any
    ) -> None:
        """Log what a message the broker redelivered did (``ignored``: nothing): a step's
        message (the task's own, labelled ``durable_step``) or an activation's."""
        if task is None or task.app is not app:
            return
        label = (kwargs or {}).get("durable_step")
        if label is None and task.name != "durable.activate":
            return
        if (task.request.delivery_info or {}).get("redelivered"):
            what = label or ":".join(map(str, args))
            client.rpush(f"{prefix}:redelivered", f"{task.name} {what} {retval}")

    task_postrun.connect(note_redelivery, weak=False)

    def record(kind: str) -> int:
        client.rpush(f"{prefix}:keys:{kind}", str(current_step().idempotency_key))
        return int(client.incr(f"{prefix}:count:{kind}"))

    @app.task(name="brokers.add", shared=False)
    def add(a: int, b: int) -> int:
        record("add")
        return a + b

    @app.task(name="brokers.flaky", shared=False)
    def flaky(fail_times: int) -> str:
        """Fails its first ``fail_times`` runs, then succeeds."""
        n = record("flaky")
        if n <= fail_times:
            raise ConnectionError(f"upstream unavailable (run {n})")
        return f"ok on run {n}"

    @app.task(name="brokers.slow", shared=False)
    def slow(seconds: float) -> str:
        """Runs long the first time, so that a test can kill its worker meanwhile."""
        n = record("slow")
        time.sleep(seconds if n == 1 else 0.1)
        return f"done on run {n}"

    @durable.workflow("brokers.steps")
    def steps(ctx: Any, fail_times: int, nap: float) -> list[Any]:
        total = ctx.step(add, 2, 3)
        retried = ctx.step(flaky, fail_times, retry=RetryPolicy(initial_interval=0.2))
        ctx.sleep(nap)
        return [total, retried, ctx.step(add, total, 10)]

    @durable.workflow("brokers.signal")
    def wait_for_approval(ctx: Any) -> list[Any]:
        ctx.set_event("status", "waiting")
        approval = ctx.wait_for_signal("approved")
        ctx.set_event("status", "approved")
        return [approval, ctx.step(add, 1, 1)]

    @durable.workflow("brokers.kill")
    def killed(ctx: Any, seconds: float) -> list[Any]:
        """Waits for signal ``go`` after the slow step: a message redelivered meanwhile finds
        the run still running and only the step's own status to go by."""
        first = ctx.step(slow, seconds)
        ctx.wait_for_signal("go")
        return [first, ctx.step(add, 0, 1)]

    return app, durable


if os.environ.get("BROKER_TEST_PREFIX"):
    app, durable = build(
        os.environ["BROKER_TEST_URL"],
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["BROKER_TEST_PREFIX"],
    )
