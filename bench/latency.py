"""(a) Latency of an N-step workflow against the same plain Celery chain; (f) its SQL.

For N = 1, 10 and 100, after one warm-up run of each kind, runs are timed interleaved:

- the plain chain ``chain(add.s(0, 1), add.s(1), ...)`` without a result backend: the last
  link pushes its wall-clock time to a Redis list;
- the same chain with the Redis result backend: the caller's ``.get()`` returns;
- the workflow ``for _ in range(N): x = ctx.step(add, x, 1)``: its last step pushes its time
  like the chain's last link (same signal), and PostgreSQL notifies the caller when the run's
  result is committed;
- the same workflow with every step under a concurrency limit that never binds
  (``bench.limited``): until its result is committed, the cost of a limited step;
- the same workflow started with ``eager_start`` off (its first step scheduled by a first
  activation on the worker; by default ``start()`` schedules it itself): until its result
  is committed.

Then a workflow of local steps is timed, and (on the solo worker) PostgreSQL's work for one
100-step run is counted.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import psutil
import psycopg
from celery import chain

from bench.app import LIMITED_WORKFLOW, LOCAL_WORKFLOW, STEPS_WORKFLOW
from bench.common import BenchError, psycopg_url
from bench.harness import RUN_TIMEOUT, Bench
from durable.store import engine as store_engine
from durable.store import runs as run_queries

SIZES = ((1, 5), (10, 5), (100, 3))  # (steps per run, measured runs after the warm-up)
LOCAL_STEPS, LOCAL_RUNS = 200, 3
COUNT_STEPS = 100
# durable's result-wait listener in the bench's process (durable.store.notices).
LISTENER_NAME = "durable-listener"


@dataclass
class Samples:
    """Total seconds of each run, per variant and N."""

    plain: dict[int, list[float]] = field(default_factory=dict)
    backend: dict[int, list[float]] = field(default_factory=dict)
    durable_last: dict[int, list[float]] = field(default_factory=dict)
    durable_done: dict[int, list[float]] = field(default_factory=dict)
    activated_done: dict[int, list[float]] = field(default_factory=dict)
    limited_done: dict[int, list[float]] = field(default_factory=dict)
    """``bench.limited``: every step under a concurrency limit, until committed."""
    durable_result: dict[int, list[float]] = field(default_factory=dict)
    """Until ``run.result()`` returned in the caller (which waited from its start)."""
    result_wait: list[float] = field(default_factory=list)
    """Seconds from the ending transaction's clock (before its commit and WAL flush) to the
    run's ``run.result()`` returning."""
    result_wait_acked: list[float] = field(default_factory=list)
    """Seconds from the worker's ending statement returning (its commit done and flushed)
    to the run's ``run.result()`` returning."""
    local: list[float] = field(default_factory=list)

    def add(self, kind: str, n: int, seconds: float) -> None:
        getattr(self, kind).setdefault(n, []).append(seconds)

    def total(self, kind: str, n: int) -> float:
        """Median seconds of the runs of ``n`` steps."""
        return float(statistics.median(getattr(self, kind)[n]))

    def ms_per_step(self, kind: str, n: int) -> float:
        return self.total(kind, n) / n * 1000

    def ms_per_added_step(self, kind: str) -> float:
        """Cost of each step added from N = 10 to N = 100 (medians): fixed costs cancel."""
        return (self.total(kind, 100) - self.total(kind, 10)) / 90 * 1000


