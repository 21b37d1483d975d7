"""The ``durable`` admin command: migrate the store, run the beat, start and inspect runs.

Each command parses its options, calls the library, and prints a rich table or ``--json``.
Every option can also be set from the environment: ``--app`` and ``--database-url`` read
``DURABLE_APP`` and ``DURABLE_DATABASE_URL`` wherever they appear; any other option reads
``DURABLE_<COMMAND>_<OPTION>`` (``durable list --limit`` reads ``DURABLE_LIST_LIMIT``).

A failing command prints one line, ``durable: <reason>``, on stderr and exits 1; a command
given bad options or arguments exits 2 the same way.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

import click
from celery import Celery
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from durable.beat import Beat
from durable.config import normalise_database_url
from durable.errors import ConfigurationError, DurableError, WorkflowNotFound
from durable.runtime import Durable
from durable.store import engine as store_engine
from durable.store import history, migrate, runs, steps, timers

F = TypeVar("F", bound=Callable[..., Any])

STATUSES = ("running", "completed", "failed", "cancelled")
STATUS_STYLES = {
    "running": "yellow",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
    "scheduled": "cyan",
    "started": "yellow",
    "waiting": "blue",
}
NO_WRAP = {"id", "#", "at", "created", "updated", "completed", "status", "attempts"}
PIPED_WIDTH = 160
# The fields ``durable show --json`` gives for each step and timer.
STEP_FIELDS: tuple[str, ...] = ("seq", "kind", "name", "status", "attempts", "result", "error")
STEP_FIELDS += ("started_at", "completed_at")
TIMER_FIELDS = ("id", "seq", "purpose", "fire_at", "fired_at")
# ``start`` passes these as keywords of its own, so a workflow keyword cannot use them.
RESERVED_KWARGS = ("name_or_fn", "workflow_id")


class CommandFailed(click.ClickException):
    """An error shown as one line, ``durable: <reason>``, on stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    def show(self, file: Any = None) -> None:
        """Print the one-line reason on stderr."""
        click.echo(f"durable: {self.format_message()}", err=True)


class UsageFailed(CommandFailed):
    """Bad options or arguments, shown as one line; exits 2 like click's usage errors."""

    exit_code = 2


def _database_error(exc: SQLAlchemyError) -> CommandFailed:
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    hint = (
        " (has 'durable db upgrade' been run?)" if getattr(orig, "sqlstate", "") == "42P01" else ""
    )
    return CommandFailed(f"database error: {first}{hint}")


class DurableGroup(click.Group):
    """A group whose expected failures end in one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, turning expected errors into :class:`CommandFailed`."""
        try:
            return super().invoke(ctx)
        except CommandFailed:
            raise
        except DurableError as exc:
            raise CommandFailed(str(exc)) from exc
        except SQLAlchemyError as exc:
            raise _database_error(exc) from exc
        except click.UsageError as exc:
            where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx else ""
            raise UsageFailed(exc.format_message().rstrip(".") + where) from exc


@dataclass(frozen=True)
class Globals:
    """The group's options, read by the commands that do not repeat them."""

    app: str | None = None
    database_url: str | None = None
    database_url_given: bool = False


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE


def app_option(fn: F) -> F:
    """The ``--app`` option, also read from ``DURABLE_APP``."""
    return click.option(
        "--app",
        "-A",
        envvar="DURABLE_APP",
        show_envvar=True,
        metavar="MODULE[:ATTR]",
        help="The Celery app (or Durable instance) to load, as module:attr or module.",
    )(fn)


def database_option(fn: F) -> F:
    """The ``--database-url`` option, also read from ``DURABLE_DATABASE_URL``."""
    return click.option(
        "--database-url",
        envvar="DURABLE_DATABASE_URL",
        show_envvar=True,
        metavar="URL",
        help="PostgreSQL URL of the store; given on the command line it wins over --app.",
    )(fn)


