"""Latency of an N-step durable workflow against the same plain Celery chain.

``python -m bench.run`` (``make bench``) finds or starts PostgreSQL and Redis, creates a
throwaway database and a Redis key prefix, starts one real ``celery worker`` (``--pool=solo``,
then ``--pool=prefork -c 2``) on the app in :mod:`bench.app`, and for N = 1, 10 and 100 times:

- the plain chain ``chain(add.s(0, 1), add.s(1), ...)`` without a result backend: the last
  link pushes its wall-clock time to a Redis list;
- the same chain with the Redis result backend: the caller's ``.get()`` returns;
- the workflow ``for _ in range(N): x = ctx.step(add, x, 1)``: its last step pushes its time
  to a Redis list exactly like the chain's last link (same signal), and PostgreSQL notifies
  the caller (LISTEN/NOTIFY, from a trigger on the bench database) when the run's result is
  committed.

It then times a workflow of local steps and counts PostgreSQL transactions per durable step.
Everything it started or created is removed at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import psycopg
import redis
from celery import Celery, Task, chain
from rich import box
from rich.console import Console
from rich.table import Table

from bench.app import LOCAL_WORKFLOW, PREFIX_ENV, STEPS_WORKFLOW, build
from durable import Durable
from durable.devservices import Services, create_database, drop_database, ensure_services
from durable.store import engine as store_engine
from durable.store.engine import redact
from durable.store.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
SIZES = ((1, 5), (10, 5), (100, 3))  # (steps per run, measured runs after the warm-up)
LOCAL_STEPS, LOCAL_RUNS = 200, 3
COUNT_STEPS = 100
RUN_TIMEOUT = 60.0  # one run
BUDGET = 170.0  # the whole bench; it gives up (and cleans up) past this
POOLS = {"solo": ["--pool=solo"], "prefork": ["--pool=prefork", "--concurrency=2"]}
POOL_LABELS = {"solo": "solo", "prefork": "prefork -c 2"}
CHANNEL = "bench_finished"

# The bench database only: NOTIFY the caller, with '<id> <status>', when a run ends. The
# trigger fires once per run, in the transaction that commits its end.
TRIGGER = f"""
CREATE FUNCTION bench_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.id || ' ' || NEW.status);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_finished AFTER UPDATE OF status ON durable_workflows
    FOR EACH ROW WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION bench_notify_finished();
