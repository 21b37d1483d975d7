"""``durable start``, ``list`` and ``show``: start workflow runs and inspect them."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection

from durable.cli._common import (
    STATUSES,
    app_option,
    compact,
    connect,
    console,
    database_option,
    json_option,
    make_table,
    parse_json,
    print_json,
    require_app,
    status_text,
    when,
)
from durable.errors import WorkflowNotFound
from durable.store import history, runs, steps, timers

# The fields ``durable show --json`` gives for each step and timer.
STEP_FIELDS: tuple[str, ...] = ("seq", "kind", "name", "status", "attempts", "result", "error")
STEP_FIELDS += ("started_at", "completed_at")
TIMER_FIELDS = ("id", "seq", "purpose", "fire_at", "fired_at")
# ``start`` passes these as keywords of its own, so a workflow keyword cannot use them.
RESERVED_KWARGS = ("name_or_fn", "workflow_id")


def _args_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any]:
    return [] if value is None else list(parse_json(value, param, list, "array"))


def _kwargs_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any]:
    data: dict[str, Any] = {} if value is None else parse_json(value, param, dict, "object")
    clash = sorted(set(data) & set(RESERVED_KWARGS))
    if clash:
        raise click.BadParameter(f"cannot pass {', '.join(clash)} as keywords", param=param)
    return data


@click.command()
@click.argument("name")
@app_option
@click.option(
    "--id",
    "workflow_id",
    envvar="DURABLE_START_ID",
    show_envvar=True,
    help="Workflow id (default: random); starting an id that exists returns that run.",
)
@click.option(
    "--args",
    "args",
    callback=_args_callback,
    metavar="JSON",
    show_envvar=True,
    help="Positional arguments as a JSON array.",
)
@click.option(
    "--kwargs",
    "kwargs",
    callback=_kwargs_callback,
    metavar="JSON",
    show_envvar=True,
    help="Keyword arguments as a JSON object.",
)
@click.pass_context
def start(
    ctx: click.Context,
    name: str,
    app: str | None,
    workflow_id: str | None,
    args: list[Any],
    kwargs: dict[str, Any],
) -> None:
    """Start workflow NAME and print its id (alone, for scripts to capture)."""
    if workflow_id == "":
        raise click.BadParameter("must not be empty", ctx, param_hint="'--id'")
    run = require_app(ctx, app).start(name, *args, workflow_id=workflow_id, **kwargs)
    click.echo(run.id)


def _run_summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
    }


@click.command("list")
@click.option(
    "--status", type=click.Choice(STATUSES), show_envvar=True, help="Only runs in this status."
)
@click.option("--name", show_envvar=True, help="Only runs of this workflow.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    show_envvar=True,
    help="Most runs to show, newest first.",
)
@json_option("list")
@app_option
@database_option
@click.pass_context
def list_command(
    ctx: click.Context,
    status: str | None,
    name: str | None,
    limit: int,
    as_json: bool,
    app: str | None,
    database_url: str | None,
) -> None:
    """List workflow runs, newest first."""
    with connect(ctx, app, database_url) as conn:
        rows = runs.list_runs(conn, status=status, name=name, limit=limit)
    if as_json:
        print_json([_run_summary(row) for row in rows])
        return
    table = make_table("id", "name", "status", "created", "updated")
    for row in rows:
        table.add_row(
            Text(row.id),
            Text(row.name),
            status_text(row.status),
            when(row.created_at),
            when(row.updated_at),
        )
    console().print(table)


def describe_run(conn: Connection, workflow_id: str) -> dict[str, Any]:
    """Everything ``durable show`` prints about a run, as JSON-ready data.

    Args:
        conn: A connection to the store.
        workflow_id: The run's id.

    Returns:
        The run's fields, its ``steps``, ``events`` (``{}`` until events are stored),
        ``history`` and ``timers``.

    Raises:
        WorkflowNotFound: no run has this id.
    """
    row = runs.get_run(conn, workflow_id)
    if row is None:
        raise WorkflowNotFound(workflow_id)
    return {
        **_run_summary(row),
        "args": row.args,
        "kwargs": row.kwargs,
        "result": row.result,
        "error": row.error,
        "steps": [{f: getattr(s, f) for f in STEP_FIELDS} for s in steps.list_steps(conn, row.id)],
        "events": {},
        "history": [
            {"at": h.at, "seq": h.seq, "event": h.event, "detail": h.detail}
            for h in history.list_history(conn, row.id)
        ],
        "timers": [
            {f: getattr(t, f) for f in TIMER_FIELDS} for t in timers.list_timers(conn, row.id)
        ],
    }


def _detail(detail: Any) -> str:
    if not isinstance(detail, dict):
        return compact(detail)
    parts = [f"{k}={compact(v, 60)}" for k, v in detail.items() if v is not None]
    return " ".join(parts)


def render_run(run: dict[str, Any], out: Console) -> None:
    """Print a run as a header, a steps table and a timeline."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column(overflow="fold")
    header.add_row("workflow", Text(run["id"]))
    header.add_row("name", Text(run["name"]))
    header.add_row("status", status_text(run["status"]))
    header.add_row("created", when(run["created_at"]))
    header.add_row("finished", when(run["finished_at"]))
    header.add_row("args", Text(compact(run["args"])))
    header.add_row("kwargs", Text(compact(run["kwargs"])))
    if run["error"]:
        header.add_row("error", Text(run["error"], style="red"))
    else:
        header.add_row("result", Text(compact(run["result"])))
    out.print(header)
    columns = ("#", "kind", "name", "status", "attempts", "completed", "result / error")
    table = make_table(*columns, title="steps")
    for s in run["steps"]:
        outcome = Text(s["error"], style="red") if s["error"] else Text(compact(s["result"]))
        table.add_row(
            str(s["seq"]),
            s["kind"],
            Text(s["name"]),
            status_text(s["status"]),
            str(s["attempts"]),
            when(s["completed_at"]),
            outcome,
        )
    out.print(table)
    timeline = make_table("at", "#", "event", "detail", title="timeline")
    for h in run["history"]:
        seq = "" if h["seq"] is None else str(h["seq"])
        timeline.add_row(when(h["at"]), seq, Text(h["event"]), Text(_detail(h["detail"])))
    out.print(timeline)


@click.command()
@click.argument("workflow_id", metavar="ID")
@json_option("show")
@app_option
@database_option
@click.pass_context
def show(
    ctx: click.Context, workflow_id: str, as_json: bool, app: str | None, database_url: str | None
) -> None:
    """Show run ID: its outcome, its steps and the timeline of its history."""
    with connect(ctx, app, database_url) as conn:
        run = describe_run(conn, workflow_id)
    if as_json:
        print_json(run)
    else:
        render_run(run, console())