def json_option(command: str) -> Callable[[F], F]:
    """The ``--json`` flag of ``command``, also read from ``DURABLE_<COMMAND>_JSON``."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        envvar=f"DURABLE_{command.upper()}_JSON",
        show_envvar=True,
        help="Print JSON instead of tables.",
    )


# -- loading the app ------------------------------------------------------------------------


def _as_durable(obj: Any, spec: str) -> Durable:
    if isinstance(obj, Durable):
        return obj
    if isinstance(obj, Celery):
        return Durable.of(obj)
    raise ConfigurationError(f"{spec!r} is a {type(obj).__name__}, not a Celery app or Durable")


def load_durable(spec: str) -> Durable:
    """Import ``module:attr`` (or ``module``) from the working directory; return its Durable.

    ``attr`` may name a Celery app or a ``Durable`` instance. Given a module alone, the
    ``Durable`` instance it holds is used, else its attribute ``app`` or ``celery``.

    Args:
        spec: ``module:attr`` or ``module``.

    Returns:
        The ``Durable`` of the app.

    Raises:
        ConfigurationError: the module cannot be imported or holds no such app.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app {spec!r}: expected module:attr or module")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import app module {module_name!r}: {exc}") from None
    if attr:
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        return _as_durable(obj, spec)
    found = {id(v): v for v in vars(module).values() if isinstance(v, Durable)}
    if len(found) > 1:
        raise ConfigurationError(f"module {module_name!r} holds several Durable objects; name one")
    if found:
        return next(iter(found.values()))
    for name in ("app", "celery"):
        if hasattr(module, name):
            return _as_durable(getattr(module, name), f"{module_name}:{name}")
    raise ConfigurationError(
        f"module {module_name!r} has no Durable object nor an 'app' or 'celery' attribute"
    )


def _require_app(ctx: click.Context, app: str | None) -> Durable:
    spec = app or (ctx.find_object(Globals) or Globals()).app
    if not spec:
        raise click.UsageError("no app: pass --app module:attr or set DURABLE_APP", ctx)
    return load_durable(spec)


# -- reaching the store ---------------------------------------------------------------------


def _store_url(ctx: click.Context, app: str | None, database_url: str | None) -> tuple[str, int]:
    """The database URL (and connection attempts) for a command that only needs the store.

    Precedence: ``--database-url`` on the command line, then the app's settings, then
    ``DURABLE_DATABASE_URL``.
    """
    top = ctx.find_object(Globals) or Globals()
    if database_url and _given(ctx, "database_url"):
        return database_url, 3
    if top.database_url and top.database_url_given:
        return top.database_url, 3
    spec = app or top.app
    if spec:
        settings = load_durable(spec).settings
        return settings.database_url, settings.connect_retries
    url = database_url or top.database_url
    if not url:
        raise ConfigurationError(
            "no database URL: pass --database-url, set DURABLE_DATABASE_URL, or name the --app"
        )
    return url, 3


def _engine_url(url: str) -> str:
    """``url`` as SQLAlchemy needs it; a malformed one is reported without its password."""
    try:
        target = normalise_database_url(url)
        make_url(target)
    except (ConfigurationError, ArgumentError, ValueError):
        raise ConfigurationError(
            f"not a valid PostgreSQL URL: {store_engine.redact(url)}"
        ) from None
    return target


@contextmanager
def connect(ctx: click.Context, app: str | None, database_url: str | None) -> Iterator[Connection]:
    """An autocommit connection to the store, retried; ``StoreUnavailable`` names the URL."""
    url, attempts = _store_url(ctx, app, database_url)
    engine = store_engine.autocommit(_engine_url(url))
    conn = store_engine.with_retry(url, engine.connect, attempts)
    try:
        yield conn
    finally:
        conn.close()


# -- output ---------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON, datetimes as ISO-8601 strings."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _compact(value: Any, limit: int = 80) -> str:
    if value is None:
        return ""
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _table(*headers: str, title: str | None = None) -> Table:
    """A table whose short columns never wrap and whose long ones fold, never truncate."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, no_wrap=header in NO_WRAP, overflow="fold")
    return table


def _console() -> Console:
    """A console for tables; piped output has no terminal to fit, so rows stay whole."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPED_WIDTH
    return console


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


# -- the commands ---------------------------------------------------------------------------


@click.group(
    cls=DurableGroup,
    context_settings={"auto_envvar_prefix": "DURABLE", "help_option_names": ["-h", "--help"]},
)
@app_option
@database_option
@click.version_option(package_name="celery-durable", prog_name="durable")
@click.pass_context
def cli(ctx: click.Context, app: str | None, database_url: str | None) -> None:
    """Operate durable: migrate the store, run the beat, start and inspect workflow runs.

    Commands that only read or write the store need --database-url (or DURABLE_DATABASE_URL);
    commands that start work need the app (--app module:attr or DURABLE_APP).
    """
    ctx.obj = Globals(app, database_url, _given(ctx, "database_url"))


