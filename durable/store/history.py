"""Reading a run's append-only history (written by the other store modules' statements)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select

from durable.store.models import history


def list_history(conn: Connection, wid: str) -> list[Row[Any]]:
    """Every history event of a run, oldest first."""
    query = select(history).where(history.c.workflow_id == wid).order_by(history.c.id)
    return list(conn.execute(query))
