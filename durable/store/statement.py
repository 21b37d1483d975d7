"""SQL texts as the store sends them."""

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
