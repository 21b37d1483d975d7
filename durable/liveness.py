"""Leases and heartbeats: how a dead worker's step or activation is found in seconds.

A process that runs a step or a workflow activation holds a lease on its row in PostgreSQL
(``lease_owner``, ``lease_expires_at``), under a token of its own per step run or
activation. While it holds any, a daemon thread renews them with one statement every third
of the lease: only the tokens still held (:meth:`Heartbeat.hold` until
:meth:`Heartbeat.release`), so a lease its work gave up on (a settle that failed, a
workflow no worker here knows) is no longer renewed and expires. A process killed with SIGKILL stops
renewing; ``durable beat`` sees the expired lease and dispatches the work again, long before
the broker would redeliver the unacknowledged message (``visibility_timeout``, an hour on
Redis by default). When that late message does arrive, the step is no longer ``scheduled``
and the message does nothing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def make_owner_id() -> str:
    """A lease owner id unique to this process: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Deferred:
    """A call the heartbeat thread makes at a set time unless it is cancelled first.

    Either the heartbeat thread runs it or the owner cancels it, never both, and never
    while the other is half-way: :meth:`settle` waits for a call under way to end.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self.state = "pending"
        """``pending``, then ``done`` (ran; see :attr:`value`), ``error`` or ``cancelled``."""
        self.value: Any = None

    def run(self) -> None:
        """Make the call now if it is still pending."""
        with self._lock:
            if self.state != "pending":
                return
            try:
                self.value = self._fn()
                self.state = "done"
            except Exception:
                log.warning("durable: a deferred call failed", exc_info=True)
                self.state = "error"

    def settle(self) -> str:
        """Cancel the call unless it ran; returns the final state (never ``pending``)."""
        with self._lock:
            if self.state == "pending":
                self.state = "cancelled"
            return self.state


class Heartbeat:
    """Renews this process's leases while it holds at least one.

    The same thread also makes the calls of :meth:`defer` when they fall due.
    """

    def __init__(self, renew: Callable[[list[str]], int], interval: float) -> None:
        self._renew = renew
        self._interval = interval
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._pid = 0
        self._owner = ""
        self._tokens = 0
        self._wake = threading.Event()
        self._kick = threading.Event()
        self._due: list[tuple[float, int, Deferred]] = []
        self._order = itertools.count()
        self._sleeps_until = 0.0
        self._thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        """This process's owner id (a forked child gets a new one)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._owner = make_owner_id()
                    self._held = {}
                    self._thread = None
                    self._wake = threading.Event()
                    self._kick = threading.Event()
                    self._due = []
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

    def hold(self, token: str) -> None:
        """Renew the leases of ``token`` until it is released; starts the thread if needed."""
        _ = self.owner  # a forked child starts with none of its parent's tokens
        with self._lock:
            self._held[token] = self._held.get(token, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="durable-heartbeat", daemon=True
                )
                self._thread.start()

    def release(self, token: str) -> None:
        """Stop renewing ``token``'s leases (once each hold of it is released)."""
        with self._lock:
            left = self._held.get(token, 0) - 1
            if left > 0:
                self._held[token] = left
            else:
                self._held.pop(token, None)

    def held(self) -> list[str]:
        """The tokens whose leases are renewed now."""
        with self._lock:
            return sorted(self._held)

    def defer(self, at: float, fn: Callable[[], Any]) -> Deferred:
        """Have the heartbeat thread call ``fn`` at ``at`` (``time.monotonic()``).

        Unless the returned :class:`Deferred` is settled first. Call it while holding a
        lease (:meth:`hold`), which keeps the thread running.
        """
        _ = self.owner  # a forked child starts with none of its parent's calls
        deferred = Deferred(fn)
        with self._lock:
            heapq.heappush(self._due, (at, next(self._order), deferred))
            kick = at < self._sleeps_until
        if kick:
            self._kick.set()
        return deferred

    def _run(self) -> None:
        renew_at = time.monotonic() + self._interval
        while not self._wake.is_set():
            with self._lock:
                # Most calls are settled long before they fall due: drop those first, so that
                # the thread does not wake for them.
                while self._due and self._due[0][2].state != "pending":
                    heapq.heappop(self._due)
                until = min(renew_at, self._due[0][0]) if self._due else renew_at
                self._sleeps_until = until
            if self._kick.wait(max(until - time.monotonic(), 0.0)):
                self._kick.clear()
            now = time.monotonic()
            for deferred in self._take_due(now):
                deferred.run()
            if now < renew_at:
                continue
            renew_at = now + self._interval
            held = self.held()
            if not held:
                continue
            try:
                self._renew(held)
            except Exception:  # a failed renewal must not kill the thread; the next may work
                log.warning("durable: could not renew leases", exc_info=True)

    def _take_due(self, now: float) -> list[Deferred]:
        with self._lock:
            due = []
            while self._due and self._due[0][0] <= now:
                due.append(heapq.heappop(self._due)[2])
            return due
