"""Tests of durable.dev.services, against the real servers it finds or starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from durable.dev.servers import PrivatePostgres, PrivateRedis, RestartablePostgres
from durable.dev.services import (
    Services,
    create_database,
    drop_database,
    ensure_services,
    start_private_redis,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    services = ensure_services()
    yield services.database_url
    services.stop()


def test_private_postgres_accepts_a_query_and_stops_cleanly(tmp_path: Path) -> None:
    server = PrivatePostgres(state_dir=tmp_path).start()
    pid = server.pid
    assert pid is not None
    try:
        with psycopg.connect(libpq_url(server.url)) as conn:
            assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
    finally:
        server.stop()

    assert not server.running
    assert not process_exists(pid)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq_url(server.url), connect_timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_restartable_postgres_keeps_its_flushed_data_through_a_crash_and_a_restart(
    tmp_path: Path,
) -> None:
    server = RestartablePostgres(state_dir=tmp_path).start()
    try:
        port, first = server.port, server.pid
        with psycopg.connect(libpq_url(server.url), autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1)")
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None
            data = Path(row[0])
        server.crash()
        assert not server.running and first is not None and not process_exists(first)
        server.start_again()
        assert "automatic recovery in progress" in server.log_path.read_text()
        server.restart(immediate=False, down=0.0)
        assert server.port == port and server.pid not in (None, first)
        with psycopg.connect(libpq_url(server.url)) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(1,)]
    finally:
        server.stop()
    assert not data.exists()
    assert list(tmp_path.iterdir()) == []


def test_ensure_services_starts_both_when_nothing_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABLE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DURABLE_REDIS_URL", raising=False)
    monkeypatch.setenv("DURABLE_PROBE_PG_PORT", str(unused_port()))
    monkeypatch.setenv("DURABLE_PROBE_REDIS_PORT", str(unused_port()))

    services = ensure_services(tmp_path)
    try:
        assert services.started_any
        assert services.database_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        with psycopg.connect(libpq_url(services.database_url)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
        assert redis_answers(services.redis_url)
    finally:
        services.stop()

    assert not redis_answers(services.redis_url)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq_url(services.database_url), connect_timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_ensure_services_takes_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_DATABASE_URL", "postgres://app@db.example:5433/app")
    monkeypatch.setenv("DURABLE_REDIS_URL", "redis://cache.example:6380/2")

    services = ensure_services()

    assert services == Services(
        "postgresql+psycopg://app@db.example:5433/app", "redis://cache.example:6380/2"
    )
    assert not services.started_any
    services.stop()  # nothing of ours to stop


@pytest.mark.parametrize(
    "given",
    ["postgres://u@h/d", "postgresql://u@h/d", "postgresql+psycopg://u@h/d"],
)
def test_database_urls_are_normalised_to_psycopg(
    given: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DURABLE_DATABASE_URL", given)
    monkeypatch.setenv("DURABLE_REDIS_URL", "redis://h:6390/0")

    assert ensure_services().database_url == "postgresql+psycopg://u@h/d"


def test_a_url_of_another_database_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_DATABASE_URL", "mysql://u@h/d")

    with pytest.raises(ValueError, match="mysql"):
        ensure_services()


def test_private_redis_answers_ping_stops_and_restarts_empty_on_its_port() -> None:
    server = PrivateRedis().start()
    try:
        url = server.url
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.set("key", "value")
        client.close()

        server.stop()
        assert not redis_answers(url)

        server.start()
        assert server.url == url
        client = redis.Redis.from_url(url)
        assert client.get("key") is None  # nothing persisted
        client.close()
    finally:
        server.stop()
    assert not redis_answers(url)


def test_start_private_redis_returns_its_url_and_a_stop_function() -> None:
    url, stop = start_private_redis()
    try:
        assert redis_answers(url)
    finally:
        stop()
    assert not redis_answers(url)


def test_create_and_drop_database(server_url: str) -> None:
    name = f"durable_devservices_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name)
    try:
        assert url.startswith("postgresql+psycopg://")
        assert url.rsplit("/", 1)[1] == name
        held = psycopg.connect(libpq_url(url))
        assert held.execute("SELECT current_database()").fetchone() == (name,)

        drop_database(server_url, name)  # while `held` is connected to it

        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        with psycopg.connect(libpq_url(server_url)) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            assert found.fetchall() == []
    finally:
        drop_database(server_url, name)  # a no-op when already dropped


def test_module_prints_export_lines() -> None:
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": "postgresql://app@db.example/app",
        "DURABLE_REDIS_URL": "redis://cache.example:6390/0",
    }

    result = subprocess.run(
        [sys.executable, "-m", "durable.dev.services"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert result.stdout.splitlines() == [
        "export DURABLE_DATABASE_URL=postgresql+psycopg://app@db.example/app",
        "export DURABLE_REDIS_URL=redis://cache.example:6390/0",
    ]
