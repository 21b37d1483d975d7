"""Engines, one per process and URL, created after fork and retried on connection loss."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from durable.errors import ConfigurationError, StoreUnavailable

T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[tuple[int, str, bool], Engine] = {}


def get_engine(url: str, flush: bool = True) -> Engine:
    """The engine for ``url`` in this process (a forked child gets its own pool).

    With ``flush=False`` its sessions run with ``synchronous_commit = off``: a commit returns
    before its WAL reaches the disk. It is visible to every other session at once, and a
    PostgreSQL crash can lose only the latest such commits, never half of one, in order.
    Durable uses it only for writes whose loss the recovery sweep repairs (see
    ``docs/design.md``), never for a step's result.
    """
    key = (os.getpid(), url, flush)
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
                )
                _engines[key] = engine
    return engine


_autocommit: dict[tuple[int, str, bool], Engine] = {}


def autocommit(url: str, flush: bool = True) -> Engine:
    """An engine whose connections commit each statement on its own (no BEGIN round trip)."""
    key = (os.getpid(), url, flush)
    engine = _autocommit.get(key)
    if engine is None:
        engine = get_engine(url, flush).execution_options(isolation_level="AUTOCOMMIT")
        _autocommit[key] = engine
    return engine


def dispose_all() -> None:
    """Close every pooled connection of this process (tests, shutdown)."""
    with _lock:
        for (pid, _, _), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()
        _autocommit.clear()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


def with_retry(url: str, fn: Callable[[], T], attempts: int = 3, delay: float = 0.5) -> T:
    """Run ``fn``, retrying when the connection fails; then raise :class:`StoreUnavailable`.

    Only connection-level failures are retried: ``fn`` must be safe to run again (each of
    the store's statements is, by its WHERE clause or ON CONFLICT).
    """
    last: Exception | None = None
    for attempt in range(max(attempts, 1)):
        try:
            return fn()
        except OperationalError as exc:
            last = exc
        except ProgrammingError as exc:
            if getattr(getattr(exc, "orig", None), "sqlstate", None) == "42P01":
                raise ConfigurationError(
                    f"the durable tables are missing in {redact(url)}: run `durable db upgrade`"
                ) from None
            raise
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            last = exc
        if attempt + 1 < attempts:
            time.sleep(delay * (2**attempt))
    cause = str(getattr(last, "orig", last) or last).strip().splitlines()[0]
    raise StoreUnavailable(redact(url), cause)
