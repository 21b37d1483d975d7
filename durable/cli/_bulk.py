"""What ``list`` and the bulk forms of cancel, retry, resume, purge, pause and unpause share.

``filter_options`` are ``durable list``'s filters; the bulk forms take the same ones, plus
``--all``, ``--dry-run``, ``--yes`` and ``--batch-size`` (``bulk_options``), and
:func:`run_bulk` carries them out with :mod:`durable.bulk`: a dry run prints the count and a
sample; otherwise it asks on a terminal (``--yes`` skips), acts a batch at a time printing
each batch, and ends with a summary.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import click

from durable import admin, bulk
from durable.attributes import AttributeFilter, parse_filter
from durable.cli._common import STATUSES, CommandFailed, echo, print_json
from durable.errors import InvalidAttributes

if TYPE_CHECKING:
    from durable.core import Core

F = TypeVar("F", bound=Callable[..., Any])

FILTERS = ("status", "name", "since", "waiting", "paused", "attributes")
MAX_BATCH = 10_000


def _since_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | timedelta | None:
    if value is None:
        return None
    try:
        return admin.parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a duration (90s, 30m, 12h, 7d) nor an ISO-8601 time",
            param=param,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _attr_callback(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[AttributeFilter, ...] | None:
    if not value:
        return None
    try:
        return tuple(parse_filter(text) for text in value)
    except InvalidAttributes as exc:
        raise click.BadParameter(exc.reason, ctx, param) from None


def filter_options(fn: F) -> F:
    """``durable list``'s filters: status, name, since, waiting, paused and attributes.

    ``--attr`` may be repeated; its values arrive parsed, as ``attributes``.
    """
    options = [
        click.option(
            "--status",
            type=click.Choice(STATUSES),
            show_envvar=True,
            help="Only runs in this status.",
        ),
        click.option("--name", show_envvar=True, help="Only runs of this workflow."),
        click.option(
            "--since",
            callback=_since_callback,
            metavar="WHEN",
            show_envvar=True,
            help="Only runs started since WHEN: a duration ago (90s, 30m, 12h, 7d) or an "
            "ISO-8601 time.",
        ),
        click.option(
            "--waiting",
            type=click.Choice(admin.WAITING),
            show_envvar=True,
            help="Only running runs waiting on a step, a timer, a signal, or a slot (queued).",
        ),
        click.option(
            "--paused",
            is_flag=True,
            show_envvar=True,
            help="Only paused runs (durable pause).",
        ),
        click.option(
            "--attr",
            "attributes",
            multiple=True,
            callback=_attr_callback,
            metavar="FILTER",
            show_envvar=True,
            help="Only runs whose attributes match: KEY=VALUE (VALUE read as JSON if it is a "
            "JSON scalar, else as text), or a bound KEY>=N, KEY>N, KEY<=N, KEY<N with a number "
            "or an ISO-8601 time. Repeat it: all must hold.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def bulk_options(fn: F) -> F:
    """``--all``, ``--dry-run``, ``--yes`` and ``--batch-size`` of a bulk form."""
    options = [
        click.option(
            "--all",
            "all",
            is_flag=True,
            show_envvar=True,
            help="With no filter: act on every run this command applies to.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            show_envvar=True,
            help="Only print how many runs match, and a sample of their ids.",
        ),
        click.option(
            "--yes", "-y", is_flag=True, show_envvar=True, help="Do not ask for confirmation."
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1, max=MAX_BATCH),
            default=100,
            show_default=True,
            show_envvar=True,
            help="Runs acted on per transaction.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_filter(params: dict[str, Any], older_than: timedelta | None = None) -> bulk.RunFilter:
    """The :class:`~durable.bulk.RunFilter` of a command's filter options."""
    values = {k: params[k] for k in FILTERS}
    values["paused"] = bool(values["paused"])
    return bulk.RunFilter(**values, older_than=older_than)


def check_form(
    action: str, workflow_id: str | None, params: dict[str, Any], extra: str = ""
) -> bool:
    """Whether the command is the bulk form; a usage error when it mixes both forms.

    The bulk form has no ID; it needs a filter or ``--all``.
    """
    bulk_given = [k for k in (*FILTERS, "older_than") if params.get(k) not in (None, False)]
    bulk_given += [k for k in ("all", "dry_run") if params.get(k)]
    if workflow_id is not None:
        if bulk_given:
            flag = "--attr" if bulk_given[0] == "attributes" else "--" + bulk_given[0]
            flag = flag.replace("_", "-")
            raise click.UsageError(f"give an ID or filters, not both ({flag} with ID)")
        return False
    if not params.get("all") and not [k for k in bulk_given if k != "dry_run"]:
        an_id = "" if extra else "an ID, or "
        raise click.UsageError(
            f"give {an_id}filters (--status, --name, --since, --waiting, --paused, "
            f"--attr{extra}) to {action} the runs they select, or --all to {action} every run "
            "it applies to"
        )
    return True


def _confirm(action: str, matched: int) -> None:
    if not sys.stdin.isatty():
        raise CommandFailed(
            f"refusing to {action} {matched} run(s) without confirmation: stdin is not a "
            "terminal; pass --yes (see the count first with --dry-run)"
        )
    if not click.confirm(f"{action.capitalize()} {matched} run(s)?", default=False):
        raise CommandFailed(f"nothing done: {action} of {matched} run(s) not confirmed")


def _show_preview(found: bulk.Preview, as_json: bool) -> None:
    if as_json:
        data = {"action": found.action, "dry_run": True, "matched": found.matched}
        print_json({**data, "sample": found.sample})
        return
    past = bulk.PAST[found.action]
    shown = f"; the first {len(found.sample)}:" if found.sample else ""
    echo(f"would have {past} {found.matched} run(s){shown}")
    for wid in found.sample:
        echo(f"  {wid}")


def run_bulk(
    target: Core | str,
    action: str,
    where: bulk.RunFilter,
    params: dict[str, Any],
    as_json: bool,
) -> None:
    """Carry out a bulk form: dry run, or confirm, act batch by batch and sum up."""
    found = bulk.preview(target, action, where)
    if params["dry_run"]:
        _show_preview(found, as_json)
        return
    if found.matched and not params["yes"]:
        _confirm(action, found.matched)
    past = bulk.PAST[action]
    done = bulk.Outcome(action)

    def progress(batch: bulk.Batch) -> None:
        done.add(batch)
        if not as_json:
            echo(
                f"batch {batch.number}: {past} {len(batch.acted)}, skipped "
                f"{len(batch.skipped)}, failed {len(batch.failed)} "
                f"({done.acted + done.skipped + len(done.failed)} of about {found.matched})"
            )

    try:
        bulk.run(target, action, where, params["batch_size"], progress)
    except KeyboardInterrupt:
        raise CommandFailed(
            f"interrupted after {done.batches} batch(es): {past} {done.acted}, skipped "
            f"{done.skipped}; run the command again to finish"
        ) from None
    _summarise(done, as_json)


def _summarise(done: bulk.Outcome, as_json: bool) -> None:
    past = bulk.PAST[done.action]
    if as_json:
        counts = {"acted": done.acted, "skipped": done.skipped, "failed": done.failed}
        print_json({"action": done.action, "dry_run": False, **counts, "batches": done.batches})
    else:
        for wid, error in done.failed.items():
            echo(f"failed {wid}: {error}")
        echo(
            f"{past} {done.acted} run(s); skipped {done.skipped} (changed meanwhile); "
            f"failed {len(done.failed)}"
        )
    if done.failed:
        raise CommandFailed(f"{len(done.failed)} run(s) could not be {past}; run again to retry")
