"""What every ``durable`` command shares: options, loading the app, reaching the store, output.

Errors: a :class:`CommandFailed` is printed as one line, ``durable: <reason>``, on stderr and
exits 1; a :class:`UsageFailed` (bad options or arguments) exits 2 the same way.
:class:`DurableGroup` turns the library's expected errors into these.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click
from celery import Celery
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from durable import admin, durations
from durable.config import normalise_database_url, read_setting
from durable.errors import ConfigurationError, DurableError, InvalidDuration, InvalidIdentifier
from durable.ids import check_id, escape, escape_json
from durable.runtime import Durable
from durable.store import engine as store_engine

F = TypeVar("F", bound=Callable[..., Any])

STATUSES = ("running", "completed", "failed", "cancelled")
STATUS_STYLES = {
    "running": "yellow",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
    "queued": "blue",
    "scheduled": "cyan",
    "started": "yellow",
    "waiting": "blue",
    "ready": "cyan",
    "timeout": "red",
    "failed, retrying": "red",
    "worker lost": "red",
}
NO_WRAP = {"id", "#", "at", "created", "updated", "completed", "status", "attempts"}
PIPED_WIDTH = 160


MAX_INT = 2**31 - 1
"""Largest whole number an option accepts (PostgreSQL's integer)."""


class Seconds(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.2
    """A number of seconds: finite, not negative (positive with ``positive``), at most a century."""

    name = "seconds"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """``value`` as float seconds, or a usage error naming what is wrong."""
        if isinstance(value, float):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:40]!r} is not a number of seconds", param, ctx)
        try:
            return durations.checked("value", number, positive=self.positive)
        except InvalidDuration as exc:
            self.fail(f"{str(value)[:40]!r} {exc.reason}", param, ctx)


class CommandFailed(click.ClickException):
    """An error shown as one line, ``durable: <reason>``, on stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(escape(" ".join(message.split())))

    def show(self, file: Any = None) -> None:
        """Print the one-line reason on stderr."""
        click.echo(f"durable: {self.format_message()}", err=True)


class UsageFailed(CommandFailed):
    """Bad options or arguments, shown as one line; exits 2 like click's usage errors."""

    exit_code = 2


def _database_error(exc: SQLAlchemyError) -> CommandFailed:
    orig = getattr(exc, "orig", None) or exc
    if isinstance(exc, DBAPIError):  # without the values the statement was given
        first = str(store_engine.refused(exc))
    else:
        first = "database error: " + (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    hint = (
        " (has 'durable db upgrade' been run?)" if getattr(orig, "sqlstate", "") == "42P01" else ""
    )
    return CommandFailed(f"{first}{hint}")


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


def duration_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> timedelta | None:
    """A duration option (90s, 30m, 12h, 1d12h) as a timedelta; a usage error names a bad one."""
    if value is None:
        return None
    try:
        return admin.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not by default or env)."""
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


def limit_option(default: int, help: str) -> Callable[[F], F]:
    """A ``--limit`` option: a whole number, at least 1, with ``default``."""
    return click.option(
        "--limit",
        type=click.IntRange(min=1, max=MAX_INT),
        default=default,
        show_default=True,
        show_envvar=True,
        help=help,
    )


def json_option(command: str, instead_of: str = "tables") -> Callable[[F], F]:
    """The ``--json`` flag of ``command``, also read from ``DURABLE_<COMMAND>_JSON``."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        envvar=f"DURABLE_{command.upper().replace(' ', '_')}_JSON",
        show_envvar=True,
        help=f"Print JSON instead of {instead_of}.",
    )


# -- loading the app ------------------------------------------------------------------------


def _as_durable(obj: Any, spec: str) -> Durable:
    if isinstance(obj, Durable):
        return obj
    if isinstance(obj, Celery):
        return Durable.of(obj)
    raise ConfigurationError(f"{spec!r} is a {type(obj).__name__}, not a Celery app or Durable")


def _find_durable(module: Any, module_name: str, attr: str, spec: str) -> Durable:
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


