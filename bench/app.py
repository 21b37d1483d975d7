"""The app the benchmark's worker runs: ``celery -A bench.app worker``.

One trivial task, ``bench.add``, is both the link of the plain Celery chain and the step of
the durable workflow, so the two sides run the same code on the same worker;
``bench.limited`` is the same workflow with every step under a concurrency limit that never
binds (the cost of a limited step). Its optional
``notify`` argument names a Redis list to which it pushes the wall-clock time at which it
ran: the completion signal of the last link or step. The other workflows serve the other
parts: ``bench.local`` (local steps), ``bench.nap`` (one sleep: timer lateness),
``bench.replay`` (local steps, then a long sleep: the cost of replaying that history) and
``bench.noop`` (nothing: the cost of a start).

The worker process counts and times the SQL statements durable sends (SQLAlchemy events,
in-memory counters); the task ``bench.flush`` reports and resets them, and closes the
process's pooled connections so that PostgreSQL publishes their statistics. It also stamps
the time each run-ending settle returned (:func:`stamp_ends`).

Everything is keyed under ``BENCH_PREFIX``: broker queues, results, durable's Redis keys.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from types import ModuleType
from typing import Any

import redis
from celery import Celery, Task
from sqlalchemy import Engine, TextClause, event

from durable import Durable, Limit
from durable.store import engine as store_engine
from durable.store import recovery, runs, steps, timers
from durable.store import statement as store_statement

PREFIX_ENV = "BENCH_PREFIX"
STEPS_WORKFLOW = "bench.steps"
LIMITED_WORKFLOW = "bench.limited"
LIMIT_SLOTS = 1_000_000  # a concurrency limit that never binds: its cost, not its waits
LOCAL_WORKFLOW = "bench.local"
NAP_WORKFLOW = "bench.nap"
REPLAY_WORKFLOW = "bench.replay"
NOOP_WORKFLOW = "bench.noop"
PARKED_SECONDS = 3600.0  # the sleep a replayed run is parked at

statements: Counter[str] = Counter()
seconds: Counter[str] = Counter()  # time from sending each statement to its result, summed


def _labels(*modules: ModuleType) -> dict[int, str]:
    """Name each of the store's SQL texts after its module and constant (``runs.acquire``)."""
    found: dict[int, str] = {}
    for module in modules:
        short = module.__name__.rsplit(".", 1)[-1]
        for name, value in vars(module).items():
            if isinstance(value, TextClause):
                found[id(value)] = f"{short}.{name.strip('_').lower()}"
    return found


_LABELS = _labels(runs, steps, recovery, timers)


def statement_label(context: Any, statement: str) -> str:
    """The store's name for a statement (``steps.settle``), else its first words."""
    compiled = getattr(getattr(context, "compiled", None), "statement", None)
    known = _LABELS.get(id(compiled))
    if known:
        return known
    return re.sub(r"\s+", " ", statement).strip()[:48]


def ended_key(prefix: str) -> str:
    """Where the worker sets the time (epoch) at which its last run-ending settle returned."""
    return f"{prefix}:bench:ended"


def stamp_ends(redis_url: str, prefix: str) -> None:
    """Set :func:`ended_key` each time a settle that ends a run returns: its commit is done.

    The bench times ``run.result()`` from there as well as from the ending transaction's
    clock, which PostgreSQL reads before the commit and its WAL flush.
    """
    client = redis.Redis.from_url(redis_url)
    key = ended_key(prefix)

    def sent(clause: TextClause, elapsed: float) -> None:
        if clause is steps._SETTLE_END:
            client.set(key, repr(time.time()))

    store_statement.on_statement(sent)


def count_statements() -> None:
    """Count and time every statement this process sends, by label.

    Most go through SQLAlchemy (its cursor events); the step path's claim and settle are
    sent on the driver's cursor, and reported by ``statement.on_statement``.
    """

    def sent(clause: TextClause, elapsed: float) -> None:
        label = _LABELS.get(id(clause)) or statement_label(None, clause.text)
        statements[label] += 1
        seconds[label] += elapsed

    store_statement.on_statement(sent)

    @event.listens_for(Engine, "before_cursor_execute")
    def before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        conn.info["bench_sent"] = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any) -> None:
        label = statement_label(context, statement)
        statements[label] += 1
        seconds[label] += time.perf_counter() - conn.info.pop("bench_sent", time.perf_counter())


def increment(x: int) -> int:
    """The body of a local step."""
    return x + 1


def build(
    database_url: str, redis_url: str, prefix: str, **settings: Any
) -> tuple[Celery, Durable, Task]:
    """The app, its tasks and workflows, every Redis key under ``prefix``; returns ``add``.

    ``settings`` go to ``Durable`` (the bench's caller starts runs by an activation with a
    second app built with ``eager_start=False``).
    """
    app = Celery(f"bench-{prefix}", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.result_backend_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.result_expires = 600
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, **settings
    )
    client = redis.Redis.from_url(redis_url)

    # Results ignored, as the plain chains' links are sent: a step's result is in PostgreSQL,
    # and a task that keeps results has each step write its outcome to the result backend
    # too. The chain with the result backend asks for its results (ignore_result=False).
    @app.task(name="bench.add", shared=False, ignore_result=True)
    def add(x: int, y: int, notify: str | None = None) -> int:
        if notify:
            client.rpush(notify, repr(time.time()))
        return x + y

    @app.task(name="bench.flush", shared=False, ignore_result=True)
    def flush(notify: str) -> None:
        store_engine.dispose_all()
        client.rpush(notify, json.dumps({"count": statements, "seconds": seconds}))
        statements.clear()
        seconds.clear()

    @durable.workflow(STEPS_WORKFLOW)
    def chain_of_steps(ctx: Any, n: int, notify: str) -> int:
        x = 0
        for _ in range(n - 1):
            x = ctx.step(add, x, 1)
        return int(ctx.step(add, x, 1, notify=notify))

    limit = Limit(f"{prefix}-bench", concurrency=LIMIT_SLOTS)

    @durable.workflow(LIMITED_WORKFLOW)
    def chain_of_limited_steps(ctx: Any, n: int, notify: str) -> int:
        """``bench.steps`` with every step under a concurrency limit (one key)."""
        x = 0
        for _ in range(n - 1):
            x = ctx.step(add, x, 1, limit=limit)
        return int(ctx.step(add, x, 1, notify=notify, limit=limit))

    @durable.workflow(LOCAL_WORKFLOW)
    def local_steps(ctx: Any, n: int) -> int:
        x = 0
        for _ in range(n):
            x = ctx.step(increment, x, local=True)
        return x

    @durable.workflow(NAP_WORKFLOW)
    def nap(ctx: Any, seconds: float) -> float:
        ctx.sleep(seconds)
        return seconds

    @durable.workflow(REPLAY_WORKFLOW)
    def parked(ctx: Any, n: int) -> int:
        x = 0
        for _ in range(n):
            x = ctx.step(increment, x, local=True)
        ctx.sleep(PARKED_SECONDS)
        return x

    @durable.workflow(NOOP_WORKFLOW)
    def noop(ctx: Any, i: int) -> int:
        return i

    return app, durable, add


if os.environ.get(PREFIX_ENV):
    count_statements()
    stamp_ends(os.environ["DURABLE_REDIS_URL"], os.environ[PREFIX_ENV])
    app, durable, add = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ[PREFIX_ENV],
    )
