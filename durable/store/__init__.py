"""The store: PostgreSQL models and every query durable runs, one module per concept.

Query functions take a :class:`sqlalchemy.Connection` first, so the caller owns the
transaction. Nothing outside this package speaks SQL.
"""
