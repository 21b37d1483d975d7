"""``durable limits``: the concurrency limits, their use per key, and run-time overrides."""

from __future__ import annotations

import click
from rich.text import Text

from durable import admin
from durable.cli._common import (
    MAX_INT,
    DurableGroup,
    Globals,
    app_option,
    connect,
    console,
    database_option,
    echo,
    json_option,
    load_durable,
    make_table,
    print_json,
)
from durable.errors import InvalidLimit
from durable.limits import parse_rate


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    """A ``--rate`` as given, once it parses (``100/m``, ``5/s``, ``10/5s``)."""
    if value is not None:
        try:
            parse_rate("--rate", value)
        except InvalidLimit as exc:
            raise click.BadParameter(exc.reason) from None
    return value


def _rate_cell(row: dict[str, object]) -> str:
    """The declared rate, and the override that wins while set."""
    declared, override = row["rate"] or "-", row["rate_override"]
    return f"{override} (declared {declared})" if override else str(declared)


@click.group(cls=DurableGroup, invoke_without_command=True)
@json_option("limits")
@app_option
@database_option
@click.pass_context
def limits(ctx: click.Context, as_json: bool, app: str | None, database_url: str | None) -> None:
    """List the concurrency limits: declared, overridden, slots in use and queued.

    A limit appears once a step under it has been admitted, or a run of a workflow declared
    with it started. Its running and queued count steps, or a workflow's runs. Each row's
    keys are the busiest of its keys (at most 20), with their slots held and queued.
    """
    if ctx.invoked_subcommand is not None:
        return
    with connect(ctx, app, database_url) as conn:
        rows = admin.list_limits(conn)
    if as_json:
        print_json(rows)
        return
    columns = ("limit", "declared", "override", "effective", "rate", "running", "queued", "keys")
    table = make_table(*columns)
    for row in rows:
        keys = ", ".join(f"{k['key']} {k['running']}/{k['queued']}" for k in row["keys"])
        table.add_row(
            Text(row["name"]),
            _number(row["concurrency"]),
            _number(row["override"]),
            _number(row["effective"]),
            _rate_cell(row),
            str(row["running"]),
            str(row["queued"]),
            Text(keys),
        )
    console().print(table)


@limits.command("set")
@click.argument("name")
@click.option(
    "--concurrency",
    type=click.IntRange(min=0, max=MAX_INT),
    show_envvar=True,
    help="Slots per key from now on; 0 admits nothing (a pause).",
)
@click.option(
    "--rate",
    callback=_rate,
    show_envvar=True,
    help="Starts per period per key from now on (100/m, 5/s); a limit that declares a rate.",
)
@click.option(
    "--clear",
    is_flag=True,
    show_envvar=True,
    help="Drop the overrides (concurrency and rate): the code's declaration applies again.",
)
@json_option("limits set", "a line of text")
@app_option
@database_option
@click.pass_context
def limits_set(
    ctx: click.Context,
    name: str,
    concurrency: int | None,
    rate: str | None,
    clear: bool,
    as_json: bool,
    app: str | None,
    database_url: str | None,
) -> None:
    """Override limit NAME's concurrency or rate at run time; it wins over the code's.

    Steps (or runs) already holding slots keep them when the limit is lowered. With the app
    (--app or DURABLE_APP) the queued steps and runs that now fit are admitted at once;
    without it, by the next sweep of 'durable beat'.
    """
    if (concurrency is None and rate is None) == (not clear):
        raise click.UsageError(
            "give exactly one of --concurrency N / --rate R/period (or both) and --clear", ctx
        )
    keep = admin.KEEP
    value: int | admin.Keep | None = None if clear else keep if concurrency is None else concurrency
    new_rate: str | admin.Keep | None = None if clear else keep if rate is None else rate
    spec = app or (ctx.find_object(Globals) or Globals()).app
    admitted: int | None = None
    if spec:
        admitted = admin.set_limit(load_durable(spec), name, value, new_rate)
    else:
        with connect(ctx, app, database_url) as conn:
            admin.override_limit(conn, name, value, new_rate)
    if as_json:
        shown = {"override": concurrency, "rate_override": rate}
        print_json({"name": name, **shown, "cleared": clear, "admitted": admitted})
        return
    changes = ["the declared concurrency and rate"] if clear else []
    changes += [] if concurrency is None else [f"concurrency {concurrency}"]
    changes += [] if rate is None else [f"rate {rate}"]
    now = " and ".join(changes)
    later = "by the beat's next sweep" if admitted is None else f"now: {admitted}"
    echo(f"limit {name}: {now}; queued steps and runs that fit are admitted {later}")
