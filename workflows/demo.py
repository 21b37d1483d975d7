"""A tour of durable: 20 orders through a killed worker and a Redis restart, exactly once.

Run it from the repository root with ``python -m workflows.demo`` (``make demo``). In about
a minute it:

1. finds PostgreSQL (or starts a throwaway one), creates a fresh database (``durable_demo``)
   and applies durable's migrations; starts a Redis of its own, so that it can restart it;
2. starts two Celery workers (2 processes each) and ``durable beat``, as separate processes;
3. places 20 orders, each an ``orders.fulfill`` workflow (:mod:`workflows.orders`): most
   are delivered, some returned; one's card is declined and replaced, one's is declined and
   never replaced; two are fraud; two meet a payment provider error that is retried;
4. **chaos**: SIGKILLs a worker in the middle of a card charge (and starts a replacement),
   then restarts Redis, which loses every queued message and the timer index;
5. plays the warehouse's, the clerk's and the driver's apps, and the customers: their
   signals take each order to delivery, a new card, or a return;
6. skips a day, then 30 days, on durable's clock (``durable.testing``, as the tests do): the
   unpaid order is cancelled and the returns windows close;
7. shows, per order, how many times each side effect was committed in the shop's tables
   against what its story calls for. It exits non-zero if anything is missing or was done
   twice.

All along a live table shows the orders by status, the ``status`` event each one publishes.
Everything it started is stopped at the end, also on Ctrl-C or an error; with ``--keep``
the workers, the beat and Redis run on until Ctrl-C, for Flower.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import text

from durable.dev.servers import PrivateRedis
from durable.dev.services import (
    Services,
    create_database,
    drop_database,
    ensure_services,
)
from durable.store.migrate import upgrade

if TYPE_CHECKING:
    from durable import Durable
    from durable.testing import TestEnv

ROOT = Path(__file__).resolve().parent.parent
EXACTLY_ONCE = "every side effect was committed exactly once"
CHARGE_DELAY = 1.5  # seconds a charge takes, so that one can be caught in flight
TOUR_TIMEOUT = 150.0  # the tour gives up (and fails) after this long
REDIS_DOWN = 1.0  # seconds Redis stays down

# Test cards of the simulated payment provider (tasks/payments.py).
GOOD = "4242424242424242"
DECLINED = "4000000000009995"  # insufficient funds
FRAUDULENT = "4100000000000019"  # declined by the issuer as fraudulent
FLAKY = "4000000000000119"  # a provider error on the first attempt

KINDS = ("validate", "fraud_check", "reserve", "charge", "fulfilment", "refund", "release")
HEADINGS = ("valid", "fraud", "stock", "charge", "wareh", "refund", "release", "mails")
SCREENED = {"validate": 1, "fraud_check": 1, "reserve": 1}
DELIVERED = {**SCREENED, "charge": 1, "fulfilment": 1, "email": 3}
REFUSED = {**SCREENED, "release": 1, "email": 1}

console = Console(highlight=False)


@dataclass(frozen=True)
class Story:
    """What happens to an order, and what it must leave in the shop's tables."""

    name: str
    outcome: str
    effects: dict[str, int]
    card: str = GOOD
    fraudster: bool = False
    new_card: bool = False
    returns: bool = False


