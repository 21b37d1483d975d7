"""The example shop's own data, in PostgreSQL next to durable's tables.

Three tables, created when first used:

- ``shop_orders``: the orders customers placed (what ``validate_order`` reads);
- ``shop_effects``: one row per committed side effect (a validation, a reservation, a charge,
  a shipment, an email, a release). Like a payment API with idempotency keys, a call with a
  key that was seen already for that kind of effect commits nothing new: the row is unique on
  ``(kind, idempotency_key)``. Counting rows per order shows whether anything was done twice;
- ``shop_calls``: one row per call of a task body, committed or not, so a call that was
  repeated after a crash is visible too.

The database is ``SHOP_DATABASE_URL``, by default ``DURABLE_DATABASE_URL``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, insert

from durable import current_step
from durable.config import normalise_database_url

metadata = MetaData()

orders = Table(
    "shop_orders",
    metadata,
    Column("id", Text, primary_key=True),
    Column("email", Text, nullable=False),
    Column("items", JSONB, nullable=False),
    Column("card", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)

effects = Table(
    "shop_effects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("idempotency_key", Text),
    Column("order_id", Text, nullable=False),
    Column("at", DateTime(timezone=True), server_default=func.now()),
    UniqueConstraint("kind", "idempotency_key", name="uq_shop_effects_kind_key"),
)

calls = Table(
    "shop_calls",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("idempotency_key", Text),
    Column("order_id", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("at", DateTime(timezone=True), server_default=func.now()),
)

# Held while creating the tables, so that worker processes starting together do not race.
_CREATE_LOCK_KEY = 5_817_202_611

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}


def database_url() -> str:
    """The shop's database URL, from ``SHOP_DATABASE_URL`` or ``DURABLE_DATABASE_URL``."""
    url = os.environ.get("SHOP_DATABASE_URL") or os.environ.get("DURABLE_DATABASE_URL")
    if not url:
        raise RuntimeError("set SHOP_DATABASE_URL or DURABLE_DATABASE_URL for the shop's store")
    return normalise_database_url(url)


def engine() -> Engine:
    """This process's engine (a forked worker process opens its own), tables created."""
    url = database_url()
    key = (os.getpid(), url)
    with _lock:
        found = _engines.get(key)
        if found is None:
            found = create_engine(url, pool_size=2, max_overflow=4)
            create_tables(found)
            _engines[key] = found
    return found


def create_tables(target: Engine) -> None:
    """Create the shop's tables where they are missing."""
    with target.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK_KEY})
        metadata.create_all(conn)


def add_order(order_id: str, email: str, items: list[dict[str, Any]], card: str) -> None:
    """Place an order (nothing happens if one with that id exists)."""
    row = {"id": order_id, "email": email, "items": items, "card": card}
    with engine().begin() as conn:
        conn.execute(insert(orders).values(row).on_conflict_do_nothing())


def get_order(order_id: str) -> dict[str, Any] | None:
    """The order as placed, or None."""
    with engine().connect() as conn:
        row = conn.execute(select(orders).where(orders.c.id == order_id)).first()
    if row is None:
        return None
    return {"id": row.id, "email": row.email, "items": list(row.items), "card": row.card}


def record_call(kind: str, order_id: str) -> None:
    """Log that a task body was called, whether or not its effect is committed."""
    row = {
        "kind": kind,
        "idempotency_key": current_step().idempotency_key,
        "order_id": order_id,
        "pid": os.getpid(),
    }
    with engine().begin() as conn:
        conn.execute(calls.insert().values(row))


def record_effect(kind: str, order_id: str) -> int:
    """Commit a side effect under the current step's idempotency key; returns its id.

    A second call with the same key for the same kind commits nothing and returns the id of
    the first, as a payment API given an idempotency key answers a repeated request with
    the original response. Outside a workflow there is no key and every call commits.
    """
    key = current_step().idempotency_key
    stmt = (
        insert(effects)
        .values(kind=kind, idempotency_key=key, order_id=order_id)
        .on_conflict_do_nothing(index_elements=["kind", "idempotency_key"])
        .returning(effects.c.id)
    )
    with engine().begin() as conn:
        new_id = conn.execute(stmt).scalar()
        if new_id is not None:
            return int(new_id)
        existing = select(effects.c.id).where(
            effects.c.kind == kind, effects.c.idempotency_key == key
        )
        return int(conn.execute(existing).scalar_one())


def effect_counts() -> dict[str, dict[str, int]]:
    """How many effects of each kind were committed, per order id."""
    query = select(effects.c.order_id, effects.c.kind, func.count()).group_by(
        effects.c.order_id, effects.c.kind
    )
    return _nested_counts(query)


def call_counts() -> dict[str, dict[str, int]]:
    """How many times each kind of task body was called, per order id."""
    query = select(calls.c.order_id, calls.c.kind, func.count()).group_by(
        calls.c.order_id, calls.c.kind
    )
    return _nested_counts(query)


def _nested_counts(query: Any) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    with engine().connect() as conn:
        for order_id, kind, count in conn.execute(query):
            counts.setdefault(order_id, {})[kind] = int(count)
    return counts
