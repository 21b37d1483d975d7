"""What a replay of a workflow leaves to do once its writes are committed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from durable.store.steps import NewStep


@dataclass
class PendingDispatch:
    """A step committed as scheduled during replay, to be sent once the activation ends."""

    seq: int
    name: str
    options: dict[str, Any]


@dataclass
class Effects:
    """What an activation must write when it ends, and do once that is committed."""

    workflow_id: str
    schedules: list[NewStep] = field(default_factory=list)
    dispatches: list[PendingDispatch] = field(default_factory=list)
    timers: list[tuple[int, float]] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    """Workflow names of runs in ``activations``, where known (to label the messages)."""