@dataclass
class Counts:
    """PostgreSQL work of one durable run of ``COUNT_STEPS`` steps."""

    transactions: int
    """``xact_commit`` of the bench database over the run."""
    rows: int
    """Rows inserted, updated and deleted in durable's tables over the run."""
    wal_bytes: int
    """WAL the server wrote over the run (the whole server: other databases are idle)."""
    server_cpu: float
    """CPU seconds of the PostgreSQL server's processes over the run."""
    backend_cpu: float
    """CPU seconds of the backends serving the bench database over the run: the server's
    work for durable's statements, without other databases' sessions on a shared server,
    nor the WAL writer, checkpointer and autovacuum."""
    statements: dict[str, int]
    """Statements the worker sent, by label (``runs.finish``: ``_FINISH`` of the store)."""
    seconds: dict[str, float]
    """Their total time in the worker, from sending each one to having its result."""
    tables: dict[str, TableWrites] = field(default_factory=dict)
    """Rows written over the run, by table (those with any)."""
    round_trips: dict[float, float] = field(default_factory=dict)
    """Median seconds of one result read (``run.result()``'s statement, from the caller),
    by the seconds the connection sat idle before it (:func:`idle_round_trips`)."""

    @property
    def updates(self) -> int:
        """Rows updated over the run, in every table."""
        return sum(table.updated for table in self.tables.values())

    @property
    def hot_updates(self) -> int:
        """Of :attr:`updates`, those PostgreSQL made HOT (no index entry written)."""
        return sum(table.hot for table in self.tables.values())


@dataclass(frozen=True)
class TableWrites:
    """One table's ``pg_stat_user_tables`` counters, or their difference over a run."""

    inserted: int = 0
    updated: int = 0
    hot: int = 0
    """Updates that were HOT: the new row version on the same page, no index touched."""
    deleted: int = 0

    def __sub__(self, other: TableWrites) -> TableWrites:
        return TableWrites(
            self.inserted - other.inserted,
            self.updated - other.updated,
            self.hot - other.hot,
            self.deleted - other.deleted,
        )

    @property
    def rows(self) -> int:
        """Rows written: inserted, updated or deleted."""
        return self.inserted + self.updated + self.deleted


def plain(bench: Bench, n: int) -> float:
    """The chain without a result backend; done when its last link has pushed."""
    key = bench.key()
    links = [bench.add.s(0, 1)] + [bench.add.s(1) for _ in range(n - 1)]
    links[-1] = links[-1].clone(kwargs={"notify": key})
    links = [link.set(ignore_result=True) for link in links]
    started = time.time()
    chain(*links).apply_async()
    return float(bench.blpop(key)) - started


def backend(bench: Bench, n: int) -> float:
    """The chain with the Redis result backend; done when ``.get()`` returns."""
    links = [bench.add.s(0, 1)] + [bench.add.s(1) for _ in range(n - 1)]
    links = [link.set(ignore_result=False) for link in links]  # bench.add ignores by default
    started = time.time()
    result = chain(*links).apply_async()
    value = result.get(timeout=bench.left(RUN_TIMEOUT))
    elapsed = time.time() - started
    if value != n:
        raise BenchError(f"the chain of {n} returned {value!r}")
    return elapsed


class DurableRun(NamedTuple):
    """Seconds from the start of one run to each of its moments."""

    last: float
    """Its last step pushed its time."""
    done: float
    """The ending transaction read the server's clock (before its commit and WAL flush)."""
    returned: float
    """``run.result()`` returned in the caller."""
    acked: float | None
    """The worker's ending statement returned: its commit done (None if it was not seen)."""


def durable_run(
    bench: Bench,
    n: int,
    check: bool = True,
    activated: bool = False,
    workflow: str = STEPS_WORKFLOW,
) -> DurableRun:
    """The workflow, timed to each moment of :class:`DurableRun`.

    The caller waits in ``run.result()`` from the start (with ``check`` the value is
    checked); the commit is the server's clock in the ending transaction (the bench's
    NOTIFY); the acknowledgement is the time the worker's ending settle returned
    (``bench.app``). With ``activated`` it is started with ``eager_start`` off.
    """
    key = bench.key()
    bench.redis.delete(bench.ended_key)
    started = time.time()
    run = (bench.activated if activated else bench.durable).start(workflow, n, key)
    value = run.result(timeout=bench.left(RUN_TIMEOUT))
    returned = time.time()
    bench.wait_finished([run.id])
    committed = bench.ended_at.pop(run.id)
    last_step = float(bench.blpop(key))
    acked = bench.redis.get(bench.ended_key)
    if check and value != n:
        raise BenchError(f"the workflow of {n} steps returned {value!r}")
    return DurableRun(
        last_step - started,
        committed - started,
        returned - started,
        None if acked is None else float(acked) - started,
    )


