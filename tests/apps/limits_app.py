"""The app that concurrency-limit tests run, in-process or in real worker processes.

``celery -A tests.apps.limits_app worker`` builds it from ``LIMITS_PREFIX`` and the
``DURABLE_*`` variables. Every limit's name starts with the test's key prefix, so tests never
share a limit. ``limits.gate`` blocks until the test opens its gate (a Redis key), so a test
holds slots for as long as it needs without sleeping on a guess.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from durable import Durable, Limit

GATE_TIMEOUT = 120.0
"""Seconds a gated step waits for its gate before it gives up (a test that never opened it)."""


def by_customer(customer: str, *_: Any, **__: Any) -> str:
    """The key of the per-customer limits: the step's first argument."""
    return customer


def build(
    database_url: str, redis_url: str, prefix: str, **settings: Any
) -> tuple[Celery, Durable]:
    """The app, its tasks and workflows, keyed under ``prefix``; ``settings`` to Durable."""
    app = Celery(f"limits-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, **settings
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    per_customer = Limit(f"{prefix}-customer", concurrency=2, key=by_customer)
    single = Limit(f"{prefix}-single", concurrency=1)
    declared = Limit(f"{prefix}-declared", concurrency=1, key=by_customer)
    rated = Limit(f"{prefix}-rate", rate="5/s")
    limits = {"customer": per_customer, "single": single, "rate": rated}

    @app.task(name="limits.work", shared=False)
    def work(customer: str, tag: str, seconds: float) -> str:
        client.incr(f"{prefix}:count:work")
        time.sleep(seconds)
        return tag

    @app.task(name="limits.gate", shared=False)
    def gate(customer: str, tag: str) -> str:
        """Waits for the test to open the gate: ``SET <prefix>:open 1``."""
        client.rpush(f"{prefix}:entered", tag)
        deadline = time.monotonic() + GATE_TIMEOUT
        while not client.exists(f"{prefix}:open") and time.monotonic() < deadline:
            time.sleep(0.02)
        return tag

    @app.task(name="limits.declared", shared=False, durable_limit=declared)
    def declared_task(customer: str, tag: str, limit: int = 0) -> str:
        """Declares its limit itself; ``limit`` is its own argument, not durable's."""
        client.rpush(f"{prefix}:entered", tag)
        while not client.exists(f"{prefix}:open"):
            time.sleep(0.02)
        return f"{tag}:{limit}"

    @app.task(name="limits.plain", shared=False)
    def plain(limit: int, priority: int) -> list[int]:
        """No limit: keyword arguments named limit and priority are the task's own."""
        return [limit, priority]

    @durable.workflow("limits.one")
    def one(ctx: Any, customer: str, tag: str, seconds: float, kind: str = "customer") -> str:
        return str(ctx.step(work, customer, tag, seconds, limit=limits[kind]))

    @durable.workflow("limits.gated")
    def gated(ctx: Any, customer: str, tag: str, priority: int = 0, kind: str = "single") -> str:
        return str(ctx.step(gate, customer, tag, limit=limits[kind], priority=priority))

    @durable.workflow("limits.declared")
    def declared_workflow(ctx: Any, customer: str, tag: str) -> str:
        return str(ctx.step(declared_task, customer, tag, limit=7))

    @durable.workflow("limits.plain")
    def plain_workflow(ctx: Any) -> list[int]:
        return list(ctx.step(plain, limit=3, priority=4))

    @durable.workflow("limits.fan")
    def fan(ctx: Any, tags: list[str]) -> list[str]:
        return list(ctx.map(gate.s("c"), tags, limit=single, priority=1))

    @durable.workflow("limits.local")
    def local_limited(ctx: Any) -> str:
        return str(ctx.step(by_customer, "x", local=True, limit=single))

    @durable.workflow("limits.bad_key")
    def bad_key(ctx: Any, customer: Any) -> str:
        broken = Limit(f"{prefix}-broken", concurrency=1, key=lambda c, *_: c["id"])
        return str(ctx.step(work, customer, "x", 0.0, limit=broken))

    return app, durable


if os.environ.get("LIMITS_PREFIX"):
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["LIMITS_PREFIX"],
    )
