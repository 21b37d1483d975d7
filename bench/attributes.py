"""(h) ``durable list --attr customer=42 --status running`` among 100,000 runs.

On a database of its own: ``RUNS`` runs are written by one ``INSERT ... SELECT
generate_series`` (a quarter running, the rest completed; ``customer`` one of 1,000 values,
an ``amount`` and a ``region`` beside it, all drawn from a seeded generator), then the table
is analysed, as autovacuum would have by then. The listing is timed through the code the
command runs (:func:`durable.admin.list_runs` with the parsed ``--attr`` and ``--status``,
default ``--limit`` 50) on one connection, after warm-up calls; the median and p95 of
``SAMPLES`` calls are reported. The plan of the same statement is read with ``EXPLAIN``: it
must use the attributes' GIN index.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import text

from bench.common import console, median, percentile
from durable import admin
from durable.attributes import parse_filter
from durable.dev.services import Services, create_database, drop_database
from durable.store import admin as queries
from durable.store import engine as store_engine
from durable.store.migrate import upgrade

RUNS = 100_000
SAMPLES = 50
WARM_UP = 5
INDEX = "ix_durable_workflows_attributes"
FILTERS = ("customer=42",)
STATUS = "running"

# One statement; its draws come from the session's generator, seeded just before. The
# LATERAL subquery refers to ``g`` so that each run draws its own status.
_SEED = f"""
    INSERT INTO durable_workflows (id, name, status, args, kwargs, created_at, updated_at,
                                   finished_at, wake_seq, run_seq, attributes)
    SELECT 'bench-attr-' || g, 'bench.attrs', r.status, '[]', '{{}}',
           now() - g * interval '1 second', now(),
           CASE WHEN r.status = 'completed' THEN now() END, 1, 1,
           jsonb_build_object('customer', floor(random() * 1000)::int,
                              'amount', round((random() * 500)::numeric, 2),
                              'region', (ARRAY['eu', 'us', 'apac'])[1 + floor(random() * 3)::int])
      FROM generate_series(1, {RUNS}) g,
           LATERAL (SELECT CASE WHEN random() < 0.25 THEN 'running' ELSE 'completed' END
                    AS status, g AS tie) r
"""


@dataclass
class AttributeListing:
    """What the part measured."""

    runs: int
    matched: int = 0
    seconds: list[float] = field(default_factory=list)
    plan: str = ""

    @property
    def uses_index(self) -> bool:
        """Whether the plan reads the attributes' GIN index."""
        return INDEX in self.plan

    def ms(self, fraction: float | None = None) -> float:
        """The median time (or the given percentile), in ms."""
        chosen = median(self.seconds) if fraction is None else percentile(self.seconds, fraction)
        return chosen * 1000


def measure(services: Services) -> AttributeListing:
    """Seed the runs in a throwaway database, time the listing, read its plan; drop it."""
    name = f"durable_bench_attrs_{uuid.uuid4().hex[:10]}"
    url = create_database(services.database_url, name)
    try:
        upgrade(url)
        return _measure(url)
    finally:
        for engine in store_engine.engines(url):
            engine.dispose()
        drop_database(services.database_url, name)


def _measure(url: str) -> AttributeListing:
    found = AttributeListing(RUNS)
    engine = store_engine.autocommit(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT setseed(0.42)"))
        conn.execute(text(_SEED))
        conn.execute(text("ANALYZE durable_workflows"))
        filters = tuple(parse_filter(f) for f in FILTERS)  # as ``--attr`` parses them
        for i in range(WARM_UP + SAMPLES):
            began = time.perf_counter()
            rows = admin.list_runs(conn, status=STATUS, attributes=filters)
            took = time.perf_counter() - began
            if i >= WARM_UP:
                found.seconds.append(took)
        found.matched = len(rows)
        query, params = queries.list_runs_query(status=STATUS, attributes=filters)
        plan = conn.execute(text("EXPLAIN " + str(query)), params)
        found.plan = "\n".join(str(line[0]) for line in plan)
    console.print(
        f"[dim]attributes: {RUNS:,} runs, {found.matched} listed, "
        f"index {'used' if found.uses_index else 'NOT used'}[/]"
    )
    return found
