"""A position of a run's history as replay reads it: :class:`StepRecord`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One position of a run's history: a step, a sleep, a signal wait, an event...

    Read from ``durable_steps`` by the statement that leases the run (or settles a step),
    as one JSON array; ``result`` is as stored (JSON, or a codec's envelope).
    """

    seq: int
    kind: str
    name: str
    status: str
    attempts: int = 0
    result: Any = None
    error: str | None = None
    completed_at: datetime | None = None
    """When the position was settled; None while it is not."""
    settling: bool = False
    """Settled by the statement being prepared (a step's settle replayed in memory), whose
    commit time is not known yet: ``ctx.now()`` cannot be read past it."""

    @property
    def settled(self) -> bool:
        """Whether the position has a commit time, or is being settled now."""
        return self.settling or self.completed_at is not None

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StepRecord:
        """A record from one element of the history's JSON array."""
        done = value.get("completed_at")
        return cls(
            seq=int(value["seq"]),
            kind=str(value["kind"]),
            name=str(value["name"]),
            status=str(value["status"]),
            attempts=int(value.get("attempts") or 0),
            result=value.get("result"),
            error=value.get("error"),
            completed_at=datetime.fromisoformat(done) if isinstance(done, str) else done,
        )


def records_from_json(value: Any) -> list[StepRecord]:
    """The history's JSON array (text, or already decoded) as records, in order."""
    rows = value if isinstance(value, list) else json.loads(value)
    return [StepRecord.from_json(row) for row in rows]