"""

# Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
console = Console(width=None if sys.stdout.isatty() else 110)


class BenchError(RuntimeError):
    """The bench could not measure something; the message says what."""


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _die_with_parent() -> None:
    """In the worker, before exec: be killed if the bench dies without cleaning up (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class Worker:
    """One ``celery worker`` process on :mod:`bench.app`, in its own session."""

    def __init__(self, env: dict[str, str], pool: str, logdir: Path) -> None:
        self.env = env
        self.pool = pool
        self.log_path = logdir / f"worker-{pool}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "bench.app", "worker", *POOLS[self.pool]]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        command += [f"--hostname=bench-{self.pool}@%h", "--loglevel=WARNING"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    def check(self) -> None:
        """Raise if the worker has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the {self.pool} worker exited:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its whole process group; safe to call twice."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # prefork children, or a worker that hung
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


@dataclass
class Samples:
    """Total seconds of each run, per variant and N."""

    plain: dict[int, list[float]] = field(default_factory=dict)
    backend: dict[int, list[float]] = field(default_factory=dict)
    durable_last: dict[int, list[float]] = field(default_factory=dict)
    durable_done: dict[int, list[float]] = field(default_factory=dict)
    local: list[float] = field(default_factory=list)

    def add(self, kind: str, n: int, seconds: float) -> None:
        getattr(self, kind).setdefault(n, []).append(seconds)

    def ms_per_step(self, kind: str, n: int) -> float:
        return statistics.median(getattr(self, kind)[n]) / n * 1000


@dataclass
class Counts:
    """PostgreSQL work of one durable run of ``COUNT_STEPS`` steps."""

    transactions: int
    """``xact_commit`` of the bench database over the run."""
    statements: dict[str, int]
    """Statements the worker sent, by label (``runs.finish``: ``_FINISH`` of the store)."""
    seconds: dict[str, float]
    """Their total time in the worker, from sending each one to having its result."""


class Bench:
    """The services, the throwaway database and key prefix, and the caller's side of runs."""

    def __init__(self, services: Services, deadline: float) -> None:
        self.services = services
        self.deadline = deadline
        self.prefix = f"bench{uuid.uuid4().hex[:10]}"
        self.db_name = f"durable_bench_{uuid.uuid4().hex[:10]}"
        self.database_url = ""
        self.redis = redis.Redis.from_url(services.redis_url)
        self.listener: psycopg.Connection[Any] | None = None
        self.worker: Worker | None = None
        self.app: Celery | None = None
        self.durable: Durable | None = None
        self.add: Task | None = None

    # -- set-up and clean-up ---------------------------------------------------------------

    def set_up(self) -> None:
        self.database_url = create_database(self.services.database_url, self.db_name)
        upgrade(self.database_url)
        with psycopg.connect(_psycopg_url(self.database_url), autocommit=True) as conn:
            conn.execute(TRIGGER)
        self.app, self.durable, self.add = build(
            self.database_url, self.services.redis_url, self.prefix
        )
        self.listen()

    def listen(self) -> None:
        self.listener = psycopg.connect(_psycopg_url(self.database_url), autocommit=True)
        self.listener.execute(f"LISTEN {CHANNEL}")

    def clean_up(self) -> None:
        """Stop the worker, drop the database, delete the keys; each step runs whatever fails."""
        steps: list[Callable[[], None]] = [self.stop_worker]
        if self.listener is not None:
            steps.append(self.listener.close)
        steps.append(store_engine.dispose_all)
        if self.database_url:
            steps.append(lambda: drop_database(self.services.database_url, self.db_name))
        steps += [self.delete_keys, self.redis.close]
        for step in steps:
            try:
                step()
            except Exception as exc:
                console.print(f"[yellow]clean-up: {step!r} failed: {exc}[/]")

    def delete_keys(self) -> None:
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            self.redis.delete(*keys[start : start + 500])

    # -- the worker ------------------------------------------------------------------------

    def start_worker(self, pool: str, logdir: Path) -> None:
        env = {
            **os.environ,
            **self.services.environ(),
            "DURABLE_DATABASE_URL": self.database_url,
            PREFIX_ENV: self.prefix,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.worker = Worker(env, pool, logdir)
        self.worker.start()
        # Ready when it has run a task (importing Celery and connecting takes a few seconds).
        key = self.key()
        assert self.add is not None
        self.add.apply_async((0, 1), {"notify": key}, ignore_result=True)
        self.blpop(key, timeout=30.0)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    # -- waiting ---------------------------------------------------------------------------

    def key(self) -> str:
        return f"{self.prefix}:done:{uuid.uuid4().hex[:12]}"

    def _left(self, timeout: float) -> float:
        left = min(timeout, self.deadline - time.monotonic())
        if left <= 0:
            raise BenchError(f"out of time (the bench is bounded to {BUDGET:.0f} s)")
        return left

    def blpop(self, key: str, timeout: float = RUN_TIMEOUT) -> bytes:
        """Wait for a push to ``key``, checking on the worker every second."""
        end = time.monotonic() + self._left(timeout)
        while time.monotonic() < end:
            if self.worker is not None:
                self.worker.check()
            popped = self.redis.blpop([key], timeout=1)
            if popped is not None:
                return bytes(popped[1])
        raise self._stuck(f"nothing was pushed to {key} within {timeout:.0f} s")

    def wait_finished(self, workflow_id: str, timeout: float = RUN_TIMEOUT) -> float:
        """Wait for the NOTIFY of ``workflow_id``'s completion; returns when it arrived (epoch)."""
        assert self.listener is not None
        end = time.monotonic() + self._left(timeout)
        while (left := end - time.monotonic()) > 0:
            if self.worker is not None:
                self.worker.check()
            for note in self.listener.notifies(timeout=min(left, 1.0), stop_after=1):
                wid, _, status = note.payload.partition(" ")
                if wid != workflow_id:
                    continue
                if status != "completed":
                    raise self._stuck(f"workflow {workflow_id} ended {status}")
                return time.time()
        raise self._stuck(f"workflow {workflow_id} did not finish within {timeout:.0f} s")

    def _stuck(self, message: str) -> BenchError:
        if self.worker is not None:
            message += f"; the worker's log ends with:\n{self.worker.log_tail()}"
        return BenchError(message)

    # -- one run of each kind (seconds from the call to the completion signal) ---------------

    def plain(self, n: int) -> float:
        """The chain without a result backend; done when its last link has pushed."""
        assert self.add is not None
        key = self.key()
        links = [self.add.s(0, 1)] + [self.add.s(1) for _ in range(n - 1)]
        links[-1] = links[-1].clone(kwargs={"notify": key})
        links = [link.set(ignore_result=True) for link in links]
        started = time.time()
        chain(*links).apply_async()
        return float(self.blpop(key)) - started

    def backend(self, n: int) -> float:
        """The chain with the Redis result backend; done when ``.get()`` returns."""
        assert self.add is not None
        links = [self.add.s(0, 1)] + [self.add.s(1) for _ in range(n - 1)]
        started = time.time()
        result = chain(*links).apply_async()
        value = result.get(timeout=self._left(RUN_TIMEOUT))
        elapsed = time.time() - started
        if value != n:
            raise BenchError(f"the chain of {n} returned {value!r}")
        return elapsed

    def durable_run(self, n: int, check: bool = True) -> tuple[float, float]:
        """The workflow: (its last step has pushed, its result is committed).

        With ``check`` its result is read back and checked (one more query).
        """
        assert self.durable is not None
        key = self.key()
        started = time.time()
        run = self.durable.start(STEPS_WORKFLOW, n, key)
        finished = self.wait_finished(run.id)
        last_step = float(self.blpop(key))
        if check and (value := run.result(timeout=5)) != n:
            raise BenchError(f"the workflow of {n} steps returned {value!r}")
        return last_step - started, finished - started

    def local_run(self, n: int) -> float:
        """A workflow of ``n`` local steps, until its result is committed."""
        assert self.durable is not None
        started = time.time()
        run = self.durable.start(LOCAL_WORKFLOW, n)
        finished = self.wait_finished(run.id)
        if run.result(timeout=5) != n:
            raise BenchError(f"the workflow of {n} local steps did not return {n}")
        return finished - started

    # -- measuring -------------------------------------------------------------------------

    def measure(self, samples: Samples) -> None:
        """Warm up, then time every variant for every N, interleaved, and the local steps."""
        self.plain(10)
        self.backend(10)
        self.durable_run(10)
        self.local_run(20)
        for n, runs in SIZES:
            for i in range(runs):
                order: list[Callable[[], None]] = [
                    lambda n=n: samples.add("plain", n, self.plain(n)),
                    lambda n=n: samples.add("backend", n, self.backend(n)),
                    lambda n=n: self._add_durable(samples, n),
                ]
                for variant in order[i % 3 :] + order[: i % 3]:  # rotate: no variant always first
                    variant()
        for _ in range(LOCAL_RUNS):
            samples.local.append(self.local_run(LOCAL_STEPS))

    def _add_durable(self, samples: Samples, n: int) -> None:
        last, done = self.durable_run(n)
        samples.add("durable_last", n, last)
        samples.add("durable_done", n, done)

    def count(self) -> Counts:
        """PostgreSQL transactions and statements of one run of ``COUNT_STEPS`` steps.

        ``xact_commit`` of ``pg_stat_database`` is published by a backend when it goes idle,
        at most once a second, or when it exits; so before and after the run every pooled
        connection to the bench database is closed (the worker's by ``bench.flush``) and the
        count read once their backends are gone.
        """
        assert self.listener is not None
        self.listener.execute("SELECT pg_stat_force_next_flush()")
        self._flush_worker()
        before = self._settled_commits()
        self.durable_run(COUNT_STEPS, check=False)
        statements, seconds = self._flush_worker()
        after = self._settled_commits()
        return Counts(after - before, statements, seconds)

    def _flush_worker(self) -> tuple[dict[str, int], dict[str, float]]:
        """The worker's statement counts and times since the last flush; closes connections."""
        assert self.app is not None
        key = self.key()
        self.app.send_task("bench.flush", args=[key], ignore_result=True)
        report = json.loads(self.blpop(key))
        store_engine.dispose_all()
        return report["count"], report["seconds"]

    def _settled_commits(self) -> int:
        """``xact_commit`` of the bench database once only the listener is connected to it."""
        assert self.listener is not None
        mine = self.listener.info.backend_pid
        server = _psycopg_url(self.services.database_url)
        with psycopg.connect(server, autocommit=True) as conn:
            end = time.monotonic() + 10
            while time.monotonic() < end:
                others = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s"
                    " AND backend_type = 'client backend'",
                    (self.db_name, mine),
                ).fetchone()
                if others is not None and others[0] == 0:
                    break
                time.sleep(0.05)
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.db_name,)
            ).fetchone()
        if row is None:
            raise BenchError(f"no statistics for database {self.db_name}")
        return int(row[0])


