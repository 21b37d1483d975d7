"""Engines, one per process and URL, created after fork and retried on connection loss."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from durable import redaction
from durable.errors import ConfigurationError, StoreError, StoreUnavailable

T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[tuple[int, str, bool, bool], Engine] = {}


def _engine(url: str, flush: bool, autocommit: bool) -> Engine:
    key = (os.getpid(), url, flush, autocommit)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                connect_args: dict[str, object] = {"connect_timeout": 5}
                if not flush:
                    connect_args["options"] = "-c synchronous_commit=off"
                engine = create_engine(
                    url,
                    pool_size=5,
                    max_overflow=10,
                    pool_recycle=1800,
                    connect_args=connect_args,
                    # Set once per connection, not at every checkout: an engine derived with
                    # execution_options(isolation_level=...) switches the level on each
                    # checkout and back on each return, which costs more CPU than a
                    # one-row statement.
                    isolation_level="AUTOCOMMIT" if autocommit else None,
                    # Errors must not carry a statement's values (a step's result, a
                    # payload) into logs, task events and Flower.
                    hide_parameters=True,
                )
                _engines[key] = engine
    return engine


def get_engine(url: str, flush: bool = True) -> Engine:
    """The engine for ``url`` in this process (a forked child gets its own pool).

    With ``flush=False`` its sessions run with ``synchronous_commit = off``: a commit returns
    before its WAL reaches the disk. It is visible to every other session at once, and a
    PostgreSQL crash can lose only the latest such commits, never half of one, in order.
    Durable uses it only for writes whose loss the recovery sweep repairs (see
    ``docs/design.md``), never for a step's result.
    """
    return _engine(url, flush, autocommit=False)


def autocommit(url: str, flush: bool = True) -> Engine:
    """An engine whose connections commit each statement on its own (no BEGIN round trip).

    Its pool is its own: its connections are put in autocommit once, when they are opened.
    """
    return _engine(url, flush, autocommit=True)


def engines(url: str) -> list[Engine]:
    """Every engine of this process for ``url`` (each flush mode, autocommit or not)."""
    return [_engine(url, flush, auto) for flush in (True, False) for auto in (True, False)]


def dispose_all() -> None:
    """Close every pooled connection of this process (tests, shutdown)."""
    with _lock:
        for (pid, _, _, _), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (see :mod:`durable.redaction`)."""
    return redaction.redact(url)


# SQLSTATEs of a connection lost or refused: class 08 (connection exception), the server
# shutting down or being restarted (57P01-57P03), and too many clients at connect time.
_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def is_connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection failed (worth retrying), not the statement.

    A deadlock, a statement timeout, a value PostgreSQL refuses or a program limit is an
    answer from a working server: running the statement again the same way gives the same
    answer, so it is reported as it is. An error with no SQLSTATE comes from the client
    library before the server answered (connection refused, DNS, a socket closed).
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return state is None or str(state).startswith(_CONNECTION_STATES)


def refused(exc: DBAPIError) -> StoreError:
    """A :class:`StoreError` for a refused statement, without the values it was given.

    SQLAlchemy's message holds the statement (and, unless hidden, its parameters) and the
    server's own may quote a value (``invalid input syntax for type json: "..."``) or a
    key (``DETAIL: Key (id)=(...)``): only the SQLSTATE, the class and, outside the data
    exceptions of class 22, the first line of the server's message are kept.
    """
    orig = getattr(exc, "orig", None) or exc
    state = str(getattr(orig, "sqlstate", None) or "?????")
    diag = getattr(orig, "diag", None)
    primary = str(getattr(diag, "message_primary", "") or "")
    shown = "" if state.startswith("22") else " ".join(primary.split())[:200]
    return StoreError(state, type(orig).__name__, shown)


def with_retry(url: str, fn: Callable[[], T], attempts: int = 3, delay: float = 0.5) -> T:
    """Run ``fn``, retrying when the connection fails; then raise :class:`StoreUnavailable`.

    Only connection-level failures are retried (:func:`is_connection_failure`): ``fn`` must
    be safe to run again (each of the store's statements is, by its WHERE clause or ON
    CONFLICT). Any other database error is raised at once, as it is.
    """
    last: Exception | None = None
    for attempt in range(max(attempts, 1)):
        try:
            return fn()
        except ProgrammingError as exc:
            if getattr(getattr(exc, "orig", None), "sqlstate", None) == "42P01":
                raise ConfigurationError(
                    f"the durable tables are missing in {redact(url)}: run `durable db upgrade`"
                ) from None
            raise refused(exc) from None
        except DBAPIError as exc:
            if not is_connection_failure(exc):
                raise refused(exc) from None
            last = exc
        if attempt + 1 < attempts:
            time.sleep(delay * (2**attempt))
    cause = str(getattr(last, "orig", last) or last).strip().splitlines()[0]
    raise StoreUnavailable(redact(url), redaction.redact_text(cause, [url]))
