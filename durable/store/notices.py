"""Waking result waits: PostgreSQL ``LISTEN``/``NOTIFY`` on the run's end and on events.

The statements that end a run (``runs.finish`` and a settle that ends the run,
``steps._SETTLE_END``) send ``NOTIFY durable_ended, '<workflow id>'``, and the one that sets
an event (``signals.set_event``) ``NOTIFY durable_event, '<workflow id>'``, in the
transaction that makes the change: the notice is delivered at its commit, never before it
and never for a change rolled back.

One :class:`Listener` per process and database (a forked child gets its own) holds a
dedicated connection outside the pools, listens on both channels and wakes the
threads waiting on that workflow id. A wait registers *before* it reads the row, so an end
committed after its read always wakes it. A notice is only a hint: the waiter reads the row
again, and also every ``RECHECK`` seconds in case a notice was missed (the listener's
connection lost and opened again; it then wakes every waiter).

Behind PgBouncer in transaction mode (``database_pooler = "pgbouncer"``) no listener is
started: a LISTEN holds to one server connection, which the pooler hands to other clients
between statements, so notices would be lost, and a probe could even succeed by chance.
Waits then poll with back-off, as they did before notices; nothing else changes. Where
``LISTEN`` fails otherwise, the listener's first check fails: it sends itself a probe
notice and gives up if none arrives within ``PROBE_TIMEOUT``; waits poll the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import make_url

from durable.store import engine as store_engine

log = logging.getLogger(__name__)

ENDED = "durable_ended"
"""Channel of run ends; the payload is the workflow id."""
EVENT = "durable_event"
"""Channel of events set; the payload is the workflow id."""

APPLICATION_NAME = "durable-listener"
"""``application_name`` of the listener's connection."""
PROBE_TIMEOUT = 2.0
"""Seconds the listener waits for its own probe notice before deciding LISTEN cannot work."""
RECHECK = 1.0
"""Seconds between re-reads of a waited row while notices work (a missed notice's bound)."""
_RECONNECT_DELAY = 0.5

_lock = threading.Lock()
_listeners: dict[tuple[int, str], Listener] = {}


def notify_sql(channel: str, column: str) -> str:
    """The SQL expression that notifies ``channel`` with ``column`` as payload."""
    return f"pg_notify('{channel}', {column})"


class Waiter:
    """One thread's interest in one workflow id; woken by a notice or a lost connection."""

    def __init__(self, listener: Listener | None, channel: str, workflow_id: str) -> None:
        self._listener = listener
        self._key = (channel, workflow_id)
        self._event = threading.Event()

    @property
    def pushed(self) -> bool:
        """True when notices reach this waiter (else the caller polls)."""
        return self._listener is not None

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a notice; True if one came. Clears it for the next."""
        woken = self._event.wait(max(seconds, 0.0))
        self._event.clear()
        return woken

    def wake(self) -> None:
        """Wake the waiting thread."""
        self._event.set()

    def __enter__(self) -> Waiter:
        if self._listener is not None:
            self._listener.add(self._key, self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._listener is not None:
            self._listener.remove(self._key, self)


class Listener:
    """A daemon thread holding one LISTEN connection, dispatching notices to waiters."""

    def __init__(self, url: str) -> None:
        self._conninfo = _conninfo(url)
        self._waiters: dict[tuple[str, str], set[Waiter]] = {}
        self._guard = threading.Lock()
        self._decided = threading.Event()
        self.works = False
        """Whether notices reach this process; decided once, by the first probe."""
        thread = threading.Thread(target=self._run, name="durable-listener", daemon=True)
        thread.start()

    def ready(self, timeout: float = PROBE_TIMEOUT + 5.0) -> bool:
        """Block until the first probe has decided; True when notices work."""
        self._decided.wait(timeout)
        return self.works

    def add(self, key: tuple[str, str], waiter: Waiter) -> None:
        """Register ``waiter`` for ``key`` (channel, workflow id)."""
        with self._guard:
            self._waiters.setdefault(key, set()).add(waiter)

    def remove(self, key: tuple[str, str], waiter: Waiter) -> None:
        """Unregister ``waiter``."""
        with self._guard:
            found = self._waiters.get(key)
            if found is not None:
                found.discard(waiter)
                if not found:
                    del self._waiters[key]

    def _wake(self, key: tuple[str, str] | None) -> None:
        with self._guard:
            if key is None:
                woken = [w for group in self._waiters.values() for w in group]
            else:
                woken = list(self._waiters.get(key, ()))
        for waiter in woken:
            waiter.wake()

    def _run(self) -> None:
        probed = False
        while True:
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {ENDED}")
                    conn.execute(f"LISTEN {EVENT}")
                    if not probed:
                        self.works = _probe(conn)
                        probed = True
                        self._decided.set()
                        if not self.works:
                            log.info("durable: LISTEN does not work here; result waits poll")
                            return
                    self._wake(None)  # anything missed while (re)connecting
                    self._listen(conn)
            except Exception as exc:
                log.debug("durable: listener connection lost (%s); reconnecting", exc)
                if not probed:
                    probed = True
                    self._decided.set()  # works stays False: poll
                    return
                self._wake(None)
                time.sleep(_RECONNECT_DELAY)

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        while True:
            for note in conn.notifies(timeout=60.0):
                self._wake((note.channel, note.payload))


def _probe(conn: psycopg.Connection[Any]) -> bool:
    token = "probe:" + uuid.uuid4().hex
    conn.execute("SELECT pg_notify(%s, %s)", (ENDED, token))
    deadline = time.monotonic() + PROBE_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        for note in conn.notifies(timeout=left):
            if note.payload == token:
                return True
    return False


def _conninfo(url: str) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    # Named, so that operators (and the bench) tell it apart in pg_stat_activity.
    parsed = parsed.update_query_dict({"application_name": APPLICATION_NAME})
    return parsed.render_as_string(hide_password=False)


def listener(url: str) -> Listener | None:
    """This process's listener for ``url``, started on first use; None if LISTEN fails.

    None at once behind a transaction-mode pooler (see the module's docstring).
    """
    if not store_engine.options(url).session_state:
        return None
    key = (os.getpid(), url)
    found = _listeners.get(key)
    if found is None:
        with _lock:
            found = _listeners.get(key)
            if found is None:
                found = _listeners[key] = Listener(url)
    return found if found.ready() else None


def waiter(url: str, channel: str, workflow_id: str) -> Waiter:
    """A waiter for a notice on ``channel`` about ``workflow_id``; use it as a context."""
    return Waiter(listener(url), channel, workflow_id)
