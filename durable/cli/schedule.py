"""``durable schedule``: add, list, pause, resume, remove and trigger schedules; import crontabs.

Every command but ``trigger`` needs only the store (``--database-url``); given ``--app`` it
also checks workflow names and updates the Redis index at once (without the app, the beat's
leader picks changes up at its next sweep, within a second or so).
"""

from __future__ import annotations

from typing import Any, TextIO

import click
from rich.text import Text

from durable.cli._common import (
    CommandFailed,
    DurableGroup,
    Globals,
    Seconds,
    app_option,
    console,
    database_option,
    echo,
    engine_url,
    given,
    json_option,
    load_durable,
    make_table,
    parse_json,
    print_json,
    report,
    require_app,
    status_text,
    store_url,
    when,
)
from durable.scheduler import CATCHUP, OVERLAP, ScheduleInfo, Schedules


def open_schedules(ctx: click.Context, app: str | None, database_url: str | None) -> Schedules:
    """The app's schedules, or the store's alone without an app or with ``--database-url``."""
    spec = app or (ctx.find_object(Globals) or Globals()).app
    if spec and not (database_url and given(ctx, "database_url")):
        return Schedules(load_durable(spec))
    url, attempts = store_url(ctx, app, database_url)
    return Schedules(database_url=engine_url(url), connect_retries=attempts)


def _json_array(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any]:
    return [] if value is None else list(parse_json(value, param, list, "array"))


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    return {} if value is None else dict(parse_json(value, param, dict, "object"))


def _describe(info: ScheduleInfo) -> str:
    if info.paused:
        return f"schedule {info.name}: paused"
    if info.next_fire_at is None:
        return f"schedule {info.name}: never fires again"
    return f"schedule {info.name}: next fire {when(info.next_fire_at)} UTC"


def _cadence(info: ScheduleInfo) -> str:
    if info.every is not None:
        return f"every {info.every.total_seconds():g}s"
    return f"{info.cron} ({info.timezone})"


@click.group(cls=DurableGroup)
def schedule() -> None:
    """Start workflows on a cron expression or a fixed interval (fired by durable beat)."""


policy_options = [
    click.option(
        "--catchup",
        type=click.Choice(CATCHUP),
        default="skip",
        show_default=True,
        show_envvar=True,
        help="Fires missed while every beat was down: start none, the latest once, or all.",
    ),
    click.option(
        "--overlap",
        type=click.Choice(OVERLAP),
        default="skip",
        show_default=True,
        show_envvar=True,
        help="Skip a fire while the previous fire's run is still running, or allow it.",
    ),
    click.option(
        "--timezone",
        default="UTC",
        show_default=True,
        show_envvar=True,
        metavar="TZ",
        help="IANA time zone the cron expression is read in (Europe/Paris).",
    ),
]


def with_policies(fn: Any) -> Any:
    """Add the catch-up, overlap and time-zone options."""
    for option in reversed(policy_options):
        fn = option(fn)
    return fn


