"""SQL texts as the store sends them.

Statements that find one run by its key and also test that it is running write the test as
``(status = 'running') IS TRUE``: the same condition (the column is NOT NULL), but no index
can serve it, so the primary key stays the only way to the row. Written ``status =
'running'``, it ties with the key in the planner's costs while the table has no statistics
(a new database, before autovacuum's first ANALYZE), and a plan cached on a pooled
connection could then scan every running run at each step.
"""

from __future__ import annotations

from sqlalchemy import TextClause, text


def statement(sql: str) -> TextClause:
    """``text(sql)`` without its indentation and ``--`` comment lines.

    The store's statements are written indented for reading; sent that way the largest ones
    pass 4 kB, past which psycopg converts a query's placeholders again at every execution
    instead of caching the conversion. Lines are kept, so a statement still reads in
    ``pg_stat_activity`` and the server's log.
    """
    lines = (line.strip() for line in sql.splitlines())
    return text("\n".join(line for line in lines if line and not line.startswith("--")))