def report(results: dict[str, Samples], counts: Counts | None) -> None:
    """Print the tables."""
    table = Table(title="Milliseconds per step (median of runs; total / N)", box=box.SIMPLE_HEAD)
    for header in (
        "worker",
        "N",
        "plain\nno backend",
        "plain\n+backend",
        "durable\nlast step",
        "durable\ncommitted",
        "last step\n÷ plain",
        "committed\n÷ +backend",
    ):
        table.add_column(header, justify="right")
    for pool, samples in results.items():
        for n, _ in SIZES:
            if n not in samples.durable_done:
                continue
            plain, backend = samples.ms_per_step("plain", n), samples.ms_per_step("backend", n)
            last = samples.ms_per_step("durable_last", n)
            done = samples.ms_per_step("durable_done", n)
            table.add_row(
                POOL_LABELS[pool],
                str(n),
                f"{plain:.2f}",
                f"{backend:.2f}",
                f"{last:.2f}",
                f"{done:.2f}",
                f"{last / plain:.1f}x",
                f"{done / backend:.1f}x",
            )
    console.print(table)
    console.print(
        "Each run is timed from just before apply_async() / start() until:\n"
        "  plain no backend, durable last step  the last link / step (the same task) pushed"
        " its time to a Redis list\n"
        "  plain +backend                       .get() on the chain returned\n"
        "  durable committed                    the caller got the PostgreSQL NOTIFY of the"
        " commit of the run's result\n"
        "The ratios pair the same signal (last step ran) and the same meaning (result stored)."
    )
    local = Table(
        title=f"Local steps ({LOCAL_STEPS} in one workflow)",
        box=box.SIMPLE_HEAD,
    )
    local.add_column("worker")
    local.add_column("ms/step (median,\nuntil committed)", justify="right")
    for pool, samples in results.items():
        if samples.local:
            ms = statistics.median(samples.local) / LOCAL_STEPS * 1000
            local.add_row(POOL_LABELS[pool], f"{ms:.3f}")
    console.print(local)
    if counts is not None:
        report_counts(counts)


