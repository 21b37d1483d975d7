"""The app the soak's workers and beats run: ``celery -A chaos.app worker``.

Every step with a side effect applies it the way a payment API with idempotency keys does:
the body first logs its attempt (``chaos_attempts``), then inserts a row keyed by
``current_step().idempotency_key`` into ``chaos_effects`` with a fresh random token; a body
run again after a crash finds the row and returns the token of the first application. So a
committed step result must equal the token of the one effect row of its key, which the
checks verify (:mod:`chaos.checks`).

The workflow ``chaos.order`` uses every primitive the soak exercises: remote steps, a
parallel batch, a durable sleep, a step that fails twice and is retried on durable timers,
a signal wait that times out (some runs), a signal wait the soak satisfies, a local step,
a step that fails for good and is compensated (some runs), and an event; its first step
runs under a concurrency limit (``RESERVE``). ``chaos.tick`` is
the workflow of a schedule that fires every two seconds during the soak.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg
from celery import Celery

from durable import Durable, Limit, RetryPolicy, SignalTimeout, StepFailed, current_step

ORDER = "chaos.order"
TICK = "chaos.tick"
SCHEDULE = "chaos-tick"
TICK_EVERY = 2  # seconds
PART_SECONDS = 0.2  # a parallel part sleeps this long before and after its effect
VISIBILITY_TIMEOUT = 30.0  # seconds: a killed worker's messages come back late, as duplicates

# Survives a PostgreSQL restart of a few seconds inside a step (the effect table is there too).
POLICY = RetryPolicy(max_attempts=10, initial_interval=0.5, backoff=2.0, max_interval=5.0)
DOOMED = RetryPolicy(max_attempts=2, initial_interval=0.5)
# The reserve step runs under a concurrency limit, two at once per stock-keeping key (of
# three), across the soak's workers, through their kills and the servers' restarts.
RESERVE_LIMIT = "chaos-reserve"
RESERVE_SLOTS = 2
RESERVE = Limit(
    RESERVE_LIMIT, concurrency=RESERVE_SLOTS, key=lambda what, value: f"sku-{value % 3}"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS chaos_effects (
    key text PRIMARY KEY,
    task text NOT NULL,
    token text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS chaos_attempts (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    task text NOT NULL,
    attempt int NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"""


class Flaky(RuntimeError):
    """Raised by the first two attempts of ``chaos.flaky``."""


class Doomed(RuntimeError):
    """Raised by every attempt of ``chaos.doomed``."""


class Effects:
    """This process's connection to the effect tables (one per thread, reopened after a loss)."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.local = threading.local()

    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self.local, "conn", None)
        if conn is None or conn.closed or getattr(self.local, "pid", 0) != os.getpid():
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            self.local.conn, self.local.pid = conn, os.getpid()
        return conn

    def attempt(self, task: str) -> str:
        """Log this run of the body; returns the step's idempotency key."""
        step = current_step()
        key = step.idempotency_key or f"outside:{uuid.uuid4().hex}"
        self._run(
            "INSERT INTO chaos_attempts (key, task, attempt) VALUES (%s, %s, %s)",
            (key, task, step.attempt),
        )
        return key

    def apply(self, key: str, task: str, value: Any) -> str:
        """Apply the effect of ``key`` once; every call returns the first application's token."""
        token = f"{value}#{uuid.uuid4().hex[:10]}"
        rows = self._run(
            "WITH new AS (INSERT INTO chaos_effects (key, task, token) VALUES (%s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING RETURNING token)"
            " SELECT token FROM new UNION ALL SELECT token FROM chaos_effects WHERE key = %s",
            (key, task, token, key),
        )
        return str(rows[0][0])

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            cursor = self._conn().execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []
        except psycopg.OperationalError:
            self.local.conn = None  # a restart: the step fails, and its retry reconnects
            raise


def build(database_url: str, redis_url: str) -> tuple[Celery, Durable]:
    """The app with its tasks and workflows."""
    app = Celery("chaos", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    app.conf.broker_connection_max_retries = None
    durable = Durable(app, database_url=database_url, redis_url=redis_url)
    effects = Effects(database_url)

    @app.task(name="chaos.effect", shared=False)
    def effect(what: str, value: int) -> str:
        key = effects.attempt(what)
        if what == "part":  # long enough for a kill to land before or after the effect
            time.sleep(PART_SECONDS)
        token = effects.apply(key, what, f"{what}:{value}")
        if what == "part":
            time.sleep(PART_SECONDS)
        return token

    @app.task(name="chaos.flaky", shared=False)
    def flaky(what: str, value: int) -> str:
        key = effects.attempt(what)
        if current_step().attempt <= 2:
            raise Flaky(f"attempt {current_step().attempt} of {key} fails on purpose")
        return effects.apply(key, what, f"{what}:{value}")

    @app.task(name="chaos.doomed", shared=False)
    def doomed(value: int) -> str:
        effects.attempt("doomed")
        raise Doomed(f"step {current_step().idempotency_key} always fails")

    def ship(value: int) -> str:
        return effects.apply(effects.attempt("ship"), "ship", f"ship:{value}")

    @durable.workflow(ORDER)
    def order(ctx: Any, i: int) -> dict[str, Any]:
        tokens = [ctx.step(effect, "reserve", i, retry=POLICY, limit=RESERVE)]
        tokens += ctx.parallel([effect.s("part", i * 10 + k) for k in range(3)], retry=POLICY)
        ctx.sleep(1 + i % 5)
        tokens.append(ctx.step(flaky, "charge", i, retry=POLICY))
        timed_out = False
        if i % 4 == 0:
            try:
                ctx.wait_for_signal("never", timeout=timedelta(seconds=1.5))
            except SignalTimeout:
                timed_out = True
        go = ctx.wait_for_signal("go", timeout=timedelta(hours=1))
        tokens.append(ctx.step(ship, i, local=True, retry=POLICY))
        compensated = False
        if i % 5 == 0:
            try:
                ctx.step(doomed, i, retry=DOOMED)
            except StepFailed:
                tokens.append(ctx.step(effect, "refund", i, retry=POLICY))
                compensated = True
        ctx.set_event("status", "done")
        return {
            "i": i,
            "go": go,
            "timed_out": timed_out,
            "compensated": compensated,
            "tokens": tokens,
        }

    @durable.workflow(TICK)
    def tick(ctx: Any) -> str:
        return str(ctx.step(effect, "tick", 0, retry=POLICY))

    return app, durable


def expected(i: int) -> dict[str, Any]:
    """What ``chaos.order(i)`` returns, tokens aside (their values before the ``#``)."""
    values = [f"reserve:{i}", *(f"part:{i * 10 + k}" for k in range(3)), f"charge:{i}", f"ship:{i}"]
    if i % 5 == 0:
        values.append(f"refund:{i}")
    return {
        "i": i,
        "go": {"n": i},
        "timed_out": i % 4 == 0,
        "compensated": i % 5 == 0,
        "values": values,
    }


if os.environ.get("CHAOS_DATABASE_URL"):
    app, durable = build(os.environ["CHAOS_DATABASE_URL"], os.environ["CHAOS_REDIS_URL"])