def load_durable(spec: str) -> Durable:
    """Import ``module:attr`` (or ``module``) from the working directory; return its Durable.

    ``attr`` may name a Celery app or a ``Durable`` instance. Given a module alone, the
    ``Durable`` instance it holds is used, else its attribute ``app`` or ``celery``. The
    app's own modules (its ``include`` and ``imports``) are imported too, as a worker does,
    so that the workflows they define are registered.

    Args:
        spec: ``module:attr`` or ``module``.

    Returns:
        The ``Durable`` of the app.

    Raises:
        ConfigurationError: the module, or one the app includes, cannot be imported, or it
            holds no such app.
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
    durable = _find_durable(module, module_name, attr, spec)
    try:
        durable.app.loader.import_default_modules()
    except ImportError as exc:
        raise ConfigurationError(f"app {spec!r}: cannot import its modules: {exc}") from None
    return durable


def require_app(ctx: click.Context, app: str | None) -> Durable:
    """The Durable of ``--app`` (the command's or the group's); a usage error without one."""
    spec = app or (ctx.find_object(Globals) or Globals()).app
    if not spec:
        raise click.UsageError("no app: pass --app module:attr or set DURABLE_APP", ctx)
    return load_durable(spec)


# -- reaching the store ---------------------------------------------------------------------


def store_url(ctx: click.Context, app: str | None, database_url: str | None) -> tuple[str, int]:
    """The database URL (and connection attempts) for a command that only needs the store.

    Precedence: ``--database-url`` on the command line, then the app's settings, then
    ``DURABLE_DATABASE_URL``.
    """
    top = ctx.find_object(Globals) or Globals()
    if database_url and given(ctx, "database_url"):
        return _configured(database_url), 3
    if top.database_url and top.database_url_given:
        return _configured(top.database_url), 3
    spec = app or top.app
    if spec:
        settings = load_durable(spec).settings
        return settings.database_url, settings.connect_retries
    url = database_url or top.database_url
    if not url:
        raise ConfigurationError(
            "no database URL: pass --database-url, set DURABLE_DATABASE_URL, or name the --app"
        )
    return _configured(url), 3


def _configured(url: str) -> str:
    """``url``, its pool set from ``DURABLE_POOL_SIZE`` and ``DURABLE_DATABASE_POOLER``."""
    target = engine_url(url)
    pool_size = read_setting("pool_size")
    store_engine.configure(target, pool_size, read_setting("database_pooler"))
    return url


def engine_url(url: str) -> str:
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
    url, attempts = store_url(ctx, app, database_url)
    engine = store_engine.autocommit(engine_url(url))
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
    click.echo(escape_json(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default)))


def echo(message: str, err: bool = False) -> None:
    """Print one line, its control and bidirectional characters escaped (``durable.ids``)."""
    click.echo(escape(message), err=err)


def report(as_json: bool, line: str, data: Any) -> None:
    """Print ``data`` as JSON under ``--json``, else the one ``line`` that says it."""
    if as_json:
        print_json(data)
    else:
        echo(line)


def _safe(cell: Any) -> Any:
    if isinstance(cell, str):
        return escape(cell)
    if isinstance(cell, Text) and escape(cell.plain) != cell.plain:
        return Text(escape(cell.plain), style=cell.style)
    return cell


class SafeTable(Table):
    """A rich table whose text cells are shown with control characters escaped.

    Ids, names, values and error messages come from users; ESC or a bidi override in one
    must reach the terminal as text, not as a command to it.
    """

    def add_row(self, *renderables: Any, **options: Any) -> None:
        """Add a row, each ``str`` or ``Text`` cell escaped."""
        super().add_row(*(_safe(cell) for cell in renderables), **options)


def when(value: datetime | None) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS`` in UTC; empty for None."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def compact(value: Any, limit: int = 80) -> str:
    """A value as short text: strings as they are, anything else as JSON, cut at ``limit``."""
    if value is None:
        return ""
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def make_table(*headers: str, title: str | None = None) -> Table:
    """A table whose short columns never wrap and whose long ones fold, never truncate."""
    table = SafeTable(title=title)
    for header in headers:
        table.add_column(header, no_wrap=header in NO_WRAP, overflow="fold")
    return table


def console() -> Console:
    """A console for tables; piped output has no terminal to fit, so rows stay whole."""
    shown = Console()
    if not shown.is_terminal and not os.environ.get("COLUMNS"):
        shown.width = PIPED_WIDTH
    return shown


def status_text(status: str) -> Text:
    """A status, coloured."""
    return Text(status, style=STATUS_STYLES.get(status, ""))


def check_id_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback: ``value`` (an id or name) checked by :func:`durable.ids.check_id`."""
    if value is None:
        return None
    try:
        return check_id(value, (param.name or "value").replace("_", " "))
    except InvalidIdentifier as exc:
        raise click.BadParameter(exc.reason, ctx, param) from None


def parse_json(value: str, param: click.Parameter | None, kind: type, label: str) -> Any:
    """``value`` parsed as JSON of type ``kind`` (a ``label``), else a usage error."""
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param=param) from None
    except RecursionError:
        raise click.BadParameter("JSON nested too deeply to read", param=param) from None
    if not isinstance(data, kind):
        raise click.BadParameter(f"must be a JSON {label}, not {value!r}", param=param)
    return data
