"""``durable timers``: the durable timers in PostgreSQL (sleeps, retry back-offs, timeouts)."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from rich.text import Text

from durable import admin
from durable.cli._common import (
    DurableGroup,
    app_option,
    check_id_option,
    connect,
    console,
    database_option,
    json_option,
    limit_option,
    make_table,
    print_json,
    when,
)
from durable.cli._show import duration


@click.group(cls=DurableGroup)
def timers() -> None:
    """Inspect durable timers."""


def _due(fire_at: datetime, fired_at: datetime | None) -> str:
    if fired_at is not None:
        return f"fired {when(fired_at)}"
    left = (fire_at - datetime.now(UTC)).total_seconds()
    return f"in {duration(left)}" if left >= 0 else f"overdue {duration(-left)}"


@timers.command("list")
@click.option("--all", "show_all", is_flag=True, show_envvar=True, help="Include fired timers.")
@click.option(
    "--workflow",
    "workflow_id",
    metavar="ID",
    callback=check_id_option,
    show_envvar=True,
    help="Only run ID's.",
)
@limit_option(100, "Most timers to show, soonest first.")
@json_option("timers list")
@app_option
@database_option
@click.pass_context
def timers_list(
    ctx: click.Context,
    show_all: bool,
    workflow_id: str | None,
    limit: int,
    as_json: bool,
    app: str | None,
    database_url: str | None,
) -> None:
    """List timers that have not fired, soonest first (with --all, fired ones too)."""
    with connect(ctx, app, database_url) as conn:
        rows = admin.list_timers(conn, pending=not show_all, workflow_id=workflow_id, limit=limit)
    if as_json:
        print_json(rows)
        return
    table = make_table("id", "workflow", "#", "step", "purpose", "fire at", "due")
    for row in rows:
        table.add_row(
            str(row["id"]),
            Text(row["workflow_id"]),
            str(row["seq"]),
            Text(row["step"] or ""),
            row["purpose"],
            when(row["fire_at"]),
            _due(row["fire_at"], row["fired_at"]),
        )
    console().print(table)
