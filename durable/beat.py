"""``durable beat``: the timer service and the liveness sweep.

Every beat process, however many run, loops over:

1. **due timers** from the Redis index (claimed atomically by a Lua script), fired in
   PostgreSQL, where ``fired_at IS NULL`` is the exactly-once gate;
2. every ``sweep_interval`` seconds, **the sweep**: rebuild the index if Redis lost it, fire
   timers overdue in PostgreSQL (an entry lost from the index), re-dispatch steps whose
   lease expired (their worker died), steps whose message was never claimed, and runs owed
   an activation.

Each of these takes its rows with a conditional UPDATE (``SKIP LOCKED`` where it scans), so
two beats never act on the same row twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from durable.store import recovery
from durable.store import timers as timer_queries

if TYPE_CHECKING:
    from durable.runtime import Durable

log = logging.getLogger(__name__)


@dataclass
class BeatStats:
    """Counters of what a beat did, for logs and tests."""

    timers_fired: int = 0
    steps_redispatched: int = 0
    activations_resent: int = 0
    index_rebuilds: int = 0
    lateness: list[float] = field(default_factory=list)


class Beat:
    """One beat process's loop; call :meth:`run` (blocking) or :meth:`tick` (tests)."""

    def __init__(
        self, durable: Durable, sweep_interval: float = 1.0, max_wait: float = 0.1
    ) -> None:
        self.durable = durable
        self.sweep_interval = sweep_interval
        self.max_wait = max_wait
        self.stats = BeatStats()
        self._last_sweep = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        """Loop until :attr:`stopping` is set (SIGTERM/SIGINT in the CLI)."""
        log.info("durable beat started")
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("durable beat: iteration failed; retrying")
                self.stopping.wait(1.0)
                continue
            self.stopping.wait(self._wait())
        log.info("durable beat stopped")

    def _wait(self) -> float:
        try:
            nxt = self.durable.timer_index.next_fire()
        except Exception:
            return self.max_wait
        if nxt is None:
            return self.max_wait
        return min(max(nxt - time.time(), 0.0), self.max_wait)

    def tick(self) -> None:
        """Fire due timers; sweep when the sweep interval has passed."""
        self.fire_due()
        if time.monotonic() - self._last_sweep >= self.sweep_interval:
            self.sweep()
            self._last_sweep = time.monotonic()

    def fire_due(self) -> int:
        """Fire the timers the Redis index says are due."""
        fired = 0
        while True:
            ids = self.durable.timer_index.claim_due(time.time(), 500)
            if not ids:
                return fired
            fired += self._fire(ids)

    def _fire(self, ids: list[int]) -> int:
        with self.durable.connect() as conn:
            fired = timer_queries.fire_timers(conn, ids)
        for timer in fired:
            self.stats.lateness.append(timer.lateness)
            self.durable.after_timer(timer)
        self.stats.timers_fired += len(fired)
        del self.stats.lateness[:-1000]
        return len(fired)

    def sweep(self) -> None:
        """Repair what the fast path may have missed; see the module docstring."""
        durable = self.durable
        index = durable.timer_index
        if not index.is_built():
            with durable.connect() as conn:
                pending = timer_queries.pending_timers(conn)
            count = index.rebuild(pending)
            self.stats.index_rebuilds += 1
            log.info("durable beat: rebuilt the timer index from PostgreSQL (%d timers)", count)
        after = durable.settings.redispatch_after.total_seconds()
        with durable.connect() as conn:
            overdue = timer_queries.overdue_timers(conn, grace=1.0)
            expired = recovery.expire_step_leases(conn)
            stale = recovery.stale_scheduled_steps(conn, after)
            owed = recovery.owed_activations(conn, after)
        if overdue:
            self._fire(overdue)
        durable.enforce_step_deadlines()
        for d in [*expired, *stale]:
            durable.send_step(d.workflow_id, d.seq, d.name, d.options)
        for wid in owed:
            durable.send_activation(wid)
        self.stats.steps_redispatched += len(expired) + len(stale)
        self.stats.activations_resent += len(owed)
        if expired or stale or owed:
            log.info(
                "durable beat: re-sent %d step(s) with expired leases, %d unclaimed step(s), "
                "%d owed activation(s)",
                len(expired),
                len(stale),
                len(owed),
            )
