"""Control flow of replay, shared by replay, the workflow context and activations."""

from __future__ import annotations

PENDING = frozenset({"queued", "scheduled", "started", "waiting", "ready"})
"""Statuses of a position that has not settled yet."""


class Suspend(BaseException):
    """Ends an activation at a position that has not settled yet.

    A ``BaseException`` so that a workflow's ``except Exception`` cannot swallow it.
    """


class NeedsActivation(BaseException):
    """Ends an in-memory replay at the first thing only a leased activation may do.

    A worker that settles a step replays the run in memory to schedule its next steps in
    the settling statement (see :func:`durable.activation.replay_in_memory`). Writing
    anything else (a local step, a sleep, an event, a signal taken, a child started) or
    reading a time not yet committed needs the real activation, which then runs as before.
    """


class LeaseLost(BaseException):
    """Ends an activation whose write under the run's lease found the lease not its own.

    Another activation took the run over (this one stalled past its lease), or recorded
    the position first. The activation writes nothing more and tries to take the lease
    again: if it still holds it, it replays from the history as it now is; otherwise the
    run is someone else's and it ends.
    """
