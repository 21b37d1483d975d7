"""``durable resume``, ``retry``, ``fork`` and ``purge``: repair runs and delete old ones.

Resume moves a stuck run on, retry runs a failed one again, fork reruns one from a step.
"""

from __future__ import annotations

from datetime import timedelta

import click

from durable import admin
from durable.cli._common import (
    MAX_INT,
    app_option,
    check_id_option,
    connect,
    database_option,
    echo,
    json_option,
    print_json,
    require_app,
)
from durable.cli._show import duration


def _duration_callback(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    try:
        return admin.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@click.command()
@click.argument("workflow_id", metavar="ID", callback=check_id_option)
@json_option("resume", "a line of text")
@app_option
@click.pass_context
def resume(ctx: click.Context, workflow_id: str, as_json: bool, app: str | None) -> None:
    """Re-dispatch running workflow ID when it is stuck.

    Wakes the run and sends its activation again; sends its scheduled steps again (a step
    whose worker died is rescheduled first) and puts its unfired timers back in the Redis
    index. Anything already in motion ignores the duplicates.
    """
    done = admin.resume(require_app(ctx, app), workflow_id)
    if as_json:
        print_json({"id": done.workflow_id, "steps_sent": done.steps, "timers": done.timers})
        return
    steps = ", ".join(str(s) for s in done.steps) or "none"
    echo(f"resumed {workflow_id}: activation sent; steps re-sent: {steps}")


@click.command()
@click.argument("workflow_id", metavar="ID", callback=check_id_option)
@json_option("retry", "a line of text")
@app_option
@click.pass_context
def retry(ctx: click.Context, workflow_id: str, as_json: bool, app: str | None) -> None:
    """Run failed workflow ID again from its first step that did not complete.

    That step and every one after it run again; the results of the steps before it are kept.
    """
    done = admin.retry(require_app(ctx, app), workflow_id)
    if as_json:
        print_json({"id": workflow_id, "from_step": done.from_step, "removed": done.removed})
        return
    where = f"from step {done.from_step}" if done.from_step else "replaying its whole history"
    echo(f"retrying {workflow_id} {where}")


@click.command()
@click.argument("workflow_id", metavar="ID", callback=check_id_option)
@click.option(
    "--from-step",
    "from_step",
    type=click.IntRange(min=1, max=MAX_INT),
    required=True,
    show_envvar=True,
    metavar="N",
    help="The first step to run again; the results of the steps before it are reused.",
)
@click.option(
    "--id",
    "new_id",
    callback=check_id_option,
    envvar="DURABLE_FORK_ID",
    show_envvar=True,
    help="Id of the new run (default: ID-fork-<random>).",
)
@json_option("fork", "a line of text")
@app_option
@click.pass_context
def fork(
    ctx: click.Context,
    workflow_id: str,
    from_step: int,
    new_id: str | None,
    as_json: bool,
    app: str | None,
) -> None:
    """Start a new run of workflow ID's workflow and arguments from step N; print its id.

    The completed steps before N are copied with their results; steps N and after run again
    ("the LLM step was wrong: rerun from there"). Run ID itself is left as it is.
    """
    if new_id == "":
        raise click.BadParameter("must not be empty", ctx, param_hint="'--id'")
    target, copied = admin.fork(require_app(ctx, app), workflow_id, from_step, new_id)
    if as_json:
        print_json(
            {"id": target, "forked_from": workflow_id, "from_step": from_step, "copied": copied}
        )
        return
    echo(target)


@click.command()
@click.option(
    "--older-than",
    "older_than",
    callback=_duration_callback,
    required=True,
    metavar="DURATION",
    show_envvar=True,
    help="Delete runs finished longer ago than this: 90s, 30m, 12h, 30d, 1d12h.",
)
@click.option(
    "--dry-run", is_flag=True, show_envvar=True, help="Only count the runs that would go."
)
@json_option("purge", "a line of text")
@app_option
@database_option
@click.pass_context
def purge(
    ctx: click.Context,
    older_than: timedelta,
    dry_run: bool,
    as_json: bool,
    app: str | None,
    database_url: str | None,
) -> None:
    """Delete finished runs (completed, failed, cancelled) older than DURATION.

    Their steps, timers, history, signals and events go with them; running runs are never
    touched.
    """
    with connect(ctx, app, database_url) as conn:
        count = admin.purge(conn, older_than, dry_run=dry_run)
    if as_json:
        print_json({"purged": 0 if dry_run else count, "matched": count, "dry_run": dry_run})
        return
    verb = "would purge" if dry_run else "purged"
    echo(f"{verb} {count} run(s) finished more than {duration(older_than.total_seconds())} ago")
