"""The bench's throwaway database and key prefix, its worker, and the caller's side of runs."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Celery, Task

from bench import common
from bench.app import PREFIX_ENV, build, ended_key
from bench.common import BenchError, console, psycopg_url
from durable import Durable
from durable.dev.services import Services, create_database, drop_database
from durable.store import engine as store_engine
from durable.store.migrate import upgrade

RUN_TIMEOUT = 60.0  # one run, or one batch of runs
CHANNEL = "bench_finished"

# The bench database only: NOTIFY the caller, with '<id> <status> <epoch>', when a run ends.
# The trigger fires once per run, in the transaction that commits its end; <epoch> is the
# server's clock then, just before the commit (the bench and the server share a clock).
TRIGGER = f"""
CREATE FUNCTION bench_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.id || ' ' || NEW.status || ' '
                      || extract(epoch FROM clock_timestamp()));
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_finished AFTER UPDATE OF status ON durable_workflows
    FOR EACH ROW WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION bench_notify_finished();
"""


def child_env(services: Services, database_url: str, prefix: str) -> dict[str, str]:
    """The environment of a worker or beat of :mod:`bench.app` on this database and prefix."""
    path = [str(common.ROOT), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        **services.environ(),
        "DURABLE_DATABASE_URL": database_url,
        PREFIX_ENV: prefix,
        "PYTHONPATH": os.pathsep.join(filter(None, path)),
    }


class Bench:
    """The services, the throwaway database and key prefix, and the caller's side of runs."""

    def __init__(self, services: Services, deadline: float, budget: float) -> None:
        self.services = services
        self.deadline = deadline
        self.budget = budget
        self.prefix = f"bench{uuid.uuid4().hex[:10]}"
        self.db_name = f"durable_bench_{uuid.uuid4().hex[:10]}"
        self.database_url = ""
        self.redis = redis.Redis.from_url(services.redis_url)
        self.listener: psycopg.Connection[Any] | None = None
        self.ended_at: dict[str, float] = {}
        """Each run's end as the server's clock read it in the ending transaction (epoch)."""
        self.worker: common.Child | None = None
        self._app: Celery | None = None
        self._durable: Durable | None = None
        self._activated: Durable | None = None
        self._add: Task | None = None

    @property
    def ended_key(self) -> str:
        """The Redis key where the worker sets the time its last run-ending settle returned."""
        return ended_key(self.prefix)

    @property
    def app(self) -> Celery:
        assert self._app is not None, "set_up() first"
        return self._app

    @property
    def durable(self) -> Durable:
        assert self._durable is not None, "set_up() first"
        return self._durable

    @property
    def activated(self) -> Durable:
        """The same workflows on the caller's side with ``eager_start`` off."""
        assert self._activated is not None, "set_up() first"
        return self._activated

    @property
    def add(self) -> Task:
        assert self._add is not None, "set_up() first"
        return self._add

    # -- set-up and clean-up ---------------------------------------------------------------

    def set_up(self) -> None:
        self.database_url = create_database(self.services.database_url, self.db_name)
        upgrade(self.database_url)
        with psycopg.connect(psycopg_url(self.database_url), autocommit=True) as conn:
            conn.execute(TRIGGER)
        self._app, self._durable, self._add = build(
            self.database_url, self.services.redis_url, self.prefix
        )
        _, self._activated, _ = build(
            self.database_url, self.services.redis_url, self.prefix, eager_start=False
        )
        self.listener = psycopg.connect(psycopg_url(self.database_url), autocommit=True)
        self.listener.execute(f"LISTEN {CHANNEL}")

    def clean_up(self) -> None:
        """Stop the worker, drop the database, delete the keys; each step runs whatever fails."""
        steps: list[Callable[[], None]] = [self.stop_worker]
        if self.listener is not None:
            steps.append(self.listener.close)
        steps.append(store_engine.dispose_all)
        if self.database_url:
            steps.append(lambda: drop_database(self.services.database_url, self.db_name))
        steps += [lambda: delete_keys(self.redis, self.prefix), self.redis.close]
        for step in steps:
            try:
                step()
            except Exception as exc:
                console.print(f"[yellow]clean-up: {step!r} failed: {exc}[/]")

    def sql(self, statement: str, params: Iterable[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on the bench database; its rows (if any)."""
        with psycopg.connect(psycopg_url(self.database_url), autocommit=True) as conn:
            cursor = conn.execute(statement, params)  # type: ignore[arg-type]
            return list(cursor.fetchall()) if cursor.description else []

    # -- the worker ------------------------------------------------------------------------

    def start_worker(self, pool: str, logdir: Path) -> None:
        env = child_env(self.services, self.database_url, self.prefix)
        self.worker = common.worker(pool, env, logdir)
        self.worker.start()
        self.wait_worker_ready(self.add)

    def wait_worker_ready(self, add: Task, timeout: float = 30.0) -> None:
        """Ready when it has run a task (importing Celery and connecting takes a few seconds)."""
        key = self.key()
        add.apply_async((0, 1), {"notify": key}, ignore_result=True)
        self.blpop(key, timeout=timeout)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def purge_queue(self) -> None:
        """Drop the messages waiting in the default queue (nobody will consume them)."""
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(self.app.conf.task_default_queue)

    # -- waiting ---------------------------------------------------------------------------

    def key(self) -> str:
        return f"{self.prefix}:done:{uuid.uuid4().hex[:12]}"

    def left(self, timeout: float) -> float:
        left = min(timeout, self.deadline - time.monotonic())
        if left <= 0:
            raise BenchError(f"out of time (the bench is bounded to {self.budget:.0f} s)")
        return left

    def blpop(self, key: str, timeout: float = RUN_TIMEOUT) -> bytes:
        """Wait for a push to ``key``, checking on the worker every second."""
        end = time.monotonic() + self.left(timeout)
        while time.monotonic() < end:
            if self.worker is not None:
                self.worker.check()
            popped = self.redis.blpop([key], timeout=1)
            if popped is not None:
                return bytes(popped[1])
        raise self.stuck(f"nothing was pushed to {key} within {timeout:.0f} s")

    def collect(self, key: str, count: int, timeout: float = RUN_TIMEOUT) -> list[float]:
        """Wait for ``count`` pushes of a time to ``key``; returns the times."""
        return [float(self.blpop(key, timeout)) for _ in range(count)]

    def wait_finished(self, ids: Iterable[str], timeout: float = RUN_TIMEOUT) -> float:
        """Wait for the NOTIFY of every run in ``ids``; returns when the last arrived (epoch)."""
        assert self.listener is not None
        waiting = set(ids)
        end = time.monotonic() + self.left(timeout)
        while waiting and (left := end - time.monotonic()) > 0:
            if self.worker is not None:
                self.worker.check()
            for note in self.listener.notifies(timeout=min(left, 1.0), stop_after=len(waiting)):
                wid, status, ended = note.payload.split(" ")
                if wid not in waiting:
                    continue
                self.ended_at[wid] = float(ended)
                if status != "completed":
                    raise self.stuck(f"workflow {wid} ended {status}")
                waiting.discard(wid)
        if waiting:
            raise self.stuck(f"{len(waiting)} workflow(s) did not finish within {timeout:.0f} s")
        return time.time()

    def stuck(self, message: str) -> BenchError:
        if self.worker is not None:
            message += f"; the worker's log ends with:\n{self.worker.log_tail()}"
        return BenchError(message)


def delete_keys(client: redis.Redis, prefix: str) -> None:
    """Delete every Redis key under ``prefix``."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
