"""``durable start``, ``list``, ``show``, ``signal`` and ``cancel``: the life of a run.

Start runs, inspect them, and talk to running ones.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import click
from rich.text import Text

from durable import admin
from durable.attributes import AttributeFilter, parse_filter
from durable.cli._bulk import bulk_options, check_form, filter_options, run_bulk, run_filter
from durable.cli._common import (
    Globals,
    app_option,
    check_id_option,
    compact,
    connect,
    console,
    database_option,
    duration_callback,
    json_option,
    limit_option,
    load_durable,
    make_table,
    parse_json,
    print_json,
    report,
    require_app,
    status_text,
    when,
)
from durable.cli._show import Opener, render_run
from durable.codec import Compression, Fernet
from durable.errors import ConfigurationError, DurableError, InvalidAttributes

# ``start`` passes these as keywords of its own, so a workflow keyword cannot use them.
RESERVED_KWARGS = (
    "name_or_fn",
    "workflow_id",
    "attributes",
    "start_at",
    "countdown",
    "debounce",
    "debounce_max",
)


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


def _moment_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value[:40]!r} is not an ISO 8601 time", param=param) from None
    if moment.tzinfo is None:
        raise click.BadParameter("give a time zone: 2030-01-31T09:00:00Z or +01:00", param=param)
    return moment


def _start_attr_callback(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for text in value:
        try:
            found = parse_filter(text)
        except InvalidAttributes as exc:
            raise click.BadParameter(exc.reason, ctx, param) from None
        if found.op != "=":
            raise click.BadParameter(f"{text[:60]!r} is not KEY=VALUE", ctx, param)
        attributes[found.key] = found.value
    return attributes


@click.command()
@click.argument("name")
@app_option
@click.option(
    "--id",
    "workflow_id",
    callback=check_id_option,
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
@click.option(
    "--countdown",
    callback=duration_callback,
    metavar="DURATION",
    show_envvar=True,
    help="Start this long from now (90s, 30m, 12h, 1d12h), by a durable timer.",
)
@click.option(
    "--start-at",
    "start_at",
    callback=_moment_callback,
    metavar="TIME",
    show_envvar=True,
    help="Start at this ISO 8601 time with a time zone (2030-01-31T09:00:00Z).",
)
@click.option(
    "--debounce",
    callback=duration_callback,
    metavar="DURATION",
    show_envvar=True,
    help="Start this long after the last such call for --id; a call while the run waits "
    "replaces its arguments and pushes its start back.",
)
@click.option(
    "--debounce-max",
    "debounce_max",
    callback=duration_callback,
    metavar="DURATION",
    show_envvar=True,
    help="With --debounce: start at the latest this long after the first call.",
)
@click.option(
    "--attr",
    "attributes",
    multiple=True,
    callback=_start_attr_callback,
    metavar="KEY=VALUE",
    show_envvar=True,
    help="A searchable attribute of the run (VALUE read as JSON if it is a JSON scalar, "
    "else as text); repeat it for several.",
)
@json_option("start", "the id alone")
@click.pass_context
def start(
    ctx: click.Context,
    name: str,
    app: str | None,
    workflow_id: str | None,
    args: list[Any],
    kwargs: dict[str, Any],
    countdown: timedelta | None,
    start_at: datetime | None,
    debounce: timedelta | None,
    debounce_max: timedelta | None,
    attributes: dict[str, Any],
    as_json: bool,
) -> None:
    """Start workflow NAME and print its id (alone, for scripts to capture).

    With --countdown, --start-at or --debounce the run is written now and waits for its
    start (`durable show` says until when); `durable beat` starts it.
    """
    if workflow_id == "":
        raise click.BadParameter("must not be empty", ctx, param_hint="'--id'")
    durable = require_app(ctx, app)
    try:
        run = durable.start(
            name,
            *args,
            workflow_id=workflow_id,
            attributes=attributes,
            start_at=start_at,
            countdown=countdown,
            debounce=debounce,
            debounce_max=debounce_max,
            **kwargs,
        )
    except ValueError as exc:
        if isinstance(exc, DurableError):
            raise
        raise click.UsageError(str(exc), ctx) from None
    report(as_json, run.id, {"id": run.id})


def _waiting_text(waiting: dict[str, Any] | None) -> Text:
    if waiting is None:
        return Text("")
    on = waiting["on"]
    parts = [on]
    if waiting["seq"] is not None:
        parts.append(f"#{waiting['seq']} {waiting['name']}")
    elif on == "queued":  # a run queued for a slot of its limit, named here
        parts.append(f"for {waiting['name']}")
    if waiting["until"] is not None:
        parts.append(f"until {when(waiting['until'])}")
    return Text(" ".join(parts), style="red" if on == "nothing" else "")


def _status_cell(row: dict[str, Any]) -> Text:
    cell = status_text(row["status"])
    if row["paused"]:
        cell.append(", paused", style="yellow")
    return cell


@click.command("list")
@filter_options
@limit_option(50, "Most runs to show, newest first.")
@json_option("list")
@app_option
@database_option
@click.pass_context
def list_command(
    ctx: click.Context,
    status: str | None,
    name: str | None,
    since: datetime | timedelta | None,
    waiting: str | None,
    paused: bool,
    attributes: tuple[AttributeFilter, ...] | None,
    limit: int,
    as_json: bool,
    app: str | None,
    database_url: str | None,
) -> None:
    """List workflow runs, newest first, with what each running one waits on.

    A paused run (durable pause) is shown as 'running, paused'; --paused lists only those.
    --attr finds runs by their attributes: customer=42 (equality, answered from the
    attributes' index; several are one lookup), amount>=100 or due<2026-12-01T00:00
    (bounds of a range, checked on the runs the other filters select).
    """
    with connect(ctx, app, database_url) as conn:
        rows = admin.list_runs(
            conn,
            status=status,
            name=name,
            since=since,
            waiting=waiting,
            paused=paused,
            attributes=attributes,
            limit=limit,
        )
    if as_json:
        print_json(rows)
        return
    headers = ["id", "name", "status", "waiting on", "created", "updated"]
    tagged = any(row["attributes"] for row in rows)
    table = make_table(*headers, *(["attributes"] if tagged else []))
    for row in rows:
        cells: list[Text | str] = [
            Text(row["id"]),
            Text(row["name"]),
            _status_cell(row),
            _waiting_text(row["waiting"]),
            when(row["created_at"]),
            when(row["updated_at"]),
        ]
        if tagged:
            cells.append(Text(_attributes_text(row["attributes"])))
        table.add_row(*cells)
    console().print(table)


def _attributes_text(attributes: dict[str, Any]) -> str:
    return compact(
        " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in attributes.items()), 60
    )


def _keys_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    """The codec that ``--key`` values (each may list several, comma-separated) make."""
    keys = [k.strip() for v in value for k in v.split(",") if k.strip()]
    if not keys:
        return None
    try:
        return Compression() | Fernet(keys)
    except ConfigurationError as exc:  # the message names the problem, never the key
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command()
@click.argument("workflow_id", metavar="ID", callback=check_id_option)
@json_option("show")
@click.option(
    "--key",
    "key_codec",
    multiple=True,
    callback=_keys_callback,
    envvar="DURABLE_ENCRYPTION_KEYS",
    show_envvar=True,
    metavar="KEY",
    help="A Fernet key to decrypt encrypted values with; repeat it, or separate keys with "
    "commas. Without a key or --app they show as <encrypted>.",
)
@app_option
@database_option
@click.pass_context
def show(
    ctx: click.Context,
    workflow_id: str,
    as_json: bool,
    key_codec: Any,
    app: str | None,
    database_url: str | None,
) -> None:
    """Show run ID: its outcome, steps, attempts, timers, signals, events and timeline.

    Each step is shown with its attempts, how long it took, its result or its error.
    Values a payload codec encoded are decoded with the app's codec (--app) or the keys
    given (--key); those neither opens show as <encrypted>.
    """
    with connect(ctx, app, database_url) as conn:
        run = admin.describe_run(conn, workflow_id)
    spec = app or (ctx.find_object(Globals) or Globals()).app
    app_codec = load_durable(spec).codec if spec else None
    opener = Opener([c for c in (app_codec, key_codec) if c is not None])
    run = opener.reveal(run)
    if as_json:
        print_json(run)
    else:
        render_run(run, console(), opener.hidden)


def _payload_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    return None if value is None else parse_json(value, param, object, "value")


@click.command("signal")
@click.argument("workflow_id", metavar="ID", callback=check_id_option)
@click.argument("name", callback=check_id_option)
@click.option(
    "--payload",
    callback=_payload_callback,
    metavar="JSON",
    show_envvar=True,
    help="The signal's payload, any JSON value (default: null).",
)
@app_option
@json_option("signal", "a line")
@click.pass_context
def signal_command(
    ctx: click.Context, workflow_id: str, name: str, payload: Any, app: str | None, as_json: bool
) -> None:
    """Send signal NAME to running workflow ID; it is stored before this returns."""
    require_app(ctx, app).signal(workflow_id, name, payload)
    sent = {"workflow_id": workflow_id, "signal": name}
    report(as_json, f"sent {name!r} to {workflow_id}", sent)


@click.command()
@click.argument("workflow_id", metavar="[ID]", required=False, callback=check_id_option)
@filter_options
@bulk_options
@json_option("cancel", "a line of text")
@app_option
@click.pass_context
def cancel(
    ctx: click.Context, /, workflow_id: str | None, as_json: bool, app: str | None, **params: Any
) -> None:
    """Cancel running workflow ID and its child workflows; or every run the filters select.

    The workflow receives WorkflowCancelled at its next step, sleep or signal wait, may
    compensate, and ends cancelled. Cancelling twice is harmless.

    Without ID, cancels the running runs that --status, --name, --since, --waiting and
    --attr select (as 'durable list' does), or with --all every running run: --dry-run prints how
    many and a sample; otherwise it asks first (--yes does not), then acts --batch-size runs
    per transaction. Interrupted, run it again: the runs already cancelled no longer match.
    """
    if check_form("cancel", workflow_id, params):
        run_bulk(require_app(ctx, app), "cancel", run_filter(params), params, as_json)
        return
    assert workflow_id is not None
    require_app(ctx, app).cancel(workflow_id)
    requested = {"workflow_id": workflow_id, "cancel_requested": True}
    report(as_json, f"cancellation of {workflow_id} requested", requested)