@schedule.command("add")
@click.argument("name")
@click.option("--workflow", required=True, show_envvar=True, help="The workflow to start.")
@click.option("--cron", metavar="EXPR", show_envvar=True, help="Cron expression ('0 3 * * *').")
@click.option(
    "--every",
    type=Seconds(positive=True),
    metavar="SECONDS",
    show_envvar=True,
    help="Fixed interval, seconds.",
)
@click.option(
    "--args", callback=_json_array, metavar="JSON", show_envvar=True, help="Arguments, JSON array."
)
@click.option(
    "--kwargs",
    callback=_json_object,
    metavar="JSON",
    show_envvar=True,
    help="Keyword arguments, JSON object.",
)
@with_policies
@app_option
@database_option
@json_option("schedule add", "a line")
@click.pass_context
def add(
    ctx: click.Context,
    name: str,
    workflow: str,
    cron: str | None,
    every: float | None,
    args: list[Any],
    kwargs: dict[str, Any],
    catchup: str,
    overlap: str,
    timezone: str,
    app: str | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Create schedule NAME, or redefine it (a paused schedule stays paused).

    Each fire starts the run NAME@<fire time, ISO-8601 UTC>.
    """
    if (cron is None) == (every is None):
        raise click.UsageError("give exactly one of --cron and --every", ctx)
    info = open_schedules(ctx, app, database_url).add(
        name,
        workflow,
        cron=cron,
        every=every,
        args=args,
        kwargs=kwargs,
        timezone=timezone,
        catchup=catchup,
        overlap=overlap,
    )
    report(as_json, _describe(info), info.as_json())


@schedule.command("list")
@json_option("schedule list")
@app_option
@database_option
@click.pass_context
def list_schedules(
    ctx: click.Context, as_json: bool, app: str | None, database_url: str | None
) -> None:
    """List schedules with their last fire, the last run's status and the next fire."""
    found = open_schedules(ctx, app, database_url).list()
    if as_json:
        print_json([info.as_json() for info in found])
        return
    columns = ("name", "workflow", "when", "catch-up", "overlap", "last fire", "last run")
    table = make_table(*columns, "next fire")
    for info in found:
        next_fire = Text("paused", style="magenta") if info.paused else when(info.next_fire_at)
        table.add_row(
            Text(info.name),
            Text(info.workflow),
            Text(_cadence(info)),
            info.catchup,
            info.overlap,
            when(info.last_fire_at),
            status_text(info.last_status or ""),
            next_fire,
        )
    console().print(table)


def _name_command(verb: str, doc: str) -> click.Command:
    @click.argument("name")
    @app_option
    @database_option
    @json_option(f"schedule {verb}", "a line")
    @click.pass_context
    def command(
        ctx: click.Context, name: str, app: str | None, database_url: str | None, as_json: bool
    ) -> None:
        schedules = open_schedules(ctx, app, database_url)
        if verb == "remove":
            schedules.remove(name)
            report(as_json, f"schedule {name}: removed", {"name": name, "removed": True})
        else:
            info = getattr(schedules, verb)(name)
            report(as_json, _describe(info), info.as_json())

    command.__doc__ = doc
    return schedule.command(verb)(command)


pause = _name_command("pause", "Stop firing schedule NAME; fires while paused are not made up.")
resume = _name_command("resume", "Fire schedule NAME again, from its first fire after now.")
remove = _name_command("remove", "Delete schedule NAME (the runs it started are kept).")


@schedule.command("trigger")
@click.argument("name")
@app_option
@json_option("schedule trigger", "the id alone")
@click.pass_context
def trigger(ctx: click.Context, name: str, app: str | None, as_json: bool) -> None:
    """Start one run of schedule NAME now and print its id (needs the app)."""
    run_id = Schedules(require_app(ctx, app)).trigger(name).id
    report(as_json, run_id, {"id": run_id})


@schedule.command("import-crontab")
@click.argument("file", type=click.File("r"))
@with_policies
@app_option
@database_option
@json_option("schedule import-crontab", "lines")
@click.pass_context
def import_crontab(
    ctx: click.Context,
    file: TextIO,
    catchup: str,
    overlap: str,
    timezone: str,
    app: str | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Turn the lines of crontab FILE ('-': stdin) that start a workflow or task into schedules.

    Mapped: 'durable start NAME [--args JSON] [--kwargs JSON]', 'celery call TASK [--args
    JSON] [--kwargs JSON] [--queue Q]', and, with --app, a bare workflow or task name. Each
    line that cannot be mapped is reported on stderr, and the command then exits 1.
    """
    try:
        text = file.read()
    except UnicodeDecodeError:
        raise CommandFailed(f"{file.name} is not a text file (not valid UTF-8)") from None
    schedules = open_schedules(ctx, app, database_url)
    imported = schedules.import_crontab(text, timezone=timezone, catchup=catchup, overlap=overlap)
    outcomes = ("added", "updated", "unchanged")
    if as_json:
        found = {outcome: list(getattr(imported, outcome)) for outcome in outcomes}
        print_json({**found, "problems": [str(p) for p in imported.problems]})
    else:
        for outcome in outcomes:
            for name in getattr(imported, outcome):
                echo(f"schedule {name}: {outcome}")
        for problem in imported.problems:
            echo(f"cannot map {problem}", err=True)
    if imported.problems:
        raise CommandFailed(f"{len(imported.problems)} crontab line(s) could not be mapped")
