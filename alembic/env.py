"""Alembic environment of the durable store; run through ``durable db upgrade``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from durable.store.migrate import VERSION_TABLE
from durable.store.models import metadata

config = context.config


def run_migrations_offline() -> None:
    """Emit SQL without a connection (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply migrations over a connection, holding an advisory lock against a racing upgrade."""
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=metadata, version_table=VERSION_TABLE
        )
        with context.begin_transaction():
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7424081913)")
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
