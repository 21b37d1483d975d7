"""PostgreSQL crashing mid-run: the server SIGKILLed while workflows run, then restarted.

The test owns its PostgreSQL (:class:`durable.dev.servers.RestartablePostgres`, migrated by
:func:`durable.store.migrate.upgrade`), real ``celery worker`` processes and a real
``durable beat`` process of :mod:`tests.apps.pgcrash_app`; Redis is the test session's, under
the test's key prefix. ``docs/design.md`` ("Durability of commits", "What recovers each
crash") promises what the test checks: an outcome whose commit returned is flushed and
survives the crash; what the crash loses (claims, leases, releases, all unflushed) is
repaired by the recovery sweep; a statement that meets the outage is retried, then fails
with ``StoreUnavailable``, and the sweeps catch up; no process exits for it.

As in production, the database flushes the commits durable asks to flush
(``synchronous_commit = on``; the throwaway server turns it off for everything else). The
server's WAL writer is paused (SIGSTOP) until the crash, as one that lags behind would be:
only a flushed commit then writes the WAL, so the crash loses every commit made unflushed
since the last flushed one, not only those of its last fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from durable import Durable
from durable.dev.children import Child
from durable.dev.servers import RestartablePostgres
from durable.dev.services import create_database
from durable.store import engine as store_engine
from durable.store.migrate import upgrade
from tests.apps.pgcrash_app import build, expected_values
from tests.conftest import ROOT, clean_keys, wait_until

RUNS = 6
# Positions of pgcrash.order's step bodies (see the app): remote steps, the local step.
REMOTE, LOCAL = (1, 3, 5, 6), 2
UNFOLLOWED = (1, 5, 6)  # remote steps whose settle no flushed write of their run follows at once
HELD = "pgc-0:2"  # the first run's local step: its activation is running at the crash


@dataclass
class Stage:
    """The crash test's server, database, processes and Redis."""

    postgres: RestartablePostgres
    url: str
    durable: Durable
    client: redis.Redis
    prefix: str
    workers: list[Child]
    beat: Child

    @property
    def libpq_url(self) -> str:
        return self.url.replace("postgresql+psycopg://", "postgresql://", 1)

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """The rows of one query, on a connection of its own (the server may have crashed)."""
        with psycopg.connect(self.libpq_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def running(self) -> set[str]:
        """Idempotency keys of the step bodies running now."""
        return set(self.client.smembers(self.key("running")))

    def body_runs(self) -> dict[str, int]:
        """How many times each step body ran, by idempotency key."""
        return {k: int(v) for k, v in self.client.hgetall(self.key("runs")).items()}

    def ended(self) -> int:
        return int(self.client.get(self.key("ended")) or 0)


def app_process(env: dict[str, str], logdir: Path, name: str, pool: str = "") -> Child:
    """A worker of the app with two slots in ``pool``, or (no pool) a ``durable beat``."""
    if not pool:
        command = [sys.executable, "-m", "durable.cli", "beat", "--sweep-interval", "0.5"]
        command += ["--app", "tests.apps.pgcrash_app:durable"]
        return Child(name, command, env, logdir, cwd=ROOT)
    command = [sys.executable, "-m", "celery", "-A", "tests.apps.pgcrash_app", "worker", pool]
    command += ["--concurrency=2", f"--hostname={name}@%h", "--without-gossip"]
    command += ["--without-mingle", "--loglevel=INFO"]
    return Child(name, command, env, logdir, cwd=ROOT)


@pytest.fixture
def stage(redis_url: str, tmp_path: Path) -> Iterator[Stage]:
    prefix = f"pgc{uuid.uuid4().hex[:10]}"
    postgres = RestartablePostgres(state_dir=tmp_path / "servers").start()
    postmaster = postgres.pid
    children: list[Child] = []
    data_directory: Path | None = None
    wal_writer: int | None = None
    try:
        url = create_database(postgres.url, "pgcrash")
        libpq = url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute("ALTER DATABASE pgcrash SET synchronous_commit = on")
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None
            data_directory = Path(row[0])
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
            ).fetchone()
            assert row is not None
            wal_writer = int(row[0])
        upgrade(url)
        os.kill(wal_writer, signal.SIGSTOP)  # until the crash kills it
        _, durable = build(url, redis_url, prefix)
        env = {
            **os.environ,
            "DURABLE_DATABASE_URL": url,
            "DURABLE_REDIS_URL": redis_url,
            "PGCRASH_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
        }
        env.pop("CELERY_BROKER_URL", None)
        workers = [
            app_process(env, tmp_path, "worker1", "--pool=prefork"),
            app_process(env, tmp_path, "worker2", "--pool=threads"),
        ]
        beat = app_process(env, tmp_path, "beat")
        children = [*workers, beat]
        for child in children:
            child.start()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        yield Stage(postgres, url, durable, client, prefix, workers, beat)
        client.close()
    finally:
        if wal_writer is not None and postgres.pid == postmaster:
            # The test failed before the crash: let the WAL writer shut down with the server.
            with contextlib.suppress(ProcessLookupError):
                os.kill(wal_writer, signal.SIGCONT)
        for child in children:
            child.kill()
        store_engine.dispose_all()
        clean_keys(redis_url, prefix)
        postgres.stop()
    assert data_directory is not None and not data_directory.exists()


