"""Control flow of replay, shared by the context and its primitives."""

from __future__ import annotations

PENDING = frozenset({"scheduled", "started", "waiting", "ready"})
"""Statuses of a position that has not settled yet."""


class Suspend(BaseException):
    """Ends an activation at a position that has not settled yet.

    A ``BaseException`` so that a workflow's ``except Exception`` cannot swallow it.
    """
