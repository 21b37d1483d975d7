"""``durable reconcile``: find every stuck workflow and, with ``--fix``, repair it."""

from __future__ import annotations

import click
from rich.text import Text

from durable import reconcile as reconciliation
from durable.cli._common import (
    CommandFailed,
    Seconds,
    app_option,
    console,
    echo,
    json_option,
    limit_option,
    make_table,
    print_json,
    require_app,
)


@click.command()
@click.option("--fix", is_flag=True, show_envvar=True, help="Repair what is found.")
@click.option(
    "--grace",
    type=Seconds(),
    metavar="SECONDS",
    show_envvar=True,
    help="How late a dispatch, wake-up or timer may be before it counts as stuck "
    "(default: the redispatch_after setting, 10 s).",
)
@limit_option(500, "Most findings of each kind per run of the command.")
@json_option("reconcile")
@app_option
@click.pass_context
def reconcile(
    ctx: click.Context,
    fix: bool,
    grace: float | None,
    limit: int,
    as_json: bool,
    app: str | None,
) -> None:
    """Find stuck workflows and, with --fix, repair them; print what was found and done.

    Finds steps whose message was lost, steps whose worker died, runs woken but never
    resumed, running runs with nothing pending, sleeps and retries without a timer, overdue
    timers, and timers missing from the Redis index. Without --fix, exits 1 when anything
    is stuck.
    """
    report = reconciliation.reconcile(require_app(ctx, app), fix=fix, grace=grace, limit=limit)
    if as_json:
        print_json(report.as_dict())
    elif report.findings:
        table = make_table("finding", "workflow", "#", "name", "detail", "action")
        for f in report.findings:
            action = Text(f.action, style="green" if f.fixed else "")
            seq = "" if f.seq is None else str(f.seq)
            table.add_row(f.kind, Text(f.workflow_id), seq, Text(f.name), f.detail, action)
        console().print(table)
    else:
        echo("nothing is stuck")
    if report.findings and not fix:
        raise CommandFailed(
            f"{len(report.findings)} stuck item(s) found; 'durable reconcile --fix' repairs them"
        )
