"""What every part of the bench shares: the console, errors, child processes, small helpers."""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console

from durable.dev import children

ROOT = Path(__file__).resolve().parent.parent

# Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
console = Console(width=None if sys.stdout.isatty() else 110)

POOLS = {"solo": ["--pool=solo"], "prefork": ["--pool=prefork", "--concurrency=2"]}
POOL_LABELS = {"solo": "solo", "prefork": "prefork -c 2"}


class BenchError(RuntimeError):
    """The bench could not measure something; the message says what."""


def psycopg_url(url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as libpq reads it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (``fraction`` 0.99 for p99)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median, or NaN when nothing was measured."""
    return statistics.median(values) if values else math.nan


class Child(children.Child):
    """A process the bench runs (a worker, a beat), from the repository's root."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logdir: Path) -> None:
        super().__init__(name, command, env, logdir, cwd=ROOT)

    def check(self) -> None:
        """Raise if the process has exited."""
        if self.exited_by_itself():
            raise BenchError(f"the {self.name} exited:\n{self.log_tail()}")


def worker(pool: str, env: dict[str, str], logdir: Path) -> Child:
    """A ``celery worker`` of :mod:`bench.app` with the given pool."""
    command = [sys.executable, "-m", "celery", "-A", "bench.app", "worker", *POOLS[pool]]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    command += [f"--hostname=bench-{pool}@%h", "--loglevel=WARNING"]
    return Child(f"worker-{pool}", command, env, logdir)


def beat(env: dict[str, str], logdir: Path) -> Child:
    """A real ``durable beat`` process on :mod:`bench.app`."""
    command = [sys.executable, "-m", "durable.cli", "beat", "--app", "bench.app:durable"]
    return Child("beat", [*command, "--log-level", "warning"], env, logdir)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Let clean-up finish even if Ctrl-C is pressed again."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
