"""One connection pool per process and database, created after fork, retried on loss.

Every connection durable opens to a database in one process comes from one pool (plus the
result-wait listener's, :mod:`durable.store.notices`): at most ``pool_size`` connections,
opened on demand and kept. Its connections are in autocommit once, when opened; the
engines handed out are views of that one pool:

- :func:`autocommit` — each statement commits on its own (no ``BEGIN`` round trip);
- :func:`autocommit` with ``flush=False`` — the same, with ``synchronous_commit = off``;
- :func:`get_engine` — explicit transactions (``READ COMMITTED``), switched at checkout.

Nothing relies on session state except the unflushed mode, a session ``SET`` on a direct
connection, which is not used at all behind a transaction-mode pooler (see
:func:`configure`). A pool's key holds the process id: a forked child opens its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from durable import redaction
from durable.config import POOLERS
from durable.errors import ConfigurationError, StoreError, StoreUnavailable

T = TypeVar("T")

APPLICATION_NAME = "durable:{pid}"
"""``application_name`` of the pool's connections (unless the URL names one): pg_stat_activity
tells which process holds each."""
_UNFLUSHED = "durable_unflushed"  # an execution option, and a key of a connection's info
POOL_TIMEOUT = 30.0
"""Seconds a thread waits for a connection when all ``pool_size`` are in use."""


@dataclass(frozen=True)
class PoolOptions:
    """How this process connects to one database (see :func:`configure`)."""

    pool_size: int = 10
    """Most connections the process holds to the database at once."""
    pooler: str | None = None
    """``"pgbouncer"`` when a transaction-mode pooler stands in front of the server."""

    @property
    def session_state(self) -> bool:
        """Whether session state (prepared statements, SET, LISTEN) lasts between transactions.

        It does on a direct connection, not behind a transaction-mode pooler.
        """
        return self.pooler is None


@dataclass
class _Pool:
    options: PoolOptions
    base: Engine
    views: dict[str, Engine]


_lock = threading.Lock()
_options: dict[str, PoolOptions] = {}
_pools: dict[tuple[int, str], _Pool] = {}


def configure(url: str, pool_size: int = 10, pooler: str | None = None) -> None:
    """Set how this process connects to ``url``; a pool made with other options is replaced.

    Behind ``pooler="pgbouncer"`` (transaction mode) psycopg never prepares statements
    (``prepare_threshold=None``), no startup ``options`` are sent, nothing is written
    unflushed, and result waits poll instead of listening (:mod:`durable.store.notices`).

    Raises:
        ConfigurationError: ``pooler`` is not one of :data:`POOLERS`, or ``pool_size`` < 1.
    """
    if pooler is not None and pooler not in POOLERS:
        raise ConfigurationError(f"database_pooler must be one of {POOLERS}, not {pooler!r}")
    if pool_size < 1:
        raise ConfigurationError(f"pool_size must be positive, not {pool_size}")
    wanted = PoolOptions(pool_size, pooler)
    with _lock:
        if _options.get(url, PoolOptions()) == wanted:
            _options[url] = wanted
            return
        _options[url] = wanted
        stale = _pools.pop((os.getpid(), url), None)
    if stale is not None:
        stale.base.dispose()


def options(url: str) -> PoolOptions:
    """How this process connects to ``url`` (the defaults unless :func:`configure` said)."""
    return _options.get(url, PoolOptions())


def _pool(url: str) -> _Pool:
    key = (os.getpid(), url)
    found = _pools.get(key)
    if found is None:
        with _lock:
            found = _pools.get(key)
            if found is None:
                found = _pools[key] = _create(url, options(url))
    return found


def _create(url: str, opts: PoolOptions) -> _Pool:
    connect_args: dict[str, object] = {"connect_timeout": 5}
    if "application_name" not in make_url(url).query:
        connect_args["application_name"] = APPLICATION_NAME.format(pid=os.getpid())
    if not opts.session_state:
        # A prepared statement lives in one server connection; the pooler hands the next
        # transaction another one.
        connect_args["prepare_threshold"] = None
    base = create_engine(
        url,
        pool_size=opts.pool_size,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
        pool_recycle=1800,
        pool_use_lifo=True,  # the most recently used connection first
        connect_args=connect_args,
        # Set once per connection, when opened: the common path (a statement that commits
        # by itself) pays no switch at checkout. Transactions switch (client side only).
        isolation_level="AUTOCOMMIT",
        # Errors must not carry a statement's values (a step's result, a payload) into
        # logs, task events and Flower.
        hide_parameters=True,
    )
    if opts.session_state:
        event.listen(base, "engine_connect", _set_flush_mode)
    views: dict[str, Engine] = {
        "transaction": base.execution_options(isolation_level="READ COMMITTED"),
        "unflushed": base.execution_options(**{_UNFLUSHED: opts.session_state}),
    }
    return _Pool(opts, base, views)


def _set_flush_mode(conn: Connection) -> None:
    """Give the checked-out connection the ``synchronous_commit`` its engine asks for.

    The mode is a session setting, remembered in the pooled connection's ``info`` and sent
    only when it changes, so a connection used unflushed is flushed again before any other
    use takes it.
    """
    unflushed = bool(conn.get_execution_options().get(_UNFLUSHED, False))
    info = conn.connection.info
    if bool(info.get(_UNFLUSHED, False)) == unflushed:
        return
    driver: Any = conn.connection.dbapi_connection
    statement = f"SET synchronous_commit = {'off' if unflushed else 'DEFAULT'}"
    try:
        if driver.autocommit:
            driver.execute(statement)
        else:  # a transaction view: not inside the transaction it is about to begin
            driver.autocommit = True
            try:
                driver.execute(statement)
            finally:
                driver.autocommit = False
    except psycopg.Error as exc:
        conn.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, psycopg.Error, connection_invalidated=True
        ) from exc
    info[_UNFLUSHED] = unflushed


def get_engine(url: str) -> Engine:
    """The engine of explicit transactions on ``url``, over this process's one pool.

    ``with engine.connect() as conn, conn.begin(): ...`` commits at the end of the block;
    a forked child gets its own pool.
    """
    return _pool(url).views["transaction"]


def autocommit(url: str, flush: bool = True) -> Engine:
    """The engine whose statements each commit on their own (no BEGIN round trip).

    With ``flush=False`` a commit returns before its WAL reaches the disk: it is visible
    to every other session at once, and a PostgreSQL crash can lose only the latest such
    commits, never half of one, in order. Durable uses it only for writes whose loss the
    recovery sweep repairs (see ``docs/design.md``), never for a step's result. Behind a
    pooler it is flushed like the rest (the mode would be session state).
    """
    found = _pool(url)
    return found.base if flush else found.views["unflushed"]


def engines(url: str) -> list[Engine]:
    """The engine of this process's pool for ``url``, to listen on (its views share it)."""
    return [_pool(url).base]


def dispose_all() -> None:
    """Close every pooled connection of this process (tests, shutdown)."""
    with _lock:
        for (pid, _), found in list(_pools.items()):
            if pid == os.getpid():
                found.base.dispose()
        _pools.clear()


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
    CONFLICT). Any other database error is raised at once, as it is. A pool whose every
    connection stayed in use for :data:`POOL_TIMEOUT` is reported as ``StoreUnavailable``
    naming ``pool_size``, without waiting again.
    """
    last: Exception | None = None
    for attempt in range(max(attempts, 1)):
        try:
            return fn()
        except PoolTimeout:
            size = options(url).pool_size
            raise StoreUnavailable(
                redact(url),
                f"no connection of this process's pool of {size} came free within "
                f"{POOL_TIMEOUT:g} s; raise pool_size",
            ) from None
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
    raise unavailable(url, last)


def unavailable(url: str, exc: BaseException | None) -> StoreUnavailable:
    """The one-line :class:`StoreUnavailable` for a connection failure ``exc`` on ``url``.

    Its first line only, with the URL's password redacted wherever it appears.
    """
    cause = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0]
    return StoreUnavailable(redact(url), redaction.redact_text(cause, [url]))