def local_run(bench: Bench, n: int) -> float:
    """A workflow of ``n`` local steps, until its result is committed."""
    started = time.time()
    run = bench.durable.start(LOCAL_WORKFLOW, n)
    finished = bench.wait_finished([run.id])
    if run.result(timeout=5) != n:
        raise BenchError(f"the workflow of {n} local steps did not return {n}")
    return finished - started


def measure(bench: Bench, samples: Samples) -> None:
    """Warm up, then time every variant for every N, interleaved, and the local steps."""
    plain(bench, 10)
    backend(bench, 10)
    durable_run(bench, 10)
    durable_run(bench, 10, activated=True)
    durable_run(bench, 10, workflow=LIMITED_WORKFLOW)
    local_run(bench, 20)
    for n, runs in SIZES:
        for i in range(runs):
            order: list[Callable[[], None]] = [
                lambda n=n: samples.add("plain", n, plain(bench, n)),
                lambda n=n: samples.add("backend", n, backend(bench, n)),
                lambda n=n: _add_durable(bench, samples, n),
                lambda n=n: samples.add(
                    "activated_done", n, durable_run(bench, n, activated=True)[1]
                ),
                lambda n=n: samples.add(
                    "limited_done", n, durable_run(bench, n, workflow=LIMITED_WORKFLOW)[1]
                ),
            ]
            turn = i % len(order)
            for variant in order[turn:] + order[:turn]:  # rotate: no variant always first
                variant()
    for _ in range(LOCAL_RUNS):
        samples.local.append(local_run(bench, LOCAL_STEPS))


def _add_durable(bench: Bench, samples: Samples, n: int) -> None:
    run = durable_run(bench, n)
    samples.add("durable_last", n, run.last)
    samples.add("durable_done", n, run.done)
    samples.add("durable_result", n, run.returned)
    samples.result_wait.append(run.returned - run.done)
    if run.acked is not None:
        samples.result_wait_acked.append(run.returned - run.acked)


def count(bench: Bench) -> Counts:
    """PostgreSQL transactions and statements of one run of ``COUNT_STEPS`` steps.

    ``xact_commit`` of ``pg_stat_database`` is published by a backend when it goes idle,
    at most once a second, or when it exits; so before and after the run every pooled
    connection to the bench database is closed (the worker's by ``bench.flush``) and the
    count read once their backends are gone.
    """
    assert bench.listener is not None
    bench.listener.execute("SELECT pg_stat_force_next_flush()")
    _flush_worker(bench)
    before = _settled_commits(bench)
    tables, wal, cpu = _table_writes(bench), _wal_lsn(bench), _server_cpu(bench)
    backends = _backend_cpu(bench)
    durable_run(bench, COUNT_STEPS, check=False)
    # Before the worker's connections close: a backend's CPU is counted while it lives.
    cpu, wal = _server_cpu(bench) - cpu, _wal_lsn(bench) - wal
    ours = sum(now - backends.get(pid, 0.0) for pid, now in _backend_cpu(bench).items())
    statements, seconds = _flush_worker(bench)
    after = _settled_commits(bench)
    now = _table_writes(bench)
    written = {name: now[name] - tables.get(name, TableWrites()) for name in now}
    written = {name: table for name, table in written.items() if table.rows}
    rows = sum(table.rows for table in written.values())
    trips = idle_round_trips(bench)
    return Counts(after - before, rows, wal, cpu, ours, statements, seconds, written, trips)


