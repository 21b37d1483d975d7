"""Tasks of the nightly report: gather a day's figures, store the report, deliver it.

The report lives in PostgreSQL next to the shop's data (``SHOP_DATABASE_URL``, by default
``DURABLE_DATABASE_URL``), in ``report_nightly``, one row per (report, day), created when
first used. Storing is an upsert and delivery a conditional update, so a step re-run after a
crash, or a day reported again (a backfill), never makes a second row or a second delivery.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Engine,
    MetaData,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert

from config.celery_app import app
from durable import Durable
from durable.admin import list_runs
from tasks import store

SHOWN_FAILURES = 20
RUNS_LIMIT = 100_000

metadata = MetaData()

reports = Table(
    "report_nightly",
    metadata,
    Column("report", Text, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("timezone", Text, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("body", JSONB, nullable=False),
    Column("workflow_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    Column("recipients", JSONB),
)

_CREATE_LOCK_KEY = 5_817_202_613  # held while creating the table


def engine() -> Engine:
    """The shop's engine for this process, with the report table created."""
    return store.engine_with(metadata, _CREATE_LOCK_KEY)


@app.task
def collect_sales(start: str, end: str) -> dict[str, Any]:
    """The shop's day: orders placed, side effects by kind, and the charged orders' value."""
    lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
    orders, effects = store.orders, store.effects
    placed = select(func.count()).where(orders.c.created_at >= lo, orders.c.created_at < hi)
    by_kind = (
        select(effects.c.kind, func.count())
        .where(effects.c.at >= lo, effects.c.at < hi)
        .group_by(effects.c.kind)
    )
    charged = (
        select(orders.c["items"])
        .join(effects, effects.c.order_id == orders.c.id)
        .where(effects.c.kind == "charge", effects.c.at >= lo, effects.c.at < hi)
    )
    with engine().connect() as conn:
        orders_placed = int(conn.execute(placed).scalar_one())
        kinds = {kind: int(count) for kind, count in conn.execute(by_kind)}
        charged_items = [row[0] for row in conn.execute(charged)]
    value = sum(int(i["qty"]) * int(i["price_cents"]) for items in charged_items for i in items)
    return {"orders_placed": orders_placed, "effects": kinds, "charged_cents": value}


@app.task
def collect_runs(start: str, end: str) -> dict[str, Any]:
    """Workflow runs started in the window: counts by workflow and status, failed ids."""
    lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
    with Durable.of(app).connect() as conn:
        runs = [r for r in list_runs(conn, since=lo, limit=RUNS_LIMIT) if r["created_at"] < hi]
    counts = Counter((r["name"], r["status"]) for r in runs)
    by_workflow: dict[str, dict[str, int]] = {}
    for (name, status), count in sorted(counts.items()):
        by_workflow.setdefault(name, {})[status] = count
    failed = sorted(r["id"] for r in runs if r["status"] == "failed")
    return {"by_workflow": by_workflow, "failed": failed[:SHOWN_FAILURES]}


@app.task
def store_report(
    report: str, day: str, timezone: str, window: list[str], body: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """Write the day's report (replacing an earlier one of that day); returns its key."""
    row = {
        "report": report,
        "day": date.fromisoformat(day),
        "timezone": timezone,
        "window_start": datetime.fromisoformat(window[0]),
        "window_end": datetime.fromisoformat(window[1]),
        "body": body,
        "workflow_id": run_id,
    }
    stmt = insert(reports).values(row)
    stmt = stmt.on_conflict_do_update(
        index_elements=["report", "day"],
        set_={k: stmt.excluded[k] for k in ("body", "workflow_id", "window_start", "window_end")},
    )
    with engine().begin() as conn:
        conn.execute(stmt)
    return {"report": report, "day": day}


@app.task
def deliver_report(report: str, day: str) -> list[str]:
    """Send the report to ``SHOP_REPORT_RECIPIENTS`` (comma-separated), once; returns them.

    Here delivery is recorded on the row (the mail relay's outbox); a repeated call finds it
    delivered and sends nothing.
    """
    recipients = [
        r.strip()
        for r in (os.environ.get("SHOP_REPORT_RECIPIENTS") or "ops@shop.example").split(",")
    ]
    stmt = (
        update(reports)
        .where(reports.c.report == report, reports.c.day == date.fromisoformat(day))
        .where(reports.c.delivered_at.is_(None))
        .values(delivered_at=func.now(), recipients=recipients)
    )
    with engine().begin() as conn:
        conn.execute(stmt)
    return recipients


def get_report(report: str, day: str) -> dict[str, Any] | None:
    """The stored report of ``day``, or None."""
    query = select(reports).where(
        reports.c.report == report, reports.c.day == date.fromisoformat(day)
    )
    with engine().connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else dict(row._mapping)
