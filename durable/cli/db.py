"""``durable db``: the store's schema."""

from __future__ import annotations

import click

from durable.cli._common import (
    DurableGroup,
    app_option,
    database_option,
    engine_url,
    json_option,
    report,
    store_url,
)
from durable.store import engine as store_engine
from durable.store import migrate


@click.group(cls=DurableGroup)
def db() -> None:
    """Manage the store's schema."""


@db.command("upgrade")
@app_option
@database_option
@json_option("db upgrade", "a line")
@click.pass_context
def db_upgrade(
    ctx: click.Context, app: str | None, database_url: str | None, as_json: bool
) -> None:
    """Apply the store's migrations (safe to run again, and from several hosts at once)."""
    url, attempts = store_url(ctx, app, database_url)
    target = engine_url(url)
    store_engine.with_retry(url, lambda: migrate.upgrade(target), attempts)
    shown = store_engine.redact(url)
    report(as_json, f"store at {shown} is up to date", {"store": shown, "up_to_date": True})
