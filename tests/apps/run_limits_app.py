"""The app that tests of workflows under a limit run, in-process or in real worker processes.

``celery -A tests.apps.run_limits_app worker`` builds it from ``LIMITS_PREFIX`` and the
``DURABLE_*`` variables. Every limit's name starts with the test's key prefix, so tests never
share a limit. ``gate`` blocks until the test opens its gate (a Redis key), so a test holds
a run's slot for as long as it needs without sleeping on a guess.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from durable import Durable, Limit, RetryPolicy

GATE_TIMEOUT = 120.0
"""Seconds a gated step waits for its gate before it gives up (a test that never opened it)."""


def by_tenant(tenant: str, *_: Any, **__: Any) -> str:
    """The key of the per-tenant limits: the run's first argument."""
    return tenant


def build(
    database_url: str, redis_url: str, prefix: str, **settings: Any
) -> tuple[Celery, Durable]:
    """The app, its tasks and workflows, keyed under ``prefix``; ``settings`` to Durable."""
    app = Celery(f"run-limits-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, **settings
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    per_tenant = Limit(f"{prefix}-tenant", concurrency=2, key=by_tenant)
    single = Limit(f"{prefix}-single", concurrency=1)

    @app.task(name="runlimits.work", shared=False)
    def work(tag: str, seconds: float) -> str:
        time.sleep(seconds)
        return tag

    @app.task(name="runlimits.gate", shared=False)
    def gate(tag: str) -> str:
        """Waits for the test to open the gate: ``SET <prefix>:open 1``."""
        client.rpush(f"{prefix}:entered", tag)
        deadline = time.monotonic() + GATE_TIMEOUT
        while not client.exists(f"{prefix}:open") and time.monotonic() < deadline:
            time.sleep(0.02)
        return tag

    @app.task(name="runlimits.flaky", shared=False)
    def flaky(tag: str) -> str:
        """Fails until the test sets ``<prefix>:fixed``."""
        if not client.exists(f"{prefix}:fixed"):
            raise RuntimeError(f"{tag} is broken")
        return tag

    @durable.workflow("runlimits.flaky", limit=single)
    def flaky_workflow(ctx: Any, tenant: str, tag: str) -> str:
        return str(ctx.step(flaky, tag, retry=RetryPolicy(max_attempts=1)))

    @durable.workflow("runlimits.job", limit=per_tenant)
    def job(ctx: Any, tenant: str, tag: str, seconds: float) -> str:
        first = ctx.step(work, tag, seconds)
        return str(ctx.step(work, first, seconds))

    @durable.workflow("runlimits.gated", limit=single)
    def gated(ctx: Any, tenant: str, tag: str) -> str:
        return str(ctx.step(gate, tag))

    @durable.workflow("runlimits.unlimited")
    def unlimited(ctx: Any, priority: int = 0) -> int:
        """No limit: a keyword argument named priority is the workflow's own."""
        return priority

    @durable.workflow("runlimits.parent")
    def parent(ctx: Any, tag: str) -> str:
        return str(ctx.child("runlimits.gated", "any", tag))

    @durable.workflow(
        "runlimits.bad_key", limit=Limit(f"{prefix}-broken", 1, key=lambda o: o["id"])
    )
    def bad_key(ctx: Any, order: Any) -> str:
        return "never"

    return app, durable


if os.environ.get("LIMITS_PREFIX"):
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["LIMITS_PREFIX"],
    )
