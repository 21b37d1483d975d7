"""A throwaway PgBouncer in transaction mode, from ``PATH`` or Debian's ``pgbouncer`` package.

PgBouncer is not on PyPI. :func:`find_pgbouncer` takes ``pgbouncer`` from ``PATH``, else the
copy that :func:`fetch` unpacked into ``<virtualenv>/pgbouncer``: it runs ``apt-get download``
(no root needed) for ``pgbouncer`` and for each of its library packages that is not
installed (``libc-ares2`` on a plain Debian 12), unpacks them with ``dpkg -x``, and checks
with ``ldd`` that the binary finds every shared library (``libevent`` included) once the
unpacked library folders are on ``LD_LIBRARY_PATH``. ``make install`` runs
``python -m durable.dev.pgbouncer fetch`` while the network is there; when it fails (no
network, not Debian) the tests that need PgBouncer skip, naming it.

:class:`PrivatePgBouncer` runs it on 127.0.0.1 on a free port with a generated
configuration: ``pool_mode = transaction``, trust authentication for the one user it is
given, every database of one PostgreSQL server, at most ``pool_size`` server connections
per database and user, and thousands of clients. Like the other throwaway servers it stops,
and deletes its directory, at :meth:`~durable.dev.servers.Server.stop`, at exit, or when the
thread that started it dies; started by root it runs as ``nobody``.

Example::

    with PrivatePgBouncer("127.0.0.1", 5432, user="postgres", pool_size=10) as bouncer:
        url = bouncer.url("postgres")
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.rows import dict_row

from durable.dev.servers import (
    HOST,
    PG_DRIVER_PREFIX,
    Server,
    ServiceError,
    _popen,
    _unprivileged_user,
    _world_reachable,
)

__all__ = ["Binary", "PrivatePgBouncer", "fetch", "find_pgbouncer"]

PACKAGE = "pgbouncer"
CACHE = Path(sys.prefix) / "pgbouncer"
"""Where :func:`fetch` unpacks the package: inside the virtualenv, deleted with it."""
_BINARY = Path("usr/sbin/pgbouncer")
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib", "lib")


@dataclass(frozen=True)
class Binary:
    """A runnable ``pgbouncer`` and the environment it needs (its library path)."""

    path: Path
    env: dict[str, str]


def find_pgbouncer(cache: Path = CACHE) -> Binary | None:
    """``pgbouncer`` from ``PATH``, else from ``cache`` if it runs there; else None."""
    on_path = shutil.which(PACKAGE)
    if on_path is not None:
        return Binary(Path(on_path), {})
    binary = cache / _BINARY
    if not binary.exists():
        return None
    found = Binary(binary, _library_env(cache))
    return found if not _missing_libraries(found) else None


def fetch(cache: Path = CACHE) -> Binary:
    """Download Debian's ``pgbouncer`` with its missing libraries and unpack it into ``cache``.

    Raises:
        ServiceError: ``apt-get`` or ``dpkg`` failed, or a shared library is still missing.
    """
    for tool in ("apt-get", "dpkg", "ldd"):
        if shutil.which(tool) is None:
            raise ServiceError(f"cannot fetch pgbouncer: no {tool} (not a Debian system)")
    packages = [PACKAGE, *(p for p in _depends(PACKAGE) if p.startswith("lib"))]
    wanted = [PACKAGE, *(p for p in packages[1:] if not _installed(p))]
    with tempfile.TemporaryDirectory(prefix="durable-pgbouncer-") as download:
        _run(["apt-get", "download", *wanted], cwd=download)
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        for deb in sorted(Path(download).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(cache)])
    found = Binary(cache / _BINARY, _library_env(cache))
    missing = _missing_libraries(found)
    if missing:
        raise ServiceError(f"pgbouncer unpacked but cannot run: missing {', '.join(missing)}")
    return found


def _depends(package: str) -> list[str]:
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package])
    names = []
    for line in out.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind == "Depends" and name and not name.startswith("<"):
            names.append(name.split(":")[0])
    return names


def _installed(package: str) -> bool:
    probe = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0 and probe.stdout.endswith("installed")


def _run(command: list[str], cwd: str | None = None) -> str:
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"{command[0]} failed: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ServiceError(f"{' '.join(command[:2])} failed: {last}")
    return done.stdout


def _library_env(root: Path) -> dict[str, str]:
    dirs = [str(root / d) for d in _LIB_DIRS if (root / d).is_dir()]
    return {"LD_LIBRARY_PATH": os.pathsep.join(dirs)} if dirs else {}


def _missing_libraries(binary: Binary) -> list[str]:
    env = {**os.environ, **binary.env}
    try:
        out = subprocess.run(
            ["ldd", str(binary.path)], capture_output=True, text=True, env=env, check=False
        ).stdout
    except OSError:
        return []  # no ldd: starting it will tell
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


class PrivatePgBouncer(Server):
    """A throwaway PgBouncer in transaction mode in front of one PostgreSQL server.

    Args:
        database_host: Host of the PostgreSQL server behind it.
        database_port: Its port.
        user: The one user clients log in as (trust authentication, as on the server).
        pool_size: Most server connections per database and user (``default_pool_size``).
        max_client_conn: Most client connections.
        port: Port to listen on (default: a free one).
        state_dir: Directory for its files (default: the system's temporary directory).
    """

    kind = "pgbouncer"
    start_timeout = 15.0
    stop_signals = ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0))

    def __init__(
        self,
        database_host: str,
        database_port: int,
        *,
        user: str = "postgres",
        pool_size: int = 10,
        max_client_conn: int = 2000,
        port: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        super().__init__(port=port, state_dir=state_dir)
        self.database_host = database_host
        self.database_port = database_port
        self.user = user
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` through this PgBouncer."""
        return f"{PG_DRIVER_PREFIX}{self.user}@{HOST}:{self.port}/{database}"

    def show(self, what: str) -> list[dict[str, Any]]:
        """The rows of ``SHOW <what>`` on PgBouncer's admin console (``CLIENTS``, ``POOLS``)."""
        if not what.isalpha():
            raise ValueError(f"not a SHOW command: {what!r}")
        conninfo = f"host={HOST} port={self.port} user={self.user} dbname=pgbouncer"
        # The admin console speaks the simple query protocol only: a client-side cursor.
        with psycopg.connect(
            conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor, row_factory=dict_row
        ) as conn:
            return conn.execute(f"SHOW {what}").fetchall()

    def _files_parent(self) -> Path | None:
        state_dir = self._state_dir
        if os.geteuid() == 0 and state_dir is not None and not _world_reachable(state_dir):
            return None  # the unprivileged server could not reach it; use the temp dir
        return state_dir

    def _spawn(self, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
        binary = find_pgbouncer()
        if binary is None:
            raise ServiceError(
                "no pgbouncer: install Debian's pgbouncer package or run "
                "`python -m durable.dev.pgbouncer fetch`"
            )
        run_as = None
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            run_as = _unprivileged_user()
            if not _world_reachable(binary.path):
                raise ServiceError(f"user {run_as.pw_name} cannot reach {binary.path}")
        config = workdir / "pgbouncer.ini"
        users = workdir / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        config.write_text(self._config(users))
        if run_as is not None:
            for path in (workdir, config, users):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        env = {**os.environ, **binary.env}
        return _popen([str(binary.path), str(config)], log, run_as=run_as, env=env)

    def _config(self, users: Path) -> str:
        return "\n".join(
            [
                "[databases]",
                f"* = host={self.database_host} port={self.database_port}",
                "[pgbouncer]",
                f"listen_addr = {HOST}",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {users}",
                f"admin_users = {self.user}",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "min_pool_size = 0",
                "reserve_pool_size = 0",
                f"max_client_conn = {self.max_client_conn}",
                "server_idle_timeout = 30",
                "",
            ]
        )

    def _answers(self, workdir: Path) -> bool:
        if not self.running:
            return False
        try:
            with psycopg.connect(
                host=HOST,
                port=self.port,
                user=self.user,
                dbname="postgres",
                connect_timeout=2,
                prepare_threshold=None,
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """``fetch``: unpack Debian's pgbouncer into the virtualenv unless one is found."""
    parser = argparse.ArgumentParser(
        prog="python -m durable.dev.pgbouncer",
        description="Find pgbouncer, or fetch Debian's package into the virtualenv.",
    )
    parser.add_argument("command", choices=["fetch"])
    parser.parse_args(argv)
    found = find_pgbouncer()
    if found is None:
        try:
            found = fetch()
        except ServiceError as exc:
            print(f"pgbouncer: {exc}", file=sys.stderr)
            return 1
    print(f"pgbouncer: {found.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
