"""Durable behind PgBouncer in transaction mode, in front of a PostgreSQL of 20 connections.

PgBouncer is Debian's package, found on ``PATH`` or unpacked into the virtualenv by
``make install`` (:mod:`durable.dev.pgbouncer`); without it the tests that run it skip,
naming it.
The PostgreSQL is a throwaway one of this module, started with ``max_connections = 20``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from click.testing import CliRunner

from durable.beat import Beat
from durable.cli import cli
from durable.dev.pgbouncer import PrivatePgBouncer, fetch, find_pgbouncer
from durable.dev.servers import HOST, PrivatePostgres, ServiceError
from durable.dev.services import Services, create_database
from durable.store import engine as store_engine
from durable.store.migrate import upgrade
from tests.apps.pool_app import build
from tests.conftest import ROOT, Background, Workers, clean_keys

MAX_CONNECTIONS = 20
# Server connections PgBouncer may open to the database: the workers' share of the 20,
# leaving room for this module's own direct connections (the sampler, the set-up).
BOUNCER_POOL = 14


class Bounced:
    """A database on the small PostgreSQL, reached directly and through PgBouncer."""

    def __init__(self, postgres: PrivatePostgres, bouncer: PrivatePgBouncer, name: str) -> None:
        self.postgres = postgres
        self.bouncer = bouncer
        self.direct_url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
        self.url = bouncer.url(name)

    def client_backends(self) -> int:
        """Client connections the server holds now (its own background processes aside)."""
        return len(self.activity())

    def activity(self) -> list[tuple[Any, ...]]:
        conninfo = f"host={HOST} port={self.postgres.port} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return conn.execute(
                "SELECT pid, datname, application_name FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()


INSTALL_PGBOUNCER = "Debian's pgbouncer package, or `python -m durable.dev.pgbouncer fetch`"


@pytest.fixture(scope="module")
def bounced(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bounced]:
    if find_pgbouncer() is None:
        pytest.skip(f"optional dependency pgbouncer is missing: install it ({INSTALL_PGBOUNCER})")
    state = tmp_path_factory.mktemp("pgbouncer")
    with (
        PrivatePostgres(state_dir=state, max_connections=MAX_CONNECTIONS) as postgres,
        PrivatePgBouncer(HOST, postgres.port, pool_size=BOUNCER_POOL, state_dir=state) as b,
    ):
        name = f"durable_pgb_{uuid.uuid4().hex[:8]}"
        create_database(postgres.url, name)
        found = Bounced(postgres, b, name)
        upgrade(found.direct_url)
        yield found
        store_engine.dispose_all()


@pytest.fixture
def pool_app(bounced: Bounced, redis_url: str, prefix: str) -> Iterator[Any]:
    app, durable = build(
        prefix, redis_url, database_url=bounced.url, database_pooler="pgbouncer", pool_size=4
    )
    yield app, durable
    clean_keys(redis_url, prefix)


def _env(bounced: Bounced, redis_url: str, prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "DURABLE_DATABASE_URL": bounced.url,
        "DURABLE_REDIS_URL": redis_url,
        "DURABLE_DATABASE_POOLER": "pgbouncer",
        "DURABLE_POOL_SIZE": "3",
        "POOL_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }


class Sampler:
    """Reads the server's client connections until stopped; keeps the largest count."""

    def __init__(self, bounced: Bounced) -> None:
        self.bounced = bounced
        self.highest = 0
        self.samples = 0
        self.stopping = threading.Event()
        self.thread = Background(self._run)

    def _run(self) -> None:
        while not self.stopping.wait(0.1):
            self.highest = max(self.highest, self.bounced.client_backends())
            self.samples += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def _log_problems(logdir: Path) -> list[str]:
    pattern = re.compile(r"too many (clients|connections)|prepared statement|StoreUnavailable")
    return [
        f"{log.name}: {line}"
        for log in sorted(logdir.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if pattern.search(line)
    ]


def test_without_pgbouncer_or_apt_get_the_reason_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pgbouncer, apt-get, dpkg or ldd on it
    assert find_pgbouncer(tmp_path / "cache") is None
    with pytest.raises(ServiceError, match="no apt-get"):
        fetch(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    bouncer = PrivatePgBouncer(HOST, 0, state_dir=tmp_path)  # never started
    with pytest.raises(ValueError, match="not a SHOW command"):
        bouncer.show("CLIENTS; SELECT 1")


def test_result_waits_signals_and_events_work_through_pgbouncer(
    pool_app: Any, bounced: Bounced, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    _, durable = pool_app
    assert durable.settings.database_pooler == "pgbouncer"
    assert store_engine.options(bounced.url).pooler == "pgbouncer"
    workers = Workers(_env(bounced, redis_url, prefix), tmp_path, "tests.apps.pool_app")
    workers.start("pgb-small", concurrency=2)
    try:
        run = durable.start("pool.signalled", 41, workflow_id=f"{prefix}-sig")
        assert durable.get_event(run.id, "stage", timeout=60) == "waiting"
        durable.signal(run.id, "go", {"ok": True})
        assert run.result(timeout=60) == {"got": {"ok": True}, "sum": 42}
        # Statements repeated past psycopg's prepare threshold, on connections the pooler
        # hands from client to client: none is prepared, so none goes missing.
        done = [durable.start("pool.sum", i, workflow_id=f"{prefix}-s{i}") for i in range(8)]
        assert [r.result(timeout=60) for r in done] == [i + 111 for i in range(8)]
        assert run.status() == "completed"
    finally:
        workers.stop_all()
    assert _log_problems(tmp_path) == []


def test_the_cli_reads_the_pooler_from_the_environment(pool_app: Any, bounced: Bounced) -> None:
    _, durable = pool_app
    run = durable.start("pool.signalled", 1, workflow_id="cli-pgb")
    env = {k: None for k in os.environ if k.startswith("DURABLE_")}
    env |= {"DURABLE_DATABASE_URL": bounced.url, "DURABLE_DATABASE_POOLER": "pgbouncer"}
    result = CliRunner().invoke(cli, ["show", run.id, "--json"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "cli-pgb"
    assert store_engine.options(bounced.url).pooler == "pgbouncer"
    env["DURABLE_DATABASE_POOLER"] = "pgpool"
    refused = CliRunner().invoke(cli, ["show", run.id], env=env, catch_exceptions=False)
    assert refused.exit_code != 0
    assert "database_pooler" in refused.stderr
    durable.cancel(run.id)


@pytest.mark.timeout(900)
def test_forty_worker_processes_through_pgbouncer_on_twenty_connections(
    pool_app: Any, bounced: Bounced, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """4 prefork workers of 10 children each: 40 processes running steps and activations,
    each with its own pool, against a server that takes 20 connections.

    40 children under 4 parents rather than 40 solo workers: the same 40 pools and
    connections to PgBouncer, at a tenth of the start-up (imports, broker connections)
    on a small machine. Each step pauses 0.5 s: 200 runs keep all 40 children busy at once.
    """
    _, durable = pool_app
    workers = Workers(_env(bounced, redis_url, prefix), tmp_path, "tests.apps.pool_app")
    for i in range(4):
        workers.start(f"pgb-{i}", concurrency=10)
    beat = Beat(durable, sweep_interval=1.0)
    beat_thread = Background(beat.run)
    sampler = Sampler(bounced)
    client = redis.Redis.from_url(redis_url)
    try:
        n = 200
        runs = [durable.start("pool.sum", i, 0.5, workflow_id=f"{prefix}-w{i}") for i in range(n)]
        results = [r.result(timeout=600) for r in runs]
        assert results == [i + 111 for i in range(n)]
        ran_steps = {int(pid) for pid in client.smembers(f"{prefix}:pids")}
        clients = [c for c in bounced.bouncer.show("CLIENTS") if c["database"] != "pgbouncer"]
    finally:
        sampler.stop()
        beat.stopping.set()
        beat_thread.join(10)
        workers.stop_all()
        client.close()
    assert len(ran_steps) == 40  # every child ran steps
    # Each child holds its own connections to PgBouncer: twice as many clients as the
    # server may have connections, served by the pooler's few.
    assert len(clients) > 2 * MAX_CONNECTIONS
    assert sampler.samples > 0
    assert 0 < sampler.highest <= MAX_CONNECTIONS
    assert _log_problems(tmp_path) == []
