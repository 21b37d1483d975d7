"""``durable resume``, ``retry``, ``fork`` and ``purge``: repair runs and delete old ones.

Resume moves a stuck run on, retry runs a failed one again, fork reruns one from a step.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click

from durable import admin
from durable.cli._bulk import (
    FILTERS,
    bulk_options,
    check_form,
    filter_options,
    run_bulk,
    run_filter,
)
from durable.cli._common import (
    MAX_INT,
    app_option,
    check_id_option,
    connect,
    database_option,
    duration_callback,
    echo,
    engine_url,
    json_option,
    print_json,
    require_app,
    store_url,
)
from durable.cli._show import duration


@click.command()
@click.argument("workflow_id", metavar="[ID]", required=False, callback=check_id_option)
@filter_options
@bulk_options
@json_option("resume", "a line of text")
@app_option
@click.pass_context
def resume(
    ctx: click.Context, /, workflow_id: str | None, as_json: bool, app: str | None, **params: Any
) -> None:
    """Re-dispatch running workflow ID when it is stuck; or every run the filters select.

    Wakes the run and sends its activation again; sends its scheduled steps again (a step
    whose worker died is rescheduled first) and puts its unfired timers back in the Redis
    index. Anything already in motion ignores the duplicates.

    Without ID, resumes the running runs that --status, --name, --since, --waiting and --attr
    select (as 'durable list' does), or with --all every running run: --dry-run prints how
    many and a sample; otherwise it asks first (--yes does not), then acts --batch-size runs per
    transaction. Interrupted, run it again: resuming a run twice is harmless.
    """
    if check_form("resume", workflow_id, params):
        run_bulk(require_app(ctx, app), "resume", run_filter(params), params, as_json)
        return
    assert workflow_id is not None
    done = admin.resume(require_app(ctx, app), workflow_id)
    if as_json:
        print_json({"id": done.workflow_id, "steps_sent": done.steps, "timers": done.timers})
        return
    steps = ", ".join(str(s) for s in done.steps) or "none"
    echo(f"resumed {workflow_id}: activation sent; steps re-sent: {steps}")


@click.command()
@click.argument("workflow_id", metavar="[ID]", required=False, callback=check_id_option)
@filter_options
@bulk_options
@json_option("retry", "a line of text")
@app_option
@click.pass_context
def retry(
    ctx: click.Context, /, workflow_id: str | None, as_json: bool, app: str | None, **params: Any
) -> None:
    """Run failed workflow ID again from its first step that did not complete; or many.

    That step and every one after it run again; the results of the steps before it are kept.

    Without ID, retries the failed runs that --status, --name, --since, --waiting and --attr
    select (as 'durable list' does), or with --all every failed run: --dry-run prints how
    many and a sample; otherwise it asks first (--yes does not), then acts --batch-size runs per
    transaction. Interrupted, run it again: the runs already retried no longer match.
    """
    if check_form("retry", workflow_id, params):
        run_bulk(require_app(ctx, app), "retry", run_filter(params), params, as_json)
        return
    assert workflow_id is not None
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
    callback=duration_callback,
    metavar="DURATION",
    show_envvar=True,
    help="Delete runs finished longer ago than this: 90s, 30m, 12h, 30d, 1d12h.",
)
@filter_options
@bulk_options
@json_option("purge", "a line of text")
@app_option
@database_option
@click.pass_context
def purge(
    ctx: click.Context,
    /,
    older_than: timedelta | None,
    as_json: bool,
    app: str | None,
    database_url: str | None,
    **params: Any,
) -> None:
    """Delete finished runs (completed, failed, cancelled) older than DURATION.

    Their steps, timers, history, signals and events go with them; running runs are never
    touched.

    With 'durable list''s filters (--status, --name, --since, --waiting, --attr), or --all, it
    deletes the finished runs they select (and --older-than, if given, keeps): --dry-run
    prints how many and a sample; otherwise it asks first (--yes does not), then deletes
    --batch-size runs per transaction. Interrupted, run it again: the runs deleted are gone.
    """
    check_form("purge", None, {**params, "older_than": older_than}, ", --older-than")
    if any(params[k] not in (None, False) for k in FILTERS) or params["all"]:
        target = engine_url(store_url(ctx, app, database_url)[0])
        where = run_filter(params, older_than)
        run_bulk(target, "purge", where, params, as_json)
        return
    assert older_than is not None
    with connect(ctx, app, database_url) as conn:
        count = admin.purge(conn, older_than, dry_run=params["dry_run"])
    if as_json:
        print_json(
            {
                "purged": 0 if params["dry_run"] else count,
                "matched": count,
                "dry_run": params["dry_run"],
            }
        )
        return
    verb = "would purge" if params["dry_run"] else "purged"
    echo(f"{verb} {count} run(s) finished more than {duration(older_than.total_seconds())} ago")
