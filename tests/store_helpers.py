"""Store statements only the tests need: a step written, or settled, by hand."""

from __future__ import annotations

from sqlalchemy import Connection

from durable.store.steps import NewStep, schedule_steps, settle_step


def schedule_step(
    conn: Connection, wid: str, seq: int, name: str, args: str, kwargs: str, options: str
) -> bool:
    """Record one remote step as scheduled (JSON text arguments); False if it existed."""
    return schedule_steps(conn, wid, [NewStep(seq, name, args, kwargs, options)])[0] == 1


def complete_step(conn: Connection, wid: str, seq: int, result: str) -> bool:
    """Commit a step's result (JSON text) and wake its workflow; False if already settled."""
    return settle_step(conn, wid, seq, result=result).settled
