"""SQL texts as the store sends them.

Statements that find one run by its key and also test that it is running write the test as
``(status = 'running') IS TRUE``: the same condition (the column is NOT NULL), but no index
can serve it, so the primary key stays the only way to the row. Written ``status =
'running'``, it ties with the key in the planner's costs while the table has no statistics
(a new database, before autovacuum's first ANALYZE), and a plan cached on a pooled
connection could then scan every running run at each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg.pq import ExecStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, TextClause, text
from sqlalchemy.exc import DBAPIError

StatementHook = Callable[[TextClause, float], None]
"""Called with a statement sent by :func:`first_row` (or :func:`row_count`) and the seconds
until its reply."""

_hooks: list[StatementHook] = []
_compiled: dict[int, tuple[TextClause, str]] = {}


def statement(sql: str) -> TextClause:
    """``text(sql)`` without its indentation and ``--`` comment lines.

    The store's statements are written indented for reading; sent that way the largest ones
    pass 4 kB, past which psycopg converts a query's placeholders again at every execution
    instead of caching the conversion. Lines are kept, so a statement still reads in
    ``pg_stat_activity`` and the server's log.
    """
    lines = (line.strip() for line in sql.splitlines())
    return text("\n".join(line for line in lines if line and not line.startswith("--")))


def new_step_values(row: str) -> str:
    """The values of a new remote step's columns from ``status`` on, ``row`` its record.

    A step whose options carry a ``limit`` (``durable.limits``) is written ``queued``, not
    yet dispatched, with its limit's name, key and priority; any other ``scheduled`` and
    counted as dispatched once.
    """
    limited = f"{row}.options ? 'limit'"
    return f"""CASE WHEN {limited} THEN 'queued' ELSE 'scheduled' END,
               {row}.args, {row}.kwargs, {row}.options,
               CASE WHEN {limited} THEN NULL ELSE now() END,
               CASE WHEN {limited} THEN 0 ELSE 1 END,
               {row}.options -> 'limit' ->> 'name', {row}.options -> 'limit' ->> 'key',
               coalesce(CAST({row}.options -> 'limit' ->> 'priority' AS int), 0)"""


NEW_STEP_COLUMNS = """status, args, kwargs, options, dispatched_at, dispatch_count,
                                   limit_name, limit_key, priority"""
"""The columns :func:`new_step_values` gives values for."""


def insert_new_steps(workflow_id: str, source: str = "", tail: str = "") -> str:
    """The INSERT of new remote steps, scheduled (or queued) and counted as dispatched once.

    The rows arrive as one JSON array ``:rows`` of {seq, name, args, kwargs, options}.
    ``workflow_id`` is the SQL of their run's id, ``source`` a relation joined before the
    rows (``"w, "``), ``tail`` a WHERE or ON CONFLICT clause. Returns the steps written.
    """
    return f"""
        INSERT INTO durable_steps (workflow_id, seq, kind, name, {NEW_STEP_COLUMNS})
        SELECT {workflow_id}, r.seq, 'task', r.name, {new_step_values("r")}
          FROM {source}jsonb_to_recordset(CAST(:rows AS jsonb))
               AS r(seq int, name text, args jsonb, kwargs jsonb, options jsonb)
        {tail}
        RETURNING workflow_id, seq, name
    """


def first_row(conn: Connection, clause: TextClause, params: Mapping[str, Any]) -> Any | None:
    """The first row of ``clause`` (or None), sent straight on ``conn``'s psycopg cursor.

    For the statements of the hot paths (a step's claim, read and settle, a start, an
    activation's lease and release, a local step), on autocommit connections (others go
    through ``conn.execute``): SQLAlchemy's execution and result objects cost about 100 µs
    of CPU per statement here, as much as the rest of the client's side. The row has the
    columns as attributes, as SQLAlchemy's would. A failure is raised as SQLAlchemy's
    exception of the same kind (``OperationalError`` with the connection invalidated when
    it was lost), so retries treat it alike. SQLAlchemy's ``*_cursor_execute`` events do
    not see these statements: :func:`on_statement` does.
    """
    return _send(conn, clause, params, rows=True)


def one_row(conn: Connection, clause: TextClause, params: Mapping[str, Any]) -> Any:
    """The one row of a statement that always returns one, sent as :func:`first_row` sends it."""
    row = first_row(conn, clause, params)
    if row is None:
        raise RuntimeError(f"durable: a statement returned no row: {clause.text[:60]!r}")
    return row


def row_count(conn: Connection, clause: TextClause, params: Mapping[str, Any]) -> int:
    """The number of rows ``clause`` changed, sent as :func:`first_row` sends it."""
    return int(_send(conn, clause, params, rows=False))


def _send(conn: Connection, clause: TextClause, params: Mapping[str, Any], rows: bool) -> Any:
    key = id(clause)
    entry = _compiled.get(key)
    if entry is None or entry[0] is not clause:
        entry = _compiled[key] = (clause, str(clause.compile(dialect=conn.dialect)))
    sql = entry[1]
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection) or not driver.autocommit:
        # Inside a transaction SQLAlchemy must see the statement (it commits or rolls back).
        result = conn.execute(clause, params)
        return result.first() if rows else result.rowcount
    sent = time.perf_counter()
    found: Any
    try:
        with driver.cursor(row_factory=namedtuple_row) as cursor:
            cursor.execute(sql, params)
            if rows:
                # The result's status, not ``cursor.description``: that builds a Column
                # object for every column (about 30 us of CPU for a settle's 23).
                reply = cursor.pgresult
                returned = reply is not None and reply.status == ExecStatus.TUPLES_OK
                found = cursor.fetchone() if returned else None
            else:
                found = cursor.rowcount
    except psycopg.Error as exc:
        lost = driver.closed or driver.broken
        if lost:
            # As SQLAlchemy does on a disconnect: the server's other connections in the pool
            # are as likely gone (a restart), so the pool is replaced, not just this one.
            conn.invalidate(exc)
            conn.engine.dispose()
        # Without the parameters: they are a step's result or arguments, and the error
        # reaches logs, task events and Flower (the engines hide them the same way).
        raise DBAPIError.instance(
            sql, None, exc, psycopg.Error, hide_parameters=True, connection_invalidated=lost
        ) from exc
    if _hooks:
        seconds = time.perf_counter() - sent
        for hook in list(_hooks):
            hook(clause, seconds)
    return found


def on_statement(hook: StatementHook) -> Callable[[], None]:
    """Call ``hook`` after each statement sent on the driver's cursor; returns its remover.

    The statements of :func:`first_row` and :func:`row_count`. For measurements (the
    benchmarks and tests count the statements of the step path).
    """
    _hooks.append(hook)
    return lambda: _hooks.remove(hook)
