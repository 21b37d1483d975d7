"""The soak's own servers and processes: PostgreSQL and Redis it can restart, workers, beats.

:class:`durable.dev.servers.PrivatePostgres` starts a fresh data directory on every
``start()``; a soak needs PostgreSQL to come back with its data, so
:class:`RestartablePostgres` stops the server process (a fast or an immediate shutdown) and
starts it again on the same data directory and port. :class:`durable.dev.servers.PrivateRedis`
restarts empty on the same port by itself, like a Redis without persistence.

Every child runs in its own session and is killed with its whole process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from durable.dev import children
from durable.dev.servers import PrivatePostgres, ServiceError

ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In a child, before exec: be killed if the soak dies without cleaning up (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class RestartablePostgres(PrivatePostgres):
    """A throwaway PostgreSQL that can be restarted with its data (see the module docstring)."""

    def restart(self, immediate: bool, down: float = 1.0) -> None:
        """Stop the server (immediate: like a crash, recovery at start), wait, start it again."""
        process = self._process
        workdir = self._workdir
        if process is None or workdir is None:
            raise ServiceError("postgres is not running")
        process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        time.sleep(down)
        data = workdir / "data"
        (data / "postmaster.pid").unlink(missing_ok=True)  # left by an immediate shutdown
        owner = data.stat()
        as_other = owner.st_uid != os.geteuid()  # started by root: runs as the data's owner
        with (workdir / "server.log").open("ab") as log:
            self._process = subprocess.Popen(
                process.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=_die_with_parent,
                user=owner.st_uid if as_other else None,
                group=owner.st_gid if as_other else None,
                extra_groups=[] if as_other else None,
            )
        deadline = time.monotonic() + 60
        while not self._answers(workdir):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError("postgres did not come back after its restart")
            time.sleep(0.1)


class Child(children.Child):
    """A worker or beat process of the soak, from the repository's root; counts its kills."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logdir: Path) -> None:
        super().__init__(name, command, env, logdir, cwd=ROOT)
        self.kills = 0

    def sigkill(self) -> None:
        """A fault: kill it now (counted)."""
        self.kills += 1
        self.kill()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        return super().log_tail(lines)


WORKER_POOLS = (
    ["--pool=prefork", "--concurrency=2"],
    ["--pool=prefork", "--concurrency=2"],
    ["--pool=threads", "--concurrency=4"],
)


def workers(env: dict[str, str], logdir: Path) -> list[Child]:
    """Real ``celery worker`` processes of :mod:`chaos.app`, of different pools."""
    found = []
    for n, pool in enumerate(WORKER_POOLS, 1):
        command = [sys.executable, "-m", "celery", "-A", "chaos.app", "worker", *pool]
        command += [f"--hostname=chaos{n}@%h", "--without-gossip", "--without-mingle"]
        command += ["--loglevel=WARNING"]
        found.append(Child(f"worker{n}", command, env, logdir))
    return found


def beats(env: dict[str, str], logdir: Path, count: int = 2) -> list[Child]:
    """Real ``durable beat`` processes of :mod:`chaos.app`."""
    command = [sys.executable, "-m", "durable.cli", "beat", "--app", "chaos.app:durable"]
    command += ["--log-level", "warning"]
    return [Child(f"beat{n}", command, env, logdir) for n in range(1, count + 1)]


def pick_alive(children: list[Child], rng: random.Random) -> Child | None:
    """A random running child, keeping at least one of them running."""
    alive = [c for c in children if c.alive]
    return rng.choice(alive) if len(alive) > 1 else None
