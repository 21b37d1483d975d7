"""Prometheus metrics, read from PostgreSQL on every scrape and served by ``durable beat``.

``durable beat --metrics-port 9808`` serves ``/metrics``. The numbers come from the store,
so every beat reports the same values for the whole deployment (scrape one, or aggregate
with ``max``), except the ``durable_beat_*`` counters, which are that beat process's own.
Counts drop when ``durable purge`` deletes runs; Prometheus reads that as a counter reset.

==================================================  =========  ==================================
metric                                              type       labels
==================================================  =========  ==================================
``durable_workflows_started_total``                 counter    ``workflow``
``durable_workflows_completed_total``               counter    ``workflow``
``durable_workflows_failed_total``                  counter    ``workflow``
``durable_workflows_cancelled_total``               counter    ``workflow``
``durable_workflows_running``                       gauge      ``workflow``
``durable_workflows_paused``                        gauge      ``workflow``
``durable_step_duration_seconds``                   histogram  ``step`` (remote steps)
``durable_step_retries_total``                      counter    ``step``
``durable_timer_lateness_seconds``                  histogram  ``purpose``
``durable_timers_pending``                          gauge
``durable_timers_due``                              gauge
``durable_stuck``                                   gauge      ``finding`` (see reconcile)
``durable_limit_running``                           gauge      ``limit`` (slots held)
``durable_limit_queued``                            gauge      ``limit`` (steps queued)
``durable_store_up``                                gauge
``durable_beat_timers_fired_total``                 counter
``durable_beat_steps_redispatched_total``           counter
``durable_beat_activations_resent_total``           counter
``durable_beat_index_rebuilds_total``               counter
``durable_beat_steps_admitted_total``               counter
``durable_beat_runs_admitted_total``                counter
==================================================  =========  ==================================

The limit gauges are per limit name only: a limit's keys (customers, tenants) are unbounded,
and a label per key would grow the series without end; ``durable limits`` shows the
busiest keys instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from durable import reconcile
from durable.store import limits as limit_queries
from durable.store import metrics as queries

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from durable.beat import BeatStats
    from durable.core import Core

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STUCK_LIMIT = 1000
"""Most findings of each kind counted per scrape."""


def _histogram(
    name: str, doc: str, label: str, rows: Iterable[Any], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    """A histogram per label value from (name, bucket, n, total) rows of ``width_bucket``."""
    per: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        counts, total = per.setdefault(row.name, ([0] * (len(bounds) + 1), [0.0]))
        # Bucket i holds values in [bounds[i-1], bounds[i]): counted from le=bounds[i] up.
        counts[min(int(row.bucket), len(bounds))] += int(row.n)
        total[0] += float(row.total or 0.0)
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, (counts, total) in sorted(per.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*bounds, math.inf], counts, strict=True):
            cumulative += count
            buckets.append((_le(bound), float(cumulative)))
        family.add_metric([value], buckets, sum_value=total[0])
    return family


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


class StoreCollector(Collector):
    """Reads the metrics from PostgreSQL (and the stuck count as reconcile finds it)."""

    def __init__(self, durable: Core, stats: BeatStats | None = None) -> None:
        self.durable = durable
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        """Yield every metric; a store that cannot be read gives ``durable_store_up 0``."""
        up = GaugeMetricFamily("durable_store_up", "1 when the store answered this scrape")
        try:
            families = list(self._from_store())
        except Exception as exc:  # a scrape must answer; the gauge says what went wrong
            log.warning("durable metrics: cannot read the store: %s", exc)
            families = []
        up.add_metric([], 1.0 if families else 0.0)
        yield up
        yield from families
        yield from self._beat()

    def _from_store(self) -> Iterator[Metric]:
        with self.durable.connect() as conn:
            counts = queries.run_counts(conn)
            durations = queries.step_durations(conn, list(STEP_BUCKETS))
            retries = queries.step_retries(conn)
            lateness = queries.timer_lateness(conn, list(LATENESS_BUCKETS))
            timers = queries.pending_timers(conn)
            limited = limit_queries.counts_by_limit(conn)
        yield from self._runs(counts)
        yield _histogram(
            "durable_step_duration_seconds",
            "Run time of remote steps' last attempt, from its start (its claim) to commit",
            "step",
            durations,
            STEP_BUCKETS,
        )
        family = CounterMetricFamily(
            "durable_step_retries", "Attempts of steps beyond their first", labels=["step"]
        )
        for row in retries:
            family.add_metric([row.name], float(row.n or 0))
        yield family
        yield _histogram(
            "durable_timer_lateness_seconds",
            "How long after their fire time timers fired",
            "purpose",
            lateness,
            LATENESS_BUCKETS,
        )
        yield from _limits(limited)
        yield GaugeMetricFamily(
            "durable_timers_pending", "Timers not fired yet", value=float(timers.pending)
        )
        yield GaugeMetricFamily(
            "durable_timers_due", "Timers past their fire time, not fired", value=float(timers.due)
        )
        stuck = GaugeMetricFamily(
            "durable_stuck", "Stuck items as durable reconcile finds them", labels=["finding"]
        )
        findings = reconcile.find(self.durable, limit=STUCK_LIMIT)
        for kind, count in reconcile.count(findings).items():
            stuck.add_metric([kind], float(count))
        yield stuck

    def _runs(self, counts: list[Any]) -> Iterator[Metric]:
        by_status: dict[str, dict[str, int]] = {}
        for row in counts:
            by_status.setdefault(row.status, {})[row.name] = int(row.n)
        started: dict[str, int] = {}
        for per_name in by_status.values():
            for name, n in per_name.items():
                started[name] = started.get(name, 0) + n
        family = CounterMetricFamily(
            "durable_workflows_started", "Workflow runs started", labels=["workflow"]
        )
        for name, n in sorted(started.items()):
            family.add_metric([name], float(n))
        yield family
        for status in ("completed", "failed", "cancelled"):
            family = CounterMetricFamily(
                f"durable_workflows_{status}", f"Workflow runs {status}", labels=["workflow"]
            )
            for name, n in sorted(by_status.get(status, {}).items()):
                family.add_metric([name], float(n))
            yield family
        running = GaugeMetricFamily(
            "durable_workflows_running", "Workflow runs not finished", labels=["workflow"]
        )
        for name, n in sorted(by_status.get("running", {}).items()):
            running.add_metric([name], float(n))
        yield running
        paused = GaugeMetricFamily(
            "durable_workflows_paused",
            "Workflow runs paused (durable pause, or a step's on_exhausted='pause')",
            labels=["workflow"],
        )
        for row in sorted(counts, key=lambda r: str(r.name)):
            if row.status == "running":  # 0 too, for each workflow with runs in flight
                paused.add_metric([row.name], float(row.paused or 0))
        yield paused

    def _beat(self) -> Iterator[Metric]:
        if self.stats is None:
            return
        for field, doc in (
            ("timers_fired", "Timers this beat fired"),
            ("steps_redispatched", "Steps this beat sent again (lost or orphaned)"),
            ("activations_resent", "Activations this beat sent again"),
            ("index_rebuilds", "Rebuilds of the Redis timer index by this beat"),
            ("steps_admitted", "Queued steps this beat's sweep admitted under their limits"),
            ("runs_admitted", "Queued runs this beat's sweep admitted under their limits"),
        ):
            yield CounterMetricFamily(
                f"durable_beat_{field}", doc, value=float(getattr(self.stats, field))
            )


def _limits(counts: dict[str, tuple[int, int]]) -> Iterator[Metric]:
    """Slots held and steps queued per limit name (over all its keys)."""
    running = GaugeMetricFamily(
        "durable_limit_running",
        "Slots of a concurrency limit held, over its keys",
        labels=["limit"],
    )
    queued = GaugeMetricFamily(
        "durable_limit_queued",
        "Steps queued for a slot of a limit, over its keys",
        labels=["limit"],
    )
    for name, (held, waiting) in sorted(counts.items()):
        running.add_metric([name], float(held))
        queued.add_metric([name], float(waiting))
    yield running
    yield queued


def serve(
    durable: Core, port: int, address: str = "0.0.0.0", stats: BeatStats | None = None
) -> WSGIServer:
    """Serve ``/metrics`` on ``address:port`` from a daemon thread; ``.shutdown()`` stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(durable, stats))
    server, _ = start_http_server(port, address, registry)
    return server