def committed(stage: Stage) -> dict[str, tuple[str, Any]]:
    """Every step body's committed result, by idempotency key: ``(kind, result)``."""
    rows = stage.rows(
        "SELECT workflow_id, seq, kind, result FROM durable_steps"
        " WHERE kind IN ('task', 'local') AND status = 'completed'"
    )
    return {f"{wid}:{seq}": (kind, result) for wid, seq, kind, result in rows}


def pending_sleeps(stage: Stage) -> int:
    rows = stage.rows(
        "SELECT count(*) FROM durable_timers WHERE purpose = 'sleep' AND fired_at IS NULL"
    )
    return int(rows[0][0])


def position(key: str) -> int:
    """The step number in an idempotency key (``<workflow id>:<step>``)."""
    return int(key.rsplit(":", 1)[1])


@pytest.mark.timeout(420)
def test_a_postgres_crash_mid_run_loses_no_committed_step_and_runs_none_again(
    stage: Stage,
) -> None:
    """SIGKILL of the PostgreSQL server mid-run, then crash recovery on the same data.

    Safeguard: a remote step's outcome is committed flushed (``synchronous_commit`` on: the
    commit returns once its WAL is written) before anything moves on (``runner._settle``,
    whose ``core.store(...)`` is flushed by default). With the settle made unflushed
    (``flush=False``) the test fails: the settles made since the last flushed commit are
    lost in the crash with the claims and leases, and those steps, seen committed before
    it, run again after it and commit another result. A local step's outcome is flushed
    the same way, but the crash is timed on a remote settle: made unflushed, a local
    outcome is saved by the flushed writes that follow it, and the test still passes.
    """
    stage.client.sadd(stage.key("held"), HELD)
    starts = {f"pgc-{i}": 10 * i for i in range(RUNS)}
    for i, (wid, start) in enumerate(starts.items()):
        stage.durable.start("pgcrash.order", start, 1.0 + 0.5 * i, workflow_id=wid)
    pids = {child.name: child.proc.pid for child in [*stage.workers, stage.beat] if child.proc}

    # Crash when everything is in flight: steps committed (remote and local), the held
    # activation running its local step, a remote body running, a sleep's timer pending;
    # and at once after a remote step's settle that no flushed write of its own run follows
    # (a step 3's is followed at once by its sleep's record), which the crash would take
    # with it if that settle were not flushed.
    seen: set[str] = set()

    def in_flight() -> tuple[dict[str, tuple[str, Any]], int] | None:
        ended = stage.ended()  # before the running bodies are read: theirs ends after it
        running = stage.running()
        sleeping = pending_sleeps(stage)
        found = committed(stage)
        fresh = any(position(k) in UNFOLLOWED for k in set(found) - seen)
        seen.update(found)
        ready = (
            fresh
            and sum(kind == "task" for kind, _ in found.values()) >= 4
            and any(kind == "local" for kind, _ in found.values())
            and HELD in running
            and any(position(k) in REMOTE for k in running)
            and sleeping > 0
        )
        return (found, ended) if ready else None

    before, ended_before = wait_until(
        in_flight, timeout=120, interval=0.005, what="steps in flight"
    )
    runs_before = stage.body_runs()
    stage.postgres.crash()

    # While the server is down, a remote body ends (its settle meets the outage), and so
    # does the held local step (its activation's commit meets it too).
    wait_until(lambda: stage.ended() > ended_before, timeout=60, what="a body ending")
    stage.client.rpush(stage.key(f"gate:{HELD}"), "go")
    wait_until(lambda: HELD not in stage.running(), timeout=60, what="the held local step")
    stage.postgres.start_again()
    log = stage.postgres.log_path.read_text(errors="replace")
    assert "automatic recovery in progress" in log  # a crash, not a clean shutdown

    def finished() -> bool:
        rows = stage.rows("SELECT count(*) FROM durable_workflows WHERE status = 'running'")
        return rows[0][0] == 0

    wait_until(finished, timeout=300, interval=0.5, what="every run to finish")

    # Every run completed with the right values, built on the results its steps committed.
    after = committed(stage)
    for wid, start in starts.items():
        ((status, result, error),) = stage.rows(
            "SELECT status, result, error FROM durable_workflows WHERE id = %(wid)s", wid=wid
        )
        assert status == "completed", (wid, status, error)
        assert [r["value"] for r in result] == expected_values(start), wid
        steps = [after[f"{wid}:{seq}"][1] for seq in (1, LOCAL, 3, 5, 6)]
        assert result == steps, wid
    # Every step committed before the crash kept its result, and its body never ran again.
    runs_after = stage.body_runs()
    for key, (kind, result) in before.items():
        assert after[key] == (kind, result), f"{key}: committed {result}, now {after[key][1]}"
        assert runs_after[key] == runs_before[key], f"{key} ({kind}) ran again after its commit"
    # The same workers and beat did the work, through the outage.
    for child in [*stage.workers, stage.beat]:
        assert child.alive, f"{child.name} exited:\n{child.log_tail()}"
        assert child.proc is not None and child.proc.pid == pids[child.name]
    # The beat reported the outage in one line per failed iteration, not a traceback.
    beat_log = stage.beat.log_path.read_text(errors="replace")
    assert "durable beat: iteration failed" in beat_log
    assert "Traceback" not in beat_log, beat_log[-3000:]