IDLE = (0.0, 0.002, 0.010)  # seconds a connection sits idle before a timed statement
IDLE_READS = 200


def idle_round_trips(bench: Bench) -> dict[float, float]:
    """One statement's time after the connection (and its server process) sat idle.

    The statement ``run.result()`` sends once notified (``runs.get_outcome``, one row by its
    key, prepared), through durable's pool, after sleeping each of ``IDLE``: a step, a start
    or a result wait meets its connection idle for about that long between two statements.
    """
    wid = bench.sql("SELECT id FROM durable_workflows LIMIT 1")[0][0]
    core = bench.durable

    def read() -> None:
        core.store(lambda c: run_queries.get_outcome(c, wid))

    for _ in range(20):  # the pool's connection, the prepared statement
        read()
    found: dict[float, float] = {}
    for idle in IDLE:
        times = []
        for _ in range(IDLE_READS):
            time.sleep(idle)
            began = time.perf_counter()
            read()
            times.append(time.perf_counter() - began)
        found[idle] = float(statistics.median(times))
    return found


def _table_writes(bench: Bench) -> dict[str, TableWrites]:
    """Rows inserted, updated (HOT or not) and deleted so far in durable's tables.

    The statistics as published: every backend that wrote has gone idle or closed (see
    :func:`count`), and the snapshot is cleared so that the figures are read afresh.
    """
    assert bench.listener is not None
    bench.listener.execute("SELECT pg_stat_clear_snapshot()")
    found = bench.listener.execute(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del"
        " FROM pg_stat_user_tables WHERE relname LIKE 'durable%'"
    ).fetchall()
    return {str(name): TableWrites(*(int(v) for v in values)) for name, *values in found}


def _wal_lsn(bench: Bench) -> int:
    assert bench.listener is not None
    row = bench.listener.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')"
    ).fetchone()
    return int(row[0]) if row else 0


def _server_cpu(bench: Bench) -> float:
    """CPU seconds (user + system) of the server's processes alive now."""
    assert bench.listener is not None
    postmaster = psutil.Process(bench.listener.info.backend_pid).parent()
    total = 0.0
    for proc in [postmaster, *postmaster.children()] if postmaster else []:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _backend_cpu(bench: Bench) -> dict[str, float]:
    """CPU seconds (user + system) of each backend connected to the bench database now.

    Keyed by pid and start time, so that a pid reused by a new backend is not mistaken for
    the old one. The worker's pooled connections (opened before the run, by the flush that
    precedes it, or during it) live until the flush after it.
    """
    assert bench.listener is not None
    found = bench.listener.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend'"
    ).fetchall()
    cpu: dict[str, float] = {}
    for (pid,) in found:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(int(pid))
            times = proc.cpu_times()
            cpu[f"{pid}@{proc.create_time()}"] = times.user + times.system
    return cpu


def _flush_worker(bench: Bench) -> tuple[dict[str, int], dict[str, float]]:
    """The worker's statement counts and times since the last flush; closes connections."""
    key = bench.key()
    bench.app.send_task("bench.flush", args=[key], ignore_result=True)
    report = json.loads(bench.blpop(key))
    store_engine.dispose_all()
    return report["count"], report["seconds"]


def _settled_commits(bench: Bench) -> int:
    """``xact_commit`` of the bench database once only the listener is connected to it."""
    assert bench.listener is not None
    mine = bench.listener.info.backend_pid
    server = psycopg_url(bench.services.database_url)
    with psycopg.connect(server, autocommit=True) as conn:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            others = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s"
                " AND backend_type = 'client backend' AND application_name <> %s",
                (bench.db_name, mine, LISTENER_NAME),
            ).fetchone()
            if others is not None and others[0] == 0:
                break
            time.sleep(0.05)
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (bench.db_name,)
        ).fetchone()
    if row is None:
        raise BenchError(f"no statistics for database {bench.db_name}")
    return int(row[0])
