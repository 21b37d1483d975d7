"""The example shop's own data, in PostgreSQL next to durable's tables.

Three tables, created when first used:

- ``shop_orders``: the orders customers placed (what ``validate_order`` reads);
- ``shop_effects``: one row per committed side effect (a validation, a fraud check, a
  reservation and its release, a charge and its refund with their amounts, a request to the
  warehouse, an email). Like a payment API with idempotency keys, a call with a key that was
  seen already for that kind of effect commits nothing new: the row is unique on
  ``(kind, idempotency_key)``. Counting rows per order shows whether anything was done twice,
  and summing amounts whether a card was charged or refunded twice;
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
    Column("amount_cents", Integer),
    Column("detail", JSONB),
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


_extra_ready: set[tuple[int, str, int]] = set()


def engine_with(extra: MetaData, lock_key: int) -> Engine:
    """The shop's engine, with ``extra``'s tables (another example's) created once.

    ``lock_key`` is held while creating them, so worker processes starting together do not
    race; each example passes its own.
    """
    target = engine()
    key = (os.getpid(), str(target.url), lock_key)
    with _lock:
        if key not in _extra_ready:
            with target.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
                extra.create_all(conn)
            _extra_ready.add(key)
    return target


def create_tables(target: Engine) -> None:
    """Create the shop's tables where they are missing."""
    with target.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK_KEY})
        metadata.create_all(conn)
        # Columns added since the first version of the example, for stores created by it.
        conn.execute(text("ALTER TABLE shop_effects ADD COLUMN IF NOT EXISTS amount_cents integer"))
        conn.execute(text("ALTER TABLE shop_effects ADD COLUMN IF NOT EXISTS detail jsonb"))


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


def record_effect(
    kind: str,
    order_id: str,
    amount_cents: int | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Commit a side effect under the current step's idempotency key; returns its id.

    A second call with the same key for the same kind commits nothing and returns the id of
    the first, as a payment API given an idempotency key answers a repeated request with
    the original response. Outside a workflow there is no key and every call commits.
    """
    key = current_step().idempotency_key
    stmt = (
        insert(effects)
        .values(
            kind=kind,
            idempotency_key=key,
            order_id=order_id,
            amount_cents=amount_cents,
            detail=detail,
        )
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


def find_effect(kind: str) -> tuple[int, int | None] | None:
    """The effect of ``kind`` committed under the current step's key, as (id, amount).

    A task whose effect depends on earlier ones (a refund of what is left) looks here first,
    so that its re-run answers as the first run did instead of deciding afresh.
    """
    key = current_step().idempotency_key
    if key is None:
        return None
    query = select(effects.c.id, effects.c.amount_cents).where(
        effects.c.kind == kind, effects.c.idempotency_key == key
    )
    with engine().connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else (int(row.id), row.amount_cents)


def effect_total(order_id: str, kind: str) -> int:
    """The sum of the amounts of the order's effects of ``kind`` (say, what was charged)."""
    query = select(func.coalesce(func.sum(effects.c.amount_cents), 0)).where(
        effects.c.order_id == order_id, effects.c.kind == kind
    )
    with engine().connect() as conn:
        return int(conn.execute(query).scalar_one())


def effect_count(order_id: str, kind: str) -> int:
    """How many effects of ``kind`` were committed for the order."""
    query = select(func.count()).where(effects.c.order_id == order_id, effects.c.kind == kind)
    with engine().connect() as conn:
        return int(conn.execute(query).scalar_one())


def effect_details(order_id: str, kind: str) -> list[dict[str, Any]]:
    """The details of the order's effects of ``kind``, oldest first."""
    query = (
        select(effects.c.detail)
        .where(effects.c.order_id == order_id, effects.c.kind == kind)
        .order_by(effects.c.id)
    )
    with engine().connect() as conn:
        return [dict(row.detail or {}) for row in conn.execute(query)]


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
