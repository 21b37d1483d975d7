"""The ``durable`` admin command: migrate the store, run the beat, start and inspect runs.

Each command parses its options, calls the library, and prints a rich table or ``--json``.
Every option can also be set from the environment: ``--app`` and ``--database-url`` read
``DURABLE_APP`` and ``DURABLE_DATABASE_URL`` wherever they appear; any other option reads
``DURABLE_<COMMAND>_<OPTION>`` (``durable list --limit`` reads ``DURABLE_LIST_LIMIT``).

A failing command prints one line, ``durable: <reason>``, on stderr and exits 1; a command
given bad options or arguments exits 2 the same way.

One module per concept: ``_common`` (options, loading the app, reaching the store, output),
``db``, ``beat``, ``runs`` (start, list, show, signal, cancel; ``_show`` prints a run;
``_bulk`` holds list's filters and the bulk forms of cancel, resume, retry, purge, pause and
unpause), ``repair`` (resume, retry, fork, purge), ``pause`` (pause, unpause), ``timers``,
``limits`` and ``reconcile``; this module holds the group and registers their commands.
"""

from __future__ import annotations

import click

from durable.cli._common import (
    DurableGroup,
    Globals,
    app_option,
    database_option,
    given,
    load_durable,
)
from durable.cli.beat import beat
from durable.cli.db import db
from durable.cli.limits import limits
from durable.cli.pause import pause, unpause
from durable.cli.reconcile import reconcile
from durable.cli.repair import fork, purge, resume, retry
from durable.cli.runs import cancel, list_command, show, signal_command, start
from durable.cli.timers import timers

__all__ = ["cli", "load_durable", "main"]


@click.group(
    cls=DurableGroup,
    context_settings={"auto_envvar_prefix": "DURABLE", "help_option_names": ["-h", "--help"]},
)
@app_option
@database_option
@click.version_option(package_name="celery-durable", prog_name="durable")
@click.pass_context
def cli(ctx: click.Context, app: str | None, database_url: str | None) -> None:
    """Operate durable: migrate the store, run the beat, start, inspect and repair workflow runs.

    Commands that only read or write the store need --database-url (or DURABLE_DATABASE_URL);
    commands that start work need the app (--app module:attr or DURABLE_APP).
    """
    ctx.obj = Globals(app, database_url, given(ctx, "database_url"))


for command in (db, beat, start, list_command, show, signal_command, cancel):
    cli.add_command(command)
for command in (resume, retry, fork, purge, pause, unpause, timers, reconcile, limits):
    cli.add_command(command)
# `durable schedule ...` is registered here, by the scheduler's own module:
from durable.cli.schedule import schedule  # noqa: E402 - the group's place among the commands

cli.add_command(schedule)


def main() -> None:
    """Entry point of the ``durable`` console script."""
    cli.main(prog_name="durable")
