"""``durable pause`` and ``unpause``: hold runs where they are, and let them go on.

A paused run stays ``running`` but nothing moves it: its steps are not dispatched, its
timers do not fire, the sweeps leave it alone and signals sent to it are kept. Unpausing
dispatches what came due meanwhile. Both take an ID or ``durable list``'s filters.
"""

from __future__ import annotations

from typing import Any

import click

from durable import admin
from durable.cli._bulk import bulk_options, check_form, filter_options, run_bulk, run_filter
from durable.cli._common import app_option, check_id_option, json_option, report, require_app


@click.command()
@click.argument("workflow_id", metavar="[ID]", required=False, callback=check_id_option)
@filter_options
@bulk_options
@json_option("pause", "a line of text")
@app_option
@click.pass_context
def pause(
    ctx: click.Context, /, workflow_id: str | None, as_json: bool, app: str | None, **params: Any
) -> None:
    """Pause running workflow ID; or every run the filters select.

    Nothing moves a paused run until 'durable unpause': its steps are not dispatched (one
    already running finishes and its result is kept), its timers do not fire, the beat's
    sweeps leave it alone, and signals sent to it are kept. Its status stays running
    ('durable list --paused' finds it). Pausing twice is harmless; 'durable cancel' lifts
    the pause.

    Without ID, pauses the running runs that --status, --name, --since and --waiting select
    (as 'durable list' does), or with --all every running run: --dry-run prints how many and
    a sample; otherwise it asks first (--yes does not), then acts --batch-size runs per
    transaction. Interrupted, run it again: the runs already paused no longer match.
    """
    if check_form("pause", workflow_id, params):
        run_bulk(require_app(ctx, app), "pause", run_filter(params), params, as_json)
        return
    assert workflow_id is not None
    changed = admin.pause(require_app(ctx, app), workflow_id)
    line = f"paused {workflow_id}" if changed else f"{workflow_id} was paused already"
    report(as_json, line, {"workflow_id": workflow_id, "paused": True, "changed": changed})


@click.command()
@click.argument("workflow_id", metavar="[ID]", required=False, callback=check_id_option)
@filter_options
@bulk_options
@json_option("unpause", "a line of text")
@app_option
@click.pass_context
def unpause(
    ctx: click.Context, /, workflow_id: str | None, as_json: bool, app: str | None, **params: Any
) -> None:
    """Let paused workflow ID go on where it stopped; or every paused run the filters select.

    What came due while it was paused is dispatched now: its timers go back to the Redis
    index (a due one fires at once), the steps it held back are sent, and its activation
    replays what reached it meanwhile (signals, step results, a child's end). A step paused
    by RetryPolicy(on_exhausted="pause") is tried once more. Unpausing a run that is not
    paused changes nothing.

    Without ID, unpauses the paused runs that --status, --name, --since and --waiting select
    (as 'durable list' does), or with --all every paused run: --dry-run prints how many and
    a sample; otherwise it asks first (--yes does not), then acts --batch-size runs per
    transaction. Interrupted, run it again: the runs already unpaused no longer match.
    """
    if check_form("unpause", workflow_id, params):
        run_bulk(require_app(ctx, app), "unpause", run_filter(params), params, as_json)
        return
    assert workflow_id is not None
    done = admin.unpause(require_app(ctx, app), workflow_id)
    if done is None:
        data = {"workflow_id": workflow_id, "changed": False, "steps_sent": [], "timers": 0}
        report(as_json, f"{workflow_id} was not paused", data)
        return
    steps = ", ".join(str(s) for s in done.steps) or "none"
    data = {"workflow_id": workflow_id, "changed": True, "steps_sent": done.steps}
    report(
        as_json,
        f"unpaused {workflow_id}: activation sent; steps sent: {steps}",
        {**data, "timers": done.timers},
    )