STORIES = {
    # delivered, kept: closes when its 30 days are over
    "d": Story("delivered", "closed", DELIVERED),
    # the payment provider fails once; the retry policy charges it on the second attempt
    "p": Story("provider", "closed", DELIVERED, card=FLAKY),
    # delivered, then returned within 30 days: refunded
    "r": Story("returned", "returned", {**DELIVERED, "refund": 1, "email": 4}, returns=True),
    # the card is declined; the customer sends another one, which is charged
    "n": Story("new card", "closed", {**DELIVERED, "email": 4}, card=DECLINED, new_card=True),
    # flagged by the fraud check (a throwaway address, a cart of TVs): cancelled at once
    "f": Story("fraud", "cancelled", REFUSED, fraudster=True),
    # the card issuer declines it as fraudulent: cancelled at once
    "i": Story("issuer", "cancelled", REFUSED, card=FRAUDULENT),
    # the card is declined and the customer sends no other within 24 hours: cancelled
    "u": Story("unpaid", "cancelled", {**SCREENED, "release": 1, "email": 2}, card=DECLINED),
}
PLAN = "ddrdnddfdprdiduddrpd"
"""The story of each order, o-001 to o-020, by its key in :data:`STORIES`."""


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
        self.started = 0

    def start(self, name: str, command: list[str]) -> Worker:
        """Start ``command`` in a new session, its output in ``<logdir>/<name>.log``."""
        log_path = self.logdir / f"{name}.log"
        with log_path.open("ab") as out:
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
        worker = Worker(name, process, log_path)
        self.running.append(worker)
        return worker

    def start_worker(self) -> Worker:
        """A Celery worker ``demo-<n>`` with two prefork processes and events on (Flower)."""
        self.started += 1
        name = f"demo-{self.started}"
        command = [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker"]
        command += ["--pool=prefork", "-c", "2", "-n", f"{name}@%h", "--loglevel=INFO"]
        command += ["-E", "--without-gossip", "--without-mingle"]
        return self.start(name, command)

    def start_beat(self) -> Worker:
        """``durable beat``: timers, and re-dispatching the steps of dead workers."""
        command = [sys.executable, "-m", "durable.cli", "beat", "--app", "config.celery_app:app"]
        return self.start("beat", command)

    def replace_exited(self) -> list[tuple[Worker, Worker]]:
        """Start a new process for each one that exited; returns (exited, replacement) pairs.

        The demo plays the supervisor (systemd, Kubernetes) a deployment runs its workers
        under: Celery's worker exits when the broker connection is lost while it holds an
        unacknowledged message (a kombu error), as it may during the Redis restart.
        """
        replaced = []
        for worker in [w for w in self.running if w.process.poll() is not None]:
            self.running.remove(worker)
            new = self.start_beat() if worker.name == "beat" else self.start_worker()
            replaced.append((worker, new))
        return replaced

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


def prepare_database(services: Services, name: str) -> str:
    """A fresh database ``name`` on the services' server, migrated; returns its URL."""
    drop_database(services.database_url, name)
    url = create_database(services.database_url, name)
    upgrade(url)
    return url


def demo_environ(database_url: str, redis_url: str) -> dict[str, str]:
    """What the demo's processes (and the demo itself) are configured by."""
    unset = {"SHOP_DATABASE_URL", "CELERY_KEY_PREFIX", "CELERY_DEFAULT_QUEUE"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(
        DURABLE_DATABASE_URL=database_url,
        DURABLE_REDIS_URL=redis_url,
        DURABLE_KEY_PREFIX="durable",
        CELERY_BROKER_URL=redis_url,
        SHOP_CHARGE_DELAY=str(CHARGE_DELAY),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env


def place_orders() -> dict[str, Story]:
    """Put the demo's orders in the shop's table; returns their stories by order id."""
    from tasks import store

    orders = {}
    for n, key in enumerate(PLAN, start=1):
        story, order_id = STORIES[key], f"o-{n:03d}"
        items = [
            {"sku": f"SKU-{(n * 7) % 13:03d}", "qty": 1 + n % 3, "price_cents": 500 + 137 * n},
            {"sku": f"SKU-{(n * 5) % 11 + 20:03d}", "qty": 1, "price_cents": 1999},
        ]
        email = f"customer{n}@example.com"
        if story.fraudster:  # a throwaway address and a cart full of televisions
            email = f"deals{n}@mailinator.com"
            items = [{"sku": "TV-55", "qty": 8, "price_cents": 30000}]
        store.add_order(order_id, email, items, card=story.card)
        orders[order_id] = story
    return orders


def workflow_id(order_id: str) -> str:
    """The id of the order's run: starting it twice would find the same run."""
    return f"order-{order_id}"


@dataclass(frozen=True)
class InFlight:
    """A step running on one of the demo's workers."""

    workflow_id: str
    seq: int
    name: str
    worker: Worker

    def __str__(self) -> str:
        return f"{self.name.rsplit('.', 1)[-1]} of {self.workflow_id}"


@dataclass
class Tour:
    """The tour's state: what was done to whom, and when."""

    durable: Durable
    processes: Processes
    redis_server: PrivateRedis
    clock: TestEnv
    orders: dict[str, Story]
    started: float = field(default_factory=time.monotonic)
    statuses: dict[str, str] = field(default_factory=dict)
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    answered: set[tuple[str, str]] = field(default_factory=set)
    cut_off: list[InFlight] = field(default_factory=list)
    recovered: set[tuple[str, int]] = field(default_factory=set)
    index_rebuilt: bool = False
    killed_at: float | None = None
    redis_restarted: bool = False
    skipped_days: int = 0

    def say(self, message: str) -> None:
        """Print a line of the tour, above the live table."""
        console.print(f"[dim]{self.elapsed():5.1f} s[/]  {message}", soft_wrap=True)

    def elapsed(self) -> float:
        """Seconds since the orders were placed."""
        return time.monotonic() - self.started

    def read_statuses(self) -> None:
        """Each order's ``status`` event, as its customer's order page would read it."""
        now = time.monotonic()
        for order_id in self.orders:
            status = self.durable.get_event(workflow_id(order_id), "status") or "placed"
            self.statuses[order_id] = status
            self.seen.setdefault((order_id, status), now)


def still_started(durable: Durable, step: InFlight) -> bool:
    """Whether ``step`` is still started (its worker died holding it), not settled."""
    query = text("SELECT status FROM durable_steps WHERE workflow_id = :wid AND seq = :seq")
    with durable.connect() as conn:
        row = conn.execute(query, {"wid": step.workflow_id, "seq": step.seq}).first()
    return row is not None and row.status == "started"


def steps_in_flight(durable: Durable, processes: Processes) -> list[InFlight]:
    """Steps running now, with the worker running each."""
    query = text(
        "SELECT workflow_id, seq, name, lease_owner FROM durable_steps "
        "WHERE status = 'started' AND lease_owner IS NOT NULL ORDER BY workflow_id"
    )
    with durable.connect() as conn:
        rows = list(conn.execute(query))
    found = []
    for row in rows:
        pid = int(row.lease_owner.rsplit(":", 2)[1])
        worker = processes.owner_of(pid)
        if worker is not None:
            found.append(InFlight(row.workflow_id, row.seq, row.name, worker))
    return found


def chaos(tour: Tour) -> None:
    """Kill a worker mid-charge; once an order is delivered, restart Redis."""
    if tour.killed_at is None:
        in_flight = steps_in_flight(tour.durable, tour.processes)
        victim = next((s.worker for s in in_flight if s.name.endswith("charge_card")), None)
        if victim is None:
            return
        running = [step for step in in_flight if step.worker is victim]
        tour.processes.kill(victim)
        # A step may have settled between the look and the kill: only those still started
        # under the dead worker's lease were cut off.
        tour.cut_off = [step for step in running if still_started(tour.durable, step)]
        replacement = tour.processes.start_worker()
        if not tour.cut_off:  # try again on the next charge
            tour.say(
                f"Killed worker {victim.name}, whose steps had just settled; started "
                f"{replacement.name} in its place"
            )
            return
        tour.killed_at = time.monotonic()
        steps = ", ".join(map(str, tour.cut_off))
        tour.say(f"[bold red]Killed worker[/] {victim.name} (SIGKILL) while it ran {steps}")
        tour.say(f"Started worker {replacement.name} in its place")
    elif not tour.redis_restarted and "delivered" in tour.statuses.values():
        # Now durable timers are pending in the index: returns windows, a payment window.
        tour.redis_server.stop()
        time.sleep(REDIS_DOWN)
        tour.redis_server.start()
        tour.redis_restarted = True
        tour.say(
            "[bold red]Restarted Redis[/]: every queued message and the timer index are gone; "
            "durable beat rebuilds them from PostgreSQL"
        )


def supervise(tour: Tour) -> None:
    """Restart any process of the demo's that exited, as a supervisor would."""
    for exited, new in tour.processes.replace_exited():
        tour.say(
            f"{exited.name} exited (code {exited.process.returncode}); started {new.name} in its "
            "place, as a supervisor (systemd, Kubernetes) would"
        )


def watch_recovery(tour: Tour) -> None:
    """Tell when the cut-off steps have run again, and when the timer index is back."""
    if tour.killed_at is None:
        return
    query = text(
        "SELECT status, attempts FROM durable_steps WHERE workflow_id = :wid AND seq = :seq"
    )
    for step in tour.cut_off:
        if (step.workflow_id, step.seq) in tour.recovered:
            continue
        with tour.durable.connect() as conn:
            row = conn.execute(query, {"wid": step.workflow_id, "seq": step.seq}).first()
        if row is not None and row.status == "completed":
            tour.recovered.add((step.workflow_id, step.seq))
            after = time.monotonic() - tour.killed_at
            tour.say(
                f"Recovered: {step} ran again (attempt {row.attempts}, same idempotency key "
                f"{step.workflow_id}:{step.seq}) {after:.0f} s after the kill"
            )
    if tour.redis_restarted and not tour.index_rebuilt:
        with contextlib.suppress(redis.RedisError):
            if tour.durable.timer_index.is_built():
                tour.index_rebuilt = True
                size = tour.durable.timer_index.size()
                tour.say(f"durable beat rebuilt the timer index from PostgreSQL ({size} timers)")


def reply(tour: Tour, order_id: str, status: str) -> tuple[str, dict[str, Any]] | None:
    """The signal the app in charge sends for an order in ``status``, if any."""
    story, n = tour.orders[order_id], int(order_id[2:])
    if status == "awaiting_fulfilment":
        return "fulfilled", {"warehouse": "north", "parcels": 1}
    if status == "awaiting_shipment":
        return "shipped", {"carrier": "ups", "tracking": f"1Z{n:08d}"}
    if status == "shipped":
        return "delivered", {"signed_by": f"customer {n}"}
    if status == "awaiting_payment_method" and story.new_card:
        return "payment_method", {"card": GOOD}
    if status == "delivered" and story.returns:
        return "return", {"reason": "does not fit"}
    return None


def play_apps(tour: Tour) -> None:
    """The warehouse, clerk, driver and customers answer, each a moment after its turn."""
    now = time.monotonic()
    for order_id, status in tour.statuses.items():
        answer = reply(tour, order_id, status)
        if answer is None or (order_id, answer[0]) in tour.answered:
            continue
        pause = 0.8 + (int(order_id[2:]) % 4) * 0.4  # apps take a moment, not all the same
        if now - tour.seen[(order_id, status)] < pause:
            continue
        name, payload = answer
        tour.durable.signal(workflow_id(order_id), name, payload)
        tour.answered.add((order_id, name))
        if name == "payment_method":
            tour.say(f"Customer of {order_id} sent another card (signal payment_method)")
        elif name == "return":
            tour.say(f"Customer of {order_id} sent the order back (signal return)")


def resting(tour: Tour) -> bool:
    """Whether every order has got as far as it can without time passing."""
    for order_id, story in tour.orders.items():
        if story.outcome == "closed":
            expected = "delivered"  # until its 30 days are over
        elif story.name == "unpaid" and tour.skipped_days == 0:
            expected = "awaiting_payment_method"  # until its 24 hours are over
        else:
            expected = story.outcome
        if tour.statuses[order_id] != expected:
            return False
    return True


def skip_time(tour: Tour) -> None:
    """Once every order rests, move durable's clock: one day, then 30 more."""
    if tour.redis_restarted and tour.skipped_days < 31 and resting(tour):
        days = 1 if tour.skipped_days == 0 else 30
        fired = tour.clock.advance(timedelta(days=days))
        tour.skipped_days += days
        tour.say(
            f"[bold]Skipped {days} day{'s' if days > 1 else ''}[/] on durable's clock: "
            f"{fired} timer{'s' if fired != 1 else ''} fired"
        )


def finished(tour: Tour) -> bool:
    """Whether every run has ended."""
    query = text(
        "SELECT count(*) FROM durable_workflows WHERE id = ANY(:ids) AND status = 'running'"
    )
    ids = [workflow_id(order_id) for order_id in tour.orders]
    with tour.durable.connect() as conn:
        return int(conn.execute(query, {"ids": ids}).scalar_one()) == 0


def live_view(tour: Tour) -> Table:
    """Orders by status."""
    from workflows.orders import STATUSES

    table = Table(title=f"Orders by status, {tour.elapsed():.0f} s in", title_justify="left")
    table.add_column("status")
    table.add_column("#", justify="right")
    table.add_column("orders")
    for status in ("placed", *STATUSES):
        ids = [o for o, s in tour.statuses.items() if s == status]
        if ids:
            table.add_row(status, str(len(ids)), " ".join(o[2:] for o in ids))
    return table


def run_tour(tour: Tour) -> None:
    """Start the orders and run the chaos, the apps and the clock until every order ends."""
    for order_id in tour.orders:
        tour.durable.start("orders.fulfill", order_id, workflow_id=workflow_id(order_id))
    tour.say(f"Placed {len(tour.orders)} orders, each an orders.fulfill workflow")
    tour.say(
        "Playing the warehouse's, the clerk's and the driver's apps: each sends its signal "
        "(fulfilled, shipped, delivered) a moment after an order waits for it"
    )
    deadline = tour.started + TOUR_TIMEOUT
    with Live(live_view(tour), console=console, refresh_per_second=4) as live:
        while True:
            tour.read_statuses()
            if tour.skipped_days > 1 and finished(tour):
                break
            if time.monotonic() > deadline:
                tour.say(f"[bold red]Gave up[/]: not every order ended within {TOUR_TIMEOUT:.0f} s")
                break
            watch_recovery(tour)
            chaos(tour)
            supervise(tour)
            play_apps(tour)
            skip_time(tour)
            live.update(live_view(tour))
            time.sleep(0.2)
        live.update(live_view(tour))
    console.print()


def report(tour: Tour) -> bool:
    """Print each order's committed effects against its story; True if all are exactly right."""
    from tasks import store

    effects, calls = store.effect_counts(), store.call_counts()
    outcomes = final_outcomes(tour)
    table = Table(
        title="Side effects committed per order",
        box=None,
        pad_edge=False,
        collapse_padding=True,
    )
    for heading in ("order", "story", *HEADINGS, "extra runs"):
        counts = heading in HEADINGS
        table.add_column(heading, justify="center" if counts else "left", header_style="bold")
    cut_off = {step.workflow_id for step in tour.cut_off}
    all_good = True
    for order_id, story in tour.orders.items():
        done, ran = effects.get(order_id, {}), calls.get(order_id, {})
        cells = [_count(done.get(k, 0), story.effects.get(k, 0)) for k in (*KINDS, "email")]
        outcome = outcomes.get(order_id, "unfinished")
        good = outcome == story.outcome and all(ok for _, ok in cells)
        all_good &= good
        extra = [f"{k} +{n - done.get(k, 0)}" for k, n in sorted(ran.items()) if n > done.get(k, 0)]
        table.add_row(
            f"{order_id[2:]}{' *' if workflow_id(order_id) in cut_off else ''}",
            f"[green]{story.name}[/]" if good else f"[bold red]{story.name}: {outcome}[/]",
            *(cell for cell, _ in cells),
            ", ".join(extra) or "-",
        )
    console.print(table)
    console.print(
        "Counts are rows in the shop's tables, each written under its step's idempotency key. "
        "*: a step of this order was running on the killed worker and ran again elsewhere "
        "with the same key. Extra runs: a task body that ran more often than it committed "
        "(that re-run, a retry after a provider error, a declined card, which commits nothing).",
        soft_wrap=True,
    )
    return all_good


def _count(done: int, expected: int) -> tuple[str, bool]:
    if done == expected:
        return (f"[green]{done}[/]" if done else "[dim]-[/]"), True
    return f"[bold red]{done} ({expected})[/]", False


def final_outcomes(tour: Tour) -> dict[str, str]:
    """Each ended order's final status, ``failed`` for a run that failed."""
    query = text("SELECT id, status, result FROM durable_workflows WHERE id = ANY(:ids)")
    ids = {workflow_id(order_id): order_id for order_id in tour.orders}
    with tour.durable.connect() as conn:
        rows = list(conn.execute(query, {"ids": list(ids)}))
    outcomes = {}
    for row in rows:
        result = row.result if isinstance(row.result, dict) else {}
        status = "cancelled" if row.status == "cancelled" else result.get("status", row.status)
        outcomes[ids[row.id]] = str(status)
    return outcomes


def print_next_steps(env: dict[str, str], services: Services, tour: Tour, keep: bool) -> None:
    """How to look at the same runs with the durable CLI and Flower."""
    charges = [s.workflow_id for s in tour.cut_off if s.name.endswith("charge_card")]
    example = charges[0] if charges else workflow_id(next(iter(tour.orders)))
    console.print("\nEvery step of every order is in PostgreSQL. With the durable CLI:")
    console.print(f"  export DURABLE_DATABASE_URL={env['DURABLE_DATABASE_URL']}", soft_wrap=True)
    console.print("  durable list --name orders.fulfill")
    console.print(f"  durable show {example}    # the order whose charge was cut off")
    when = "now, in another shell" if keep else "while the workers run (add --keep)"
    console.print(f"And as Celery tasks in Flower, {when}:")
    console.print(f"  export CELERY_BROKER_URL={env['CELERY_BROKER_URL']}", soft_wrap=True)
    console.print("  celery -A config.celery_app flower")
    if services.started_any:
        console.print(
            "(PostgreSQL is a throwaway server, deleted when the demo ends; run "
            "`python -m durable.dev.services` in another shell and export what it prints to "
            "keep one.)",
            soft_wrap=True,
        )


@contextlib.contextmanager
def _servers() -> Iterator[tuple[PrivateRedis, Services]]:
    """A Redis of the demo's own, to restart it, and PostgreSQL, found or throwaway."""
    redis_server = PrivateRedis().start()
    try:
        os.environ["DURABLE_REDIS_URL"] = redis_server.url  # ensure_services: only PostgreSQL
        services = ensure_services()
        try:
            yield redis_server, services
        finally:
            services.stop()
    finally:
        redis_server.stop()


def run_demo(database_name: str, logdir: Path, keep: bool) -> bool:
    """The demo proper; True when every side effect was committed exactly as expected."""
    started = time.monotonic()
    with _servers() as (redis_server, services):
        console.print(f"Database [bold]{database_name}[/]: creating it and applying migrations")
        env = demo_environ(prepare_database(services, database_name), redis_server.url)
        os.environ.update(env)
        import workflows.orders  # noqa: F401  (registers orders.fulfill)
        from config.celery_app import durable
        from durable.testing import TestEnv

        processes = Processes(env, logdir)
        with _stopping(processes, keep):
            processes.start_worker()
            processes.start_worker()
            processes.start_beat()
            console.print("Started workers demo-1 and demo-2 (2 processes each), durable beat")
            tour = Tour(durable, processes, redis_server, TestEnv(durable), place_orders())
            run_tour(tour)
            good = report(tour)
            _conclude(good, time.monotonic() - started)
            print_next_steps(env, services, tour, keep)
            return good


def _conclude(good: bool, elapsed: float) -> None:
    if good:
        console.print(f"[bold green]OK[/]: {EXACTLY_ONCE} ({elapsed:.1f} s)", soft_wrap=True)
    else:
        console.print(
            "[bold red]FAILED[/]: some side effect was missing or committed more than once "
            f"({elapsed:.1f} s)",
            soft_wrap=True,
        )


@contextlib.contextmanager
def _stopping(processes: Processes, keep: bool) -> Iterator[None]:
    try:
        yield
        if keep:
            console.print("Workers, beat and Redis keep running; Ctrl-C stops them.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    finally:
        processes.stop_all()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _log_to(logdir: Path) -> Callable[[], None]:
    """Send the demo's own log (durable's warnings while Redis is down) to a file."""
    handler = logging.FileHandler(logdir / "demo.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return lambda: root.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0: every side effect exactly once)."""
    parser = argparse.ArgumentParser(prog="python -m workflows.demo", description=__doc__)
    parser.add_argument(
        "--database",
        default="durable_demo",
        help="name of the database to (re)create for the demo (kept afterwards)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the workers, the beat and Redis running after the tour, until Ctrl-C",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logdir = Path(tempfile.mkdtemp(prefix="durable-demo-"))
    stop_logging = _log_to(logdir)
    good = False
    try:
        good = run_demo(args.database, logdir, args.keep)
    except KeyboardInterrupt:
        console.print("Interrupted; stopping everything the demo started")
        return 130
    finally:
        stop_logging()
        if good:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            console.print(f"Logs of the workers and the beat are in {logdir}", soft_wrap=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
