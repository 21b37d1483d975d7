"""Benchmarks of durable against plain Celery (and DBOS), in one run on the same services.

``python -m bench.run`` (``make bench``) finds or starts PostgreSQL and Redis, creates
throwaway databases and Redis key prefixes, starts real ``celery worker`` processes on the
app in :mod:`bench.app`, and measures the parts chosen with ``--part`` (default: all):

- ``latency``: an N-step workflow against the same plain Celery chain, N = 1, 10, 100, with
  and without a result backend, on a solo and a prefork worker (:mod:`bench.latency`);
- ``statements``: PostgreSQL transactions and statements per step (:mod:`bench.latency`);
- ``throughput``: 200 concurrent 10-step workflows against 200 chains
  (:mod:`bench.throughput`);
- ``starts``: workflow starts per second (:mod:`bench.throughput`);
- ``timers``: timer lateness with 10,000 and 100,000 timers pending, with a real
  ``durable beat`` (:mod:`bench.timers`);
- ``replay``: one activation's replay of a 1,000-step history (:mod:`bench.replay`);
- ``dbos``: local steps against DBOS steps when ``dbos`` is installed
  (:mod:`bench.dbos_steps`);
- ``attributes``: ``durable list --attr customer=42 --status running`` among 100,000 runs
  (:mod:`bench.attributes`).

Everything it started or created is removed at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import celery

from bench import attributes, dbos_steps, latency, replay, throughput, timers
from bench.common import POOL_LABELS, POOLS, BenchError, console, sigint_ignored
from bench.harness import Bench
from bench.report import Results, report
from durable.dev.services import ensure_services
from durable.store.engine import redact

BUDGET = 300.0  # the whole bench; it gives up (and cleans up) past this
PARTS = (
    "latency",
    "statements",
    "throughput",
    "starts",
    "timers",
    "replay",
    "dbos",
    "attributes",
)


def measure_with_workers(
    bench: Bench, pools: list[str], parts: set[str], results: Results, logdir: Path
) -> None:
    """The parts that need the bench's worker, pool by pool."""
    count_pool = "solo" if "solo" in pools else pools[0]
    flow_pool = "prefork" if "prefork" in pools else pools[-1]
    for pool in pools:
        todo = [p for p in ("latency",) if p in parts]
        todo += ["statements"] if "statements" in parts and pool == count_pool else []
        todo += ["throughput"] if "throughput" in parts and pool == flow_pool else []
        if not todo:
            continue
        console.print(f"[dim]worker --pool={POOL_LABELS[pool]}: {', '.join(todo)}…[/]")
        bench.start_worker(pool, logdir)
        try:
            if "latency" in todo:
                results.latency[pool] = samples = latency.Samples()
                latency.measure(bench, samples)
            if "statements" in todo:
                results.counts = latency.count(bench)
            if "throughput" in todo:
                results.throughput = throughput.Throughput()
                results.throughput_pool = pool
                throughput.measure_throughput(bench, results.throughput)
        finally:
            bench.stop_worker()


def measure_in_process(bench: Bench, parts: set[str], results: Results) -> None:
    """The parts with no worker: starts, replay, local steps against DBOS, attributes."""
    if "starts" in parts:
        console.print("[dim]starts (no worker)…[/]")
        results.starts = throughput.Starts()
        throughput.measure_starts(bench, results.starts)
    if "replay" in parts:
        console.print("[dim]replay (in-process)…[/]")
        results.replay = replay.measure_replay(bench)
    if "dbos" in parts:
        console.print("[dim]local steps in-process, and DBOS…[/]")
        results.local_inprocess = replay.measure_local(bench)
        results.dbos = dbos_steps.measure(bench.services)
    if "attributes" in parts:
        console.print(f"[dim]listing by attributes among {attributes.RUNS:,} runs…[/]")
        results.attributes = attributes.measure(bench.services)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pool", action="append", choices=sorted(POOLS), help="worker pool(s) (default: all)"
    )
    parser.add_argument(
        "--part", action="append", choices=PARTS, help="part(s) to run (default: all)"
    )
    args = parser.parse_args(argv)
    pools = args.pool or list(POOLS)
    parts = set(args.part or PARTS)
    # Celery lets these override the URLs the bench app passes; the bench picks its own.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ.pop(name, None)
    deadline = time.monotonic() + BUDGET
    console.print(
        f"durable bench: Python {platform.python_version()}, Celery {celery.__version__},"
        f" {os.cpu_count()} CPUs"
    )
    services = ensure_services()
    bench = Bench(services, deadline, BUDGET)
    results = Results()
    try:
        console.print(
            f"PostgreSQL {redact(services.database_url)} (database {bench.db_name}),"
            f" Redis {redact(services.redis_url)} (keys {bench.prefix}*)"
        )
        bench.set_up()
        with tempfile.TemporaryDirectory(prefix="durable-bench-") as logdir:
            measure_with_workers(bench, pools, parts, results, Path(logdir))
            measure_in_process(bench, parts, results)
            if "timers" in parts:
                results.timers = timers.TimerBench(services, Path(logdir), deadline).run()
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
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
