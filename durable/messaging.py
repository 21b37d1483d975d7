"""Talking to running workflows from outside: signals, events, cancellation.

These are the bodies of ``Durable.signal``, ``Durable.get_event`` and ``Durable.cancel``.
Each writes to PostgreSQL first (the signal is kept, the cancel flag set, the run woken) and
only then sends the activation, so nothing depends on a worker being up at that moment.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from durable.errors import LimitExceeded, WorkflowNotFound, WorkflowNotRunning
from durable.store import runs as run_queries
from durable.store import signals as signal_queries

if TYPE_CHECKING:
    from durable.runtime import Durable


def signal(durable: Durable, workflow_id: str, name: str, payload: Any = None) -> None:
    """Deliver signal ``name`` with ``payload`` to a running workflow."""
    text = durable.encode(payload, f"payload of signal {name!r}")
    settings = durable.settings
    total, per_minute = settings.max_signals, settings.max_signals_per_minute
    sent = durable.store(
        lambda c: signal_queries.send_signal(c, workflow_id, name, text, total, per_minute)
    )
    if sent.status is None:
        raise WorkflowNotFound(workflow_id)
    if sent.signal_id is None and sent.status != "running":
        raise WorkflowNotRunning(workflow_id, sent.status, f"signal {name!r} to")
    if sent.signal_id is None and sent.total >= total:
        raise LimitExceeded(workflow_id, "max_signals", total)
    if sent.signal_id is None:
        raise LimitExceeded(workflow_id, "max_signals_per_minute", per_minute)
    durable.send_activation(workflow_id, sent.workflow)


def get_event(
    durable: Durable, workflow_id: str, key: str, timeout: timedelta | float | None = None
) -> Any:
    """The latest value a workflow published under ``key``, or None.

    With ``timeout`` (seconds or a timedelta) wait up to that long for the key to be set.
    """
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while True:
        row = durable.store(lambda c: signal_queries.get_event(c, workflow_id, key))
        if row is not None:
            return durable.decode(row.value)
        if durable.store(lambda c: run_queries.get_run(c, workflow_id)) is None:
            raise WorkflowNotFound(workflow_id)
        if deadline is None or time.monotonic() >= deadline:
            return None
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 1.5, 0.25)


def cancel(durable: Durable, workflow_id: str) -> list[str]:
    """Ask a running workflow (and its child workflows) to stop; returns the runs flagged.

    The workflow gets :class:`~durable.errors.WorkflowCancelled` at its next step, sleep or
    signal wait, may compensate in ``except``/``finally``, and ends ``cancelled``. A step
    already running finishes and its result is recorded. Cancelling twice is harmless.
    """
    flagged = durable.store(lambda c: run_queries.request_cancel(c, workflow_id))
    if not flagged:
        row = durable.store(lambda c: run_queries.get_run(c, workflow_id))
        if row is None:
            raise WorkflowNotFound(workflow_id)
        if row.status != "running":
            raise WorkflowNotRunning(workflow_id, row.status, "cancel")
    for wid, name in flagged:
        durable.send_activation(wid, name)
    return [wid for wid, _ in flagged]
