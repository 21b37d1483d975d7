"""Leases and heartbeats: how a dead worker's step or activation is found in seconds.

A process that runs a step or a workflow activation holds a lease on its row in PostgreSQL
(``lease_owner``, ``lease_expires_at``). While it holds any, a daemon thread renews all of
them with one statement every third of the lease. A process killed with SIGKILL stops
renewing; ``durable beat`` sees the expired lease and dispatches the work again, long before
the broker would redeliver the unacknowledged message (``visibility_timeout``, an hour on
Redis by default). When that late message does arrive, the step is no longer ``scheduled``
and the message does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

log = logging.getLogger(__name__)


def make_owner_id() -> str:
    """A lease owner id unique to this process: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Renews this process's leases while it holds at least one."""

    def __init__(self, renew: Callable[[str], int], interval: float) -> None:
        self._renew = renew
        self._interval = interval
        self._lock = threading.Lock()
        self._held = 0
        self._pid = 0
        self._owner = ""
        self._tokens = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        """This process's owner id (a forked child gets a new one)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._owner = make_owner_id()
                    self._held = 0
                    self._thread = None
                    self._wake = threading.Event()
                    self._pid = os.getpid()
        return self._owner

    def token(self) -> str:
        """A lease owner for one activation or step run: ``<process owner>#<n>``.

        Leases are per run, not per process, so two threads of one worker can never both
        hold the same workflow; the heartbeat renews every token of the process at once.
        """
        owner = self.owner
        with self._lock:
            self._tokens += 1
            return f"{owner}#{self._tokens}"

    def hold(self) -> None:
        """Count one more lease held; starts the renewing thread if needed."""
        owner = self.owner
        with self._lock:
            self._held += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, args=(owner,), name="durable-heartbeat", daemon=True
                )
                self._thread.start()

    def release(self) -> None:
        """Count one lease fewer."""
        with self._lock:
            self._held = max(0, self._held - 1)

    def _run(self, owner: str) -> None:
        while not self._wake.wait(self._interval):
            with self._lock:
                held = self._held
            if not held:
                continue
            try:
                self._renew(owner)
            except Exception:  # a failed renewal must not kill the thread; the next may work
                log.warning("durable: could not renew leases", exc_info=True)
