"""(b) Throughput of many concurrent workflows; (c) how fast workflows can be started.

**Throughput**: 200 plain Celery chains of 10 links, all sent at once, against 200 durable
workflows of 10 steps, all started at once, on the same worker. The clock runs from just
before the first ``apply_async()`` / ``start()`` until the last of the 200 last links (last
steps) pushed its time to a Redis list, and, for durable, until the NOTIFY of the last
run's committed result. Steps per second = 2,000 / that time.

**Starts**: ``durable.start()`` of a workflow that does nothing, from one caller thread and
from several, against ``apply_async()`` of the same task with no result backend. No worker
consumes meanwhile, so this is the cost of the start alone (a run's insert and the sending
of its activation); the messages are purged and the runs deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
from celery import chain

from bench.app import NOOP_WORKFLOW, STEPS_WORKFLOW
from bench.common import median
from bench.harness import Bench

FLOWS, STEPS, THROUGHPUT_RUNS = 200, 10, 3
STARTS, START_RUNS = 400, 3
BULK = 1000  # runs of one durable.start_many call, against as many apply_async calls
START_THREADS = (1, 8)


CPU_PARTS = ("worker parent", "worker children", "PostgreSQL", "Redis", "caller")
"""The processes whose CPU time a batch is charged, by part (see :func:`cpu_seconds`)."""


@dataclass
class Throughput:
    """Steps per second of each run (``FLOWS`` times ``STEPS`` steps)."""

    plain: list[float] = field(default_factory=list)
    durable_last: list[float] = field(default_factory=list)
    durable_done: list[float] = field(default_factory=list)
    cpu_plain: list[dict[str, float]] = field(default_factory=list)
    """CPU seconds of each part (``CPU_PARTS``) during each plain batch."""
    cpu_durable: list[dict[str, float]] = field(default_factory=list)
    """The same during each durable batch (until its last run's end was committed)."""

    def cpu_ms_per_step(self, kind: str, part: str) -> float:
        """Median CPU milliseconds per step of ``part`` in ``kind``'s batches."""
        batches: list[dict[str, float]] = getattr(self, f"cpu_{kind}")
        return median([each.get(part, 0.0) for each in batches]) / (FLOWS * STEPS) * 1000


@dataclass
class Starts:
    """Starts (or sends) per second, by number of caller threads."""

    plain: dict[int, list[float]] = field(default_factory=dict)
    durable: dict[int, list[float]] = field(default_factory=dict)
    many: list[float] = field(default_factory=list)
    """Starts per second of one ``durable.start_many`` call of ``BULK`` runs."""
    bulk_plain: list[float] = field(default_factory=list)
    """Sends per second of ``BULK`` ``apply_async`` calls in a row, in the same rounds."""

    def rate(self, kind: str, threads: int) -> float:
        return median(getattr(self, kind).get(threads, []))


def _cpu_parts(bench: Bench) -> dict[int, str]:
    """Each process a batch is charged to, by pid: its part of ``CPU_PARTS``."""
    parts: dict[int, str] = {os.getpid(): "caller"}
    worker = bench.worker.proc if bench.worker is not None else None
    if worker is not None:
        parts[worker.pid] = "worker parent"
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(worker.pid).children(recursive=True):
                parts[child.pid] = "worker children"
    assert bench.listener is not None
    with contextlib.suppress(psutil.Error):
        postmaster = psutil.Process(bench.listener.info.backend_pid).parent()
        if postmaster is not None:
            for proc in [postmaster, *postmaster.children()]:
                parts[proc.pid] = "PostgreSQL"
    for proc in psutil.process_iter(["name"]):
        if "redis-server" in (proc.info.get("name") or ""):
            parts[proc.pid] = "Redis"
    return parts


def cpu_seconds(bench: Bench) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each charged process: pid -> (part, seconds)."""
    found: dict[int, tuple[str, float]] = {}
    for pid, part in _cpu_parts(bench).items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            found[pid] = (part, times.user + times.system)
    return found


def _cpu_spent(before: dict[int, tuple[str, float]], bench: Bench) -> dict[str, float]:
    """CPU seconds by part since ``before`` (a process that started since counts whole)."""
    spent: dict[str, float] = {}
    for pid, (part, now) in cpu_seconds(bench).items():
        spent[part] = spent.get(part, 0.0) + now - before.get(pid, (part, 0.0))[1]
    return spent


def plain_batch(bench: Bench, flows: int = FLOWS, steps: int = STEPS) -> float:
    """Steps per second of ``flows`` plain chains sent at once."""
    key = bench.key()
    chains = []
    for _ in range(flows):
        links = [bench.add.s(0, 1)] + [bench.add.s(1) for _ in range(steps - 1)]
        links[-1] = links[-1].clone(kwargs={"notify": key})
        chains.append(chain(*[link.set(ignore_result=True) for link in links]))
    started = time.time()
    for each in chains:
        each.apply_async()
    last = max(bench.collect(key, flows))
    return flows * steps / (last - started)


def durable_batch(bench: Bench, flows: int = FLOWS, steps: int = STEPS) -> tuple[float, float]:
    """Steps per second of ``flows`` workflows started at once: (last step ran, committed)."""
    key = bench.key()
    started = time.time()
    ids = [bench.durable.start(STEPS_WORKFLOW, steps, key).id for _ in range(flows)]
    done = bench.wait_finished(ids)
    last = max(bench.collect(key, flows))
    total = flows * steps
    return total / (last - started), total / (done - started)


def measure_throughput(bench: Bench, result: Throughput) -> None:
    """Warm up with a small batch of each, then alternate batches of each."""
    plain_batch(bench, 20)
    durable_batch(bench, 20)
    for i in range(THROUGHPUT_RUNS):
        order: list[Callable[[], None]] = [
            lambda: _add_plain(bench, result),
            lambda: _add_durable(bench, result),
        ]
        for variant in order if i % 2 == 0 else order[::-1]:
            variant()


def _add_plain(bench: Bench, result: Throughput) -> None:
    before = cpu_seconds(bench)
    result.plain.append(plain_batch(bench))
    result.cpu_plain.append(_cpu_spent(before, bench))


def _add_durable(bench: Bench, result: Throughput) -> None:
    before = cpu_seconds(bench)
    last, done = durable_batch(bench)
    result.cpu_durable.append(_cpu_spent(before, bench))
    result.durable_last.append(last)
    result.durable_done.append(done)


def _rate(count: int, threads: int, call: Callable[[int], object]) -> float:
    """Calls per second of ``call(i)`` for ``i`` in ``range(count)`` over ``threads``."""
    started = time.perf_counter()
    if threads == 1:
        for i in range(count):
            call(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(call, range(count)))
    return count / (time.perf_counter() - started)


def measure_starts(bench: Bench, result: Starts) -> None:
    """Time starts and sends with no worker running; purge and delete what they made."""
    batch = uuid.uuid4().hex[:8]
    add = bench.add

    def send(i: int) -> object:
        return add.apply_async((i, 1), ignore_result=True)

    def start(i: int, run: list[int]) -> object:
        wid = f"start-{batch}-{run[0]}-{i}"
        return bench.durable.start(NOOP_WORKFLOW, i, workflow_id=wid)

    def many(i: int, r: int) -> object:
        ids = [f"many-{batch}-{r}-{i}-{j}" for j in range(BULK)]
        return bench.durable.start_many(
            NOOP_WORKFLOW, [(j,) for j in range(BULK)], workflow_ids=ids
        )

    try:
        _rate(50, 1, send)  # warm up: connections, pools
        _rate(50, 1, lambda i: start(i, [-1]))
        for r in range(START_RUNS):
            for threads in START_THREADS:
                run = [r * 100 + threads]
                result.plain.setdefault(threads, []).append(_rate(STARTS, threads, send))
                rate = _rate(STARTS, threads, lambda i, run=run: start(i, run))
                result.durable.setdefault(threads, []).append(rate)
            result.bulk_plain.append(_rate(BULK, 1, send))
            result.many.append(BULK * _rate(1, 1, lambda i, r=r: many(i, r)))
    finally:
        bench.purge_queue()
        bench.sql(
            "WITH w AS (DELETE FROM durable_workflows WHERE name = %s RETURNING id)"
            " DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM w)",
            (NOOP_WORKFLOW,),
        )
