"""Kill a worker in the middle of a card charge and watch every order finish exactly once.

Run it from the repository root with ``python -m workflows.demo`` (``make demo``). It:

1. finds PostgreSQL and Redis (or starts throwaway ones), creates a fresh database
   (``durable_demo``) and applies durable's migrations to it;
2. starts two Celery workers (2 processes each) and the durable beat, as separate processes;
3. starts 20 ``orders.fulfill`` workflows;
4. as soon as a worker is charging a card, kills that worker and all its processes with
   SIGKILL, and starts a replacement;
5. waits for every order to finish and shows, per order, how many times each side effect was
   committed in the shop's tables: exactly once each, the charge that was cut off included.
   The run exits non-zero if any side effect is missing or was committed twice.

Everything it started is stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from durable.devservices import Services, create_database, drop_database, ensure_services
from durable.store.migrate import upgrade

if TYPE_CHECKING:
    from durable import Durable

ROOT = Path(__file__).resolve().parent.parent
ORDERS = 20
KINDS = ("validate", "reserve", "charge", "ship", "email")
EXACTLY_ONCE = "every side effect was committed exactly once"
CHARGE_DELAY = 1.5  # seconds a charge takes, so that one can be caught in flight
FINISH_TIMEOUT = 120.0
CHARGE_TIMEOUT = 60.0

console = Console(highlight=False)


@dataclass
class Worker:
    """A process the demo started, and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path


