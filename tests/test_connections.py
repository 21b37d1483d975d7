"""One connection pool per process, sized by ``pool_size``: what each process holds.

The counts are read from ``pg_stat_activity``, where each pool's connections are named
``durable:<pid>`` and the result-wait listener's ``durable-listener``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text

from durable import Durable
from durable.errors import ConfigurationError, StoreUnavailable
from durable.store import engine as store_engine
from tests.apps.pool_app import build
from tests.conftest import ROOT, Background, Workers, clean_keys, clean_tables, wait_until


def _pool_connections(database_url: str) -> Counter[str]:
    """Connections to the test database by application_name, this query's own aside."""
    with store_engine.autocommit(database_url).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT application_name AS name FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        return Counter(row.name for row in rows)


def test_every_engine_of_a_url_shares_one_pool_of_pool_size(database_url: str) -> None:
    url = database_url + "?connect_timeout=6"
    store_engine.configure(url, pool_size=2)
    views = [
        store_engine.autocommit(url),
        store_engine.autocommit(url, flush=False),
        store_engine.get_engine(url),
    ]
    assert {id(v.pool) for v in views} == {id(views[0].pool)}
    gate = threading.Barrier(6)
    seen: list[int] = []

    def use(engine: Any) -> None:
        gate.wait(10)
        for _ in range(20):
            with engine.connect() as conn:
                seen.append(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
                conn.commit()

    threads = [Background(use, views[i % 3]) for i in range(6)]
    for thread in threads:
        thread.join(60)
    assert len(seen) == 120
    assert len(set(seen)) <= 2  # six threads, three kinds of use, two connections
    assert views[0].pool.checkedin() <= 2
    store_engine.configure(url, pool_size=10)


def test_a_connection_used_unflushed_is_flushed_again_for_other_use(database_url: str) -> None:
    url = database_url + "?connect_timeout=8"
    store_engine.configure(url, pool_size=1)
    setting = text(
        "SELECT current_setting('synchronous_commit') AS now, reset_val AS server"
        " FROM pg_settings WHERE name = 'synchronous_commit'"
    )
    try:
        with store_engine.autocommit(url, flush=False).connect() as conn:
            assert conn.execute(setting).one().now == "off"
        with store_engine.autocommit(url).connect() as conn:
            row = conn.execute(setting).one()
            assert row.now == row.server
        with store_engine.autocommit(url, flush=False).connect() as conn:
            assert conn.execute(setting).one().now == "off"
        with store_engine.get_engine(url).connect() as conn, conn.begin():
            row = conn.execute(setting).one()
            assert row.now == row.server
    finally:
        store_engine.configure(url, pool_size=10)


def test_bad_pool_settings_are_refused_naming_them(database_url: str, redis_url: str) -> None:
    for settings, named in (
        ({"database_pooler": "pgbouncr"}, "database_pooler"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": "many"}, "pool_size"),
    ):
        app = Celery("pool-bad", broker=redis_url, set_as_current=False)
        durable = Durable(app, database_url=database_url, redis_url=redis_url, **settings)
        with pytest.raises(ConfigurationError, match=named):
            _ = durable.settings


@pytest.fixture
def pool_env(database_url: str, redis_url: str, prefix: str) -> Iterator[dict[str, str]]:
    clean_tables(database_url)
    yield {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "DURABLE_POOL_SIZE": "3",
        "POOL_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    clean_keys(redis_url, prefix)


@pytest.mark.timeout(300)
def test_workers_a_beat_and_a_client_each_hold_at_most_their_pool(
    pool_env: dict[str, str], database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A prefork worker of 1 child, one of 3, a ``durable beat`` and this client, with
    ``pool_size = 3``: no process holds more than 3 pooled connections (the listener aside)."""
    _, durable = build(prefix, redis_url, database_url=database_url, pool_size=3)
    workers = Workers(pool_env, tmp_path, "tests.apps.pool_app")
    workers.start("conn-solo", concurrency=1)
    workers.start("conn-four", concurrency=3)
    command = [sys.executable, "-m", "durable.cli", "beat", "--app", "tests.apps.pool_app:app"]
    with open(tmp_path / "beat.log", "wb") as log:
        beat = subprocess.Popen(
            command, cwd=ROOT, env=pool_env, stdout=log, stderr=subprocess.STDOUT
        )
    highest: Counter[str] = Counter()
    stopping = threading.Event()

    def sample() -> None:
        while not stopping.wait(0.05):
            for name, n in _pool_connections(database_url).items():
                highest[name] = max(highest[name], n)

    sampler = Background(sample)
    try:
        runs = [durable.start("pool.sum", i, 0.05, workflow_id=f"{prefix}-c{i}") for i in range(30)]
        assert [r.result(timeout=120) for r in runs] == [i + 111 for i in range(30)]
        wait_until(lambda: _beat_connected(highest, beat.pid), timeout=60, what="the beat")
    finally:
        stopping.set()
        sampler.join(10)
        beat.terminate()
        beat.wait(30)
        workers.stop_all()
    pools = {name: n for name, n in highest.items() if name.startswith("durable:")}
    # Every process that touched the store: the client (this one), the beat, and the
    # worker processes that ran steps (4 children, perhaps the parents too).
    assert f"durable:{os.getpid()}" in pools
    assert f"durable:{beat.pid}" in pools
    assert len(pools) >= 4
    assert max(pools.values()) <= 3
    assert highest["durable-listener"] <= 1  # this client's result waits


def _beat_connected(highest: Counter[str], pid: int) -> bool:
    return highest[f"durable:{pid}"] > 0


def test_a_pool_in_use_too_long_is_reported_naming_pool_size(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_url + "?connect_timeout=4"
    monkeypatch.setattr(store_engine, "POOL_TIMEOUT", 0.2)
    store_engine.configure(url, pool_size=1)
    engine = store_engine.autocommit(url)
    try:
        with engine.connect() as held:
            assert held.execute(text("SELECT 1")).scalar_one() == 1
            with pytest.raises(StoreUnavailable, match="pool_size") as caught:
                store_engine.with_retry(url, engine.connect, attempts=3)
            assert "pool of 1 came free" in str(caught.value)
        with store_engine.with_retry(url, engine.connect) as free:  # returned: usable again
            assert free.execute(text("SELECT 2")).scalar_one() == 2
    finally:
        store_engine.configure(url, pool_size=10)
