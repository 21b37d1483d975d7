"""The soak's own processes: workers and beats.

Its servers come from :mod:`durable.dev.servers`: a
:class:`~durable.dev.servers.RestartablePostgres`, which comes back with its data after a
fast or an immediate shutdown, and a :class:`~durable.dev.servers.PrivateRedis`, which
restarts empty on the same port, like a Redis without persistence.

Every child runs in its own session and is killed with its whole process group.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from durable.dev import children

ROOT = Path(__file__).resolve().parent.parent


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
