"""Shared fixtures: real PostgreSQL and Redis, a fresh database per session, a key prefix
per test, in-process workers and beats.

A missing service fails the run; nothing here skips.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import text

from durable import Durable
from durable.beat import Beat
from durable.dev.services import Services, create_database, drop_database, ensure_services
from durable.store import engine as store_engine
from durable.store.history import events_sql
from durable.store.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent


class Workers:
    """Real ``celery worker`` processes of a test app, each in its own process group."""

    def __init__(self, env: dict[str, str], logdir: Path, app: str) -> None:
        self.env = env
        self.logdir = logdir
        self.app = app
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, concurrency: int = 1) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "celery", "-A", self.app, "worker", "--pool=prefork"]
        command += [f"--concurrency={concurrency}", f"--hostname={name}@%h"]
        command += ["--without-gossip", "--without-mingle", "--loglevel=INFO"]
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)


HISTORY_ROWS = f"({events_sql('')}) AS durable_history"
"""Every run's history as ``durable show`` reads it, the events step rows stand for
included, as a relation to select from (columns of ``durable_history``; order by ``pos``)."""


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    found = ensure_services()
    yield found
    found.stop()


@pytest.fixture(scope="session")
def database_url(services: Services) -> Iterator[str]:
    name = f"durable_test_{uuid.uuid4().hex[:10]}"
    url = create_database(services.database_url, name)
    upgrade(url)
    yield url
    store_engine.dispose_all()
    drop_database(services.database_url, name)


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    return services.redis_url


@pytest.fixture
def prefix() -> str:
    return f"dt{uuid.uuid4().hex[:10]}"


def clean_tables(database_url: str) -> None:
    with store_engine.autocommit(database_url).connect() as conn:
        conn.execute(text("TRUNCATE durable_workflows, durable_history, durable_limits CASCADE"))


def clean_keys(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def make_app(
    database_url: str, redis_url: str, prefix: str, **settings: Any
) -> tuple[Celery, Durable]:
    """A Celery app on Redis whose every key (queues and timers) starts with ``prefix``."""
    app = Celery(f"test-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, **settings
    )
    return app, durable


@pytest.fixture
def durable_app(database_url: str, redis_url: str, prefix: str) -> Iterator[tuple[Celery, Durable]]:
    clean_tables(database_url)
    app, durable = make_app(database_url, redis_url, prefix)
    yield app, durable
    clean_keys(redis_url, prefix)


@pytest.fixture
def app(durable_app: tuple[Celery, Durable]) -> Celery:
    return durable_app[0]


@pytest.fixture
def durable(durable_app: tuple[Celery, Durable]) -> Durable:
    return durable_app[1]


@pytest.fixture
def worker(app: Celery) -> Iterator[Any]:
    """An in-process worker (threads pool) consuming the test's queues."""
    with start_worker(
        app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"
    ) as w:
        yield w


class Background:
    """A thread whose failure fails the test: :meth:`join` re-raises what it raised."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        self.error: BaseException | None = None
        self.value: Any = None

        def run() -> None:
            try:
                self.value = target(*args)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 10.0) -> Any:
        """Wait for the thread; fail if it is still running or raised; return its value."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"thread still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
def beat(durable: Durable) -> Iterator[Beat]:
    """An in-process beat (timers and the liveness sweep) on a thread."""
    b = Beat(durable, sweep_interval=0.5)
    thread = Background(b.run)
    yield b
    b.stopping.set()
    thread.join()


def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def query(database_url: str, sql: str, **params: Any) -> list[Any]:
    with store_engine.autocommit(database_url).connect() as conn:
        return list(conn.execute(text(sql), params))


@pytest.fixture
def counter(redis_url: str, prefix: str) -> Callable[[str], int]:
    """Read a Redis counter that test tasks increment (``INCR <prefix>:count:<key>``)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def read(key: str) -> int:
        return int(client.get(f"{prefix}:count:{key}") or 0)

    return read


os.environ.setdefault("DURABLE_TEST", "1")