@cli.group(cls=DurableGroup)
def db() -> None:
    """Manage the store's schema."""


@db.command("upgrade")
@app_option
@database_option
@click.pass_context
def db_upgrade(ctx: click.Context, app: str | None, database_url: str | None) -> None:
    """Apply the store's migrations (safe to run again, and from several hosts at once)."""
    url, attempts = _store_url(ctx, app, database_url)
    target = _engine_url(url)
    store_engine.with_retry(url, lambda: migrate.upgrade(target), attempts)
    click.echo(f"store at {store_engine.redact(url)} is up to date")


@cli.command()
@app_option
@click.option(
    "--sweep-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    show_envvar=True,
    help="Seconds between sweeps of PostgreSQL for overdue timers and lost dispatches.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    show_envvar=True,
    help="Level of the log lines written to stderr.",
)
@click.pass_context
def beat(ctx: click.Context, app: str | None, sweep_interval: float, log_level: str) -> None:
    """Run the timer service and the recovery sweep until SIGTERM or SIGINT.

    Run two or more for availability: every beat fires timers exactly once.
    """
    durable = _require_app(ctx, app)
    _ = durable.settings  # fail now on a missing setting, not later in the loop
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    service = Beat(durable, sweep_interval=sweep_interval)

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("%s received; stopping", signal.Signals(signum).name)
        service.stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store_engine.dispose_all()


def _parse_json(value: str, param: click.Parameter | None, kind: type, label: str) -> Any:
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param=param) from None
    if not isinstance(data, kind):
        raise click.BadParameter(f"must be a JSON {label}, not {value!r}", param=param)
    return data


def _args_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any]:
    return [] if value is None else list(_parse_json(value, param, list, "array"))


def _kwargs_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any]:
    data: dict[str, Any] = {} if value is None else _parse_json(value, param, dict, "object")
    clash = sorted(set(data) & set(RESERVED_KWARGS))
    if clash:
        raise click.BadParameter(f"cannot pass {', '.join(clash)} as keywords", param=param)
    return data


@cli.command()
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
    run = _require_app(ctx, app).start(name, *args, workflow_id=workflow_id, **kwargs)
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


@cli.command("list")
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
    table = _table("id", "name", "status", "created", "updated")
    for row in rows:
        table.add_row(
            Text(row.id),
            Text(row.name),
            _status(row.status),
            _when(row.created_at),
            _when(row.updated_at),
        )
    _console().print(table)


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
        return _compact(detail)
    parts = [f"{k}={_compact(v, 60)}" for k, v in detail.items() if v is not None]
    return " ".join(parts)


def render_run(run: dict[str, Any], console: Console) -> None:
    """Print a run as a header, a steps table and a timeline."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column(overflow="fold")
    header.add_row("workflow", Text(run["id"]))
    header.add_row("name", Text(run["name"]))
    header.add_row("status", _status(run["status"]))
    header.add_row("created", _when(run["created_at"]))
    header.add_row("finished", _when(run["finished_at"]))
    header.add_row("args", Text(_compact(run["args"])))
    header.add_row("kwargs", Text(_compact(run["kwargs"])))
    if run["error"]:
        header.add_row("error", Text(run["error"], style="red"))
    else:
        header.add_row("result", Text(_compact(run["result"])))
    console.print(header)
    columns = ("#", "kind", "name", "status", "attempts", "completed", "result / error")
    table = _table(*columns, title="steps")
    for s in run["steps"]:
        outcome = Text(s["error"], style="red") if s["error"] else Text(_compact(s["result"]))
        table.add_row(
            str(s["seq"]),
            s["kind"],
            Text(s["name"]),
            _status(s["status"]),
            str(s["attempts"]),
            _when(s["completed_at"]),
            outcome,
        )
    console.print(table)
    timeline = _table("at", "#", "event", "detail", title="timeline")
    for h in run["history"]:
        seq = "" if h["seq"] is None else str(h["seq"])
        timeline.add_row(_when(h["at"]), seq, Text(h["event"]), Text(_detail(h["detail"])))
    console.print(timeline)


@cli.command()
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
        render_run(run, _console())


def main() -> None:
    """Entry point of the ``durable`` console script."""
    cli.main(prog_name="durable")


if __name__ == "__main__":
    main()