def report_counts(counts: Counts) -> None:
    per_step = counts.transactions / COUNT_STEPS
    console.print(
        f"PostgreSQL per durable step: {per_step:.2f} transactions: xact_commit of the bench"
        f" database before and after\none {COUNT_STEPS}-step run on the solo worker, divided by"
        f" {COUNT_STEPS} (start() and the run's end included). durable runs each\nstatement"
        " in autocommit: one statement is one transaction, one round trip and one WAL flush."
    )
    table = Table(title=f"Worker statements, one {COUNT_STEPS}-step run", box=box.SIMPLE_HEAD)
    table.add_column("statement")
    table.add_column("count", justify="right")
    table.add_column("per step", justify="right")
    table.add_column("ms each\n(worker)", justify="right")
    for label, number in sorted(counts.statements.items(), key=lambda item: -item[1]):
        ms = counts.seconds.get(label, 0.0) / number * 1000
        table.add_row(label, str(number), f"{number / COUNT_STEPS:.2f}", f"{ms:.2f}")
    console.print(table)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Let clean-up finish even if Ctrl-C is pressed again."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pool", action="append", choices=sorted(POOLS), help="worker pool(s) (default: all)"
    )
    args = parser.parse_args(argv)
    pools = args.pool or list(POOLS)
    # Celery lets these override the URLs the bench app passes; the bench picks its own.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ.pop(name, None)
    deadline = time.monotonic() + BUDGET
    console.print(
        f"durable bench: Python {platform.python_version()}, Celery {celery.__version__},"
        f" {os.cpu_count()} CPUs"
    )
    services = ensure_services()
    bench = Bench(services, deadline)
    results: dict[str, Samples] = {}
    counts: Counts | None = None
    try:
        console.print(
            f"PostgreSQL {redact(services.database_url)} (database {bench.db_name}),"
            f" Redis {redact(services.redis_url)} (keys {bench.prefix}*)"
        )
        bench.set_up()
        with tempfile.TemporaryDirectory(prefix="durable-bench-") as logdir:
            for pool in pools:
                console.print(f"[dim]worker --pool={POOL_LABELS[pool]}: measuring…[/]")
                bench.start_worker(pool, Path(logdir))
                try:
                    results[pool] = samples = Samples()
                    bench.measure(samples)
                    if pool == "solo":
                        counts = bench.count()
                finally:
                    bench.stop_worker()
    except BenchError as exc:
        console.print(f"[red]bench failed: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; cleaning up[/]")
        return 130
    finally:
        with sigint_ignored():
            bench.clean_up()
            services.stop()
    report(results, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