class Processes:
    """Workers and beat, each the leader of its own process group."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.running: list[Worker] = []

    def start(self, name: str, command: list[str]) -> Worker:
        """Start ``command`` in a new session, its output in ``<logdir>/<name>.log``."""
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_demo,
            )
        worker = Worker(name, process, log)
        self.running.append(worker)
        return worker

    def start_worker(self, number: int) -> Worker:
        """A Celery worker ``demo-<number>`` with two prefork processes."""
        command = [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker"]
        command += ["--pool=prefork", "-c", "2", "-n", f"demo-{number}@%h", "--loglevel=INFO"]
        command += ["-E", "--without-gossip", "--without-mingle"]
        return self.start(f"demo-{number}", command)

    def start_beat(self) -> Worker:
        """``durable beat``: timers, and re-dispatching the steps of dead workers."""
        command = [sys.executable, "-m", "durable.cli", "beat", "--app", "config.celery_app:app"]
        return self.start("beat", command)

    def owner_of(self, pid: int) -> Worker | None:
        """The started process whose group ``pid`` belongs to."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        return next((w for w in self.running if w.process.pid == group), None)

    def kill(self, worker: Worker) -> None:
        """SIGKILL the worker and every process of its group, as an OOM kill or a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        self.running.remove(worker)

    def stop_all(self) -> None:
        """Stop everything started: SIGTERM, then SIGKILL what is still there after 10 s."""
        for worker in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
        self.running.clear()


def _die_with_demo() -> None:
    """In a child before exec: have the kernel send it SIGTERM if the demo dies (Linux)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll ``check`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def prepare_database(services: Services, name: str) -> str:
    """A fresh database ``name`` on the services' server, migrated; returns its URL."""
    drop_database(services.database_url, name)
    url = create_database(services.database_url, name)
    upgrade(url)
    return url


def demo_environ(services: Services, database_url: str, prefix: str) -> dict[str, str]:
    """What the demo's processes (and the demo itself) are configured by."""
    env = {k: v for k, v in os.environ.items() if k != "SHOP_DATABASE_URL"}
    env.update(
        DURABLE_DATABASE_URL=database_url,
        DURABLE_REDIS_URL=services.redis_url,
        DURABLE_KEY_PREFIX=prefix,
        CELERY_BROKER_URL=services.redis_url,
        CELERY_KEY_PREFIX=f"{prefix}:",
        SHOP_CHARGE_DELAY=str(CHARGE_DELAY),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete the demo's Redis keys (queues and timer index), all under ``prefix``."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def place_orders() -> list[str]:
    """Put the demo's orders in the shop's table; returns their ids."""
    from tasks import store

    ids = []
    for n in range(1, ORDERS + 1):
        order_id = f"o-{n:03d}"
        items = [
            {"sku": f"SKU-{(n * 7) % 13:03d}", "qty": 1 + n % 3, "price_cents": 500 + 137 * n},
            {"sku": f"SKU-{(n * 5) % 11 + 20:03d}", "qty": 1, "price_cents": 1999},
        ]
        store.add_order(order_id, f"customer{n}@example.com", items, card="4242424242424242")
        ids.append(order_id)
    return ids


def steps_in_flight(durable: Durable, processes: Processes) -> list[tuple[str, str, Worker]]:
    """Running steps as (workflow id, step name, worker running it)."""
    query = text(
        "SELECT workflow_id, name, lease_owner FROM durable_steps "
        "WHERE status = 'started' AND lease_owner IS NOT NULL ORDER BY workflow_id"
    )
    with durable.connect() as conn:
        rows = list(conn.execute(query))
    found = []
    for row in rows:
        pid = int(row.lease_owner.rsplit(":", 2)[1])
        worker = processes.owner_of(pid)
        if worker is not None:
            found.append((row.workflow_id, row.name, worker))
    return found


def find_charge_in_flight(durable: Durable, processes: Processes) -> Worker | None:
    """A worker that is running a charge_card step."""
    for _, name, worker in steps_in_flight(durable, processes):
        if name.endswith("charge_card"):
            return worker
    return None


def finished_runs(durable: Durable, workflow_ids: list[str]) -> dict[str, Any]:
    """Rows of the runs that have ended, by id."""
    query = text(
        "SELECT id, status, result, error FROM durable_workflows "
        "WHERE id = ANY(:ids) AND status <> 'running'"
    )
    with durable.connect() as conn:
        return {row.id: row for row in conn.execute(query, {"ids": workflow_ids})}


def report(runs: dict[str, Any], orders: dict[str, str], cut_off: set[str]) -> bool:
    """Print a table of the orders' outcomes and effect counts; True if all are exactly once."""
    from tasks import store

    effects, calls = store.effect_counts(), store.call_counts()
    table = Table(title="Committed side effects per order")
    for column in ("order", "outcome", *KINDS, "bodies run twice"):
        table.add_column(column, justify="left" if column == "order" else "center")
    all_good = True
    for order_id, workflow_id in orders.items():
        outcome = _outcome(runs.get(workflow_id))
        counts = [effects.get(order_id, {}).get(kind, 0) for kind in KINDS]
        good = outcome == "fulfilled" and all(c == 1 for c in counts)
        all_good &= good
        repeated = [f"{k} x{n}" for k, n in calls.get(order_id, {}).items() if n > 1]
        table.add_row(
            f"{order_id} *" if workflow_id in cut_off else order_id,
            f"[green]{outcome}[/]" if good else f"[bold red]{outcome}[/]",
            *(f"[green]{c}[/]" if c == 1 else f"[bold red]{c}[/]" for c in counts),
            ", ".join(repeated) or "-",
        )
    console.print(table)
    console.print(
        "* a step of this order was running on the killed worker. Its body ran again on "
        "another worker with the same idempotency key, so its effect was not committed twice.",
        soft_wrap=True,
    )
    return all_good


def _outcome(run: Any) -> str:
    """``fulfilled`` or ``failed`` from a completed run's result, else the run's status."""
    if run is None:
        return "unfinished"
    if run.status == "completed":
        return str((run.result or {}).get("status"))
    return str(run.status)


def print_next_steps(env: dict[str, str], services: Services, example_id: str) -> None:
    """How to look at the same runs with Flower and the durable CLI."""
    names = ("DURABLE_DATABASE_URL", "DURABLE_REDIS_URL", "CELERY_BROKER_URL", "CELERY_KEY_PREFIX")
    exports = " ".join(f"{name}={env[name]}" for name in names)
    console.print("\nTo watch the same steps as Celery tasks, run Flower while the demo runs:")
    console.print(f"  export {exports}", soft_wrap=True)
    console.print("  celery -A config.celery_app flower")
    console.print("To see one order's steps, attempts and results, with the same environment:")
    console.print(f"  durable show {example_id}", soft_wrap=True)
    if services.started_any:
        console.print(
            "(PostgreSQL and Redis were throwaway servers, stopped now; to keep them, run "
            "`python -m durable.devservices` in another shell and export what it prints.)",
            soft_wrap=True,
        )


def run_demo(services: Services, database_name: str, logdir: Path) -> bool:
    """The demo proper; True when every side effect was committed exactly once."""
    started = time.monotonic()
    prefix = database_name
    console.print(f"Database [bold]{database_name}[/]: creating it and applying migrations")
    database_url = prepare_database(services, database_name)
    env = demo_environ(services, database_url, prefix)
    os.environ.update(env)
    delete_keys(services.redis_url, prefix)

    import workflows.orders  # noqa: F401  (registers orders.fulfill)
    from config.celery_app import durable

    order_ids = place_orders()
    processes = Processes(env, logdir)
    with _stopping(processes, services.redis_url, prefix):
        return _run(durable, processes, order_ids, env, services, started)


@contextlib.contextmanager
def _stopping(processes: Processes, redis_url: str, prefix: str) -> Iterator[None]:
    try:
        yield
    finally:
        processes.stop_all()
        delete_keys(redis_url, prefix)


def _run(
    durable: Durable,
    processes: Processes,
    order_ids: list[str],
    env: dict[str, str],
    services: Services,
    started: float,
) -> bool:
    for number in (1, 2):
        processes.start_worker(number)
    processes.start_beat()
    console.print("Started workers demo-1 and demo-2 (2 processes each) and the durable beat")

    orders = {order_id: f"order-{order_id}" for order_id in order_ids}
    for order_id, workflow_id in orders.items():
        durable.start("orders.fulfill", order_id, workflow_id=workflow_id)
    console.print(f"Started {len(orders)} orders.fulfill workflows")

    victim = wait_for(
        "a charge_card step to start",
        lambda: find_charge_in_flight(durable, processes),
        CHARGE_TIMEOUT,
    )
    cut_off = [(wid, name) for wid, name, w in steps_in_flight(durable, processes) if w is victim]
    processes.kill(victim)
    console.print(
        f"[bold red]Killed[/] worker {victim.name} and its pool processes with SIGKILL while "
        f"it was running: {', '.join(f'{name} of {wid}' for wid, name in cut_off)}"
    )
    processes.start_worker(3)
    console.print("Started replacement worker demo-3; waiting for every order to finish")

    ids = list(orders.values())
    wait_for(
        "every order to finish",
        lambda: len(finished_runs(durable, ids)) == len(ids),
        FINISH_TIMEOUT,
    )
    good = report(finished_runs(durable, ids), orders, {wid for wid, _ in cut_off})
    elapsed = time.monotonic() - started
    if good:
        console.print(f"[bold green]OK[/]: {EXACTLY_ONCE} ({elapsed:.1f} s)", soft_wrap=True)
    else:
        console.print(
            "[bold red]FAILED[/]: some side effect was missing or committed more than once "
            f"({elapsed:.1f} s)",
            soft_wrap=True,
        )
    print_next_steps(env, services, cut_off[0][0] if cut_off else ids[0])
    return good


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0: every side effect exactly once)."""
    parser = argparse.ArgumentParser(prog="python -m workflows.demo", description=__doc__)
    parser.add_argument(
        "--database",
        default="durable_demo",
        help="name of the database to (re)create for the demo, also its Redis key prefix",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logdir = Path(tempfile.mkdtemp(prefix="durable-demo-"))
    services = ensure_services()
    good = False
    try:
        good = run_demo(services, args.database, logdir)
    except KeyboardInterrupt:
        console.print("Interrupted; stopping everything the demo started")
        return 130
    finally:
        services.stop()
        if good:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            console.print(f"Logs of the workers and the beat are in {logdir}", soft_wrap=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
