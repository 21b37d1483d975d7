"""Replay: a workflow's positions, checked against its recorded history.

Every durable operation a workflow performs (a step, a local step, a sleep, a signal wait, an
event, a child workflow) takes the next position in its history. On each activation the
runtime loads the recorded positions in one query and runs the workflow function from the
top:

- a position with a recorded outcome returns it (or raises ``StepFailed``) without running
  anything again;
- a position recorded but not finished (a step in flight, a sleep not over) suspends the
  activation: the workflow is resumed when that position settles;
- the first position with no record runs for real: a remote step is scheduled (written in
  the statement that releases the run's lease) and dispatched after the activation ends; a
  local step runs here and its outcome is committed before the workflow goes on; a sleep
  commits a durable timer.

A recorded position whose kind or name differs from what the code asks for now raises
:class:`~durable.errors.NonDeterminismError`, naming both.

Cancellation is delivered at the first position that has not settled once a cancel was
requested; that position is remembered on the run (``cancelled_at_seq``), so every later
replay raises :class:`~durable.errors.WorkflowCancelled` at the same place, and the positions
after it (compensation) run normally.
"""

from __future__ import annotations

import hashlib
import random as _random
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from durable._control import PENDING, NeedsActivation, Suspend
from durable.effects import Effects
from durable.errors import LimitExceeded, NonDeterminismError, StepFailed, WorkflowCancelled
from durable.store import runs as run_queries
from durable.store import tree as tree_queries
from durable.store.records import StepRecord

if TYPE_CHECKING:
    from durable.core import Core
    from durable.store.runs import Activation


class Replay:
    """A run's history as its workflow function replays it, one position at a time.

    The base of :class:`durable.context.WorkflowContext`: it hands out positions
    (``_take``), checks each against the record there, returns or raises what a settled
    position recorded (``_settled``), delivers a requested cancellation, and keeps the
    workflow's deterministic time, UUIDs and random numbers.
    """

    def __init__(
        self,
        core: Core,
        activation: Activation,
        owner: str = "",
        in_memory: bool = False,
        now_known: bool = True,
    ) -> None:
        self._core = core
        self._in_memory = in_memory
        self.needs_activation = False
        """Set when an in-memory replay met something only an activation may do."""
        self._now_unknown = not now_known  # a run not started yet: its start time is ahead
        self._owner = owner
        self._records: dict[int, StepRecord] = {s.seq: s for s in activation.steps}
        self._last_recorded = max(self._records, default=0)
        self._seq = 0
        self._now: datetime = activation.created_at
        self._seed = hashlib.sha256(activation.workflow_id.encode()).digest()
        self._rng = _random.Random(self._seed)
        self._uuid_count = 0
        self._cancel_requested = activation.cancel_requested
        self._cancelled_at = activation.cancelled_at_seq
        self.cancel_delivered = False
        self.nondeterminism: NonDeterminismError | None = None
        """Set when replay met a mismatch, even if the workflow's code caught the error."""
        self._patches = set(activation.patches)
        self._patch_memo: dict[str, bool] = {}
        self.workflow_id = activation.workflow_id
        """The id of the running workflow."""
        self._workflow_name = activation.name
        self._trace = activation.trace_context
        self.app = core.app
        """The Celery app (for building signatures by name)."""
        self.effects = Effects(activation.workflow_id)
        """What this replay leaves to write and send when it ends."""

    # -- deterministic helpers -------------------------------------------------------------

    def now(self) -> datetime:
        """The workflow's current time, the same on every replay (UTC).

        It is the commit time of the last position reached (or the start of the run), so it
        does not move between two durable operations.
        """
        if self._now_unknown:
            self.require_activation()
        return self._now

    def require_activation(self) -> None:
        """In an in-memory replay, stop: what comes next needs a leased activation."""
        if self._in_memory:
            self.needs_activation = True
            raise NeedsActivation()

    def advance_now(self, moment: datetime | None) -> None:
        """Move :meth:`now` to ``moment`` if later: workflow time never runs backwards."""
        if moment is not None and moment > self._now:
            self._now = moment

    def uuid4(self) -> uuid.UUID:
        """A random-looking UUID that replay reproduces exactly."""
        self._uuid_count += 1
        digest = hashlib.sha256(self._seed + b"uuid" + str(self._uuid_count).encode()).digest()
        return uuid.UUID(bytes=digest[:16], version=4)

    def random(self) -> float:
        """A float in [0, 1) from a generator seeded by the workflow id, replayed exactly."""
        return self._rng.random()

    def patched(self, change_id: str) -> bool:
        """Whether this run takes the new code path of ``change_id`` (Temporal's patching).

        Runs that reached this point before the change was deployed replay the old path
        (False); runs that reach it under the new code take the new path (True) and remember
        it. Example::

            if ctx.patched("send-sms"):
                ctx.step(send_sms, order)      # new code
            else:
                ctx.step(send_email, order)    # what in-flight runs recorded
        """
        if change_id in self._patch_memo:
            return self._patch_memo[change_id]
        if change_id in self._patches:
            decision = True
        elif self._seq < self._last_recorded:
            decision = False  # history goes on past here: it was written by the old code
        else:
            self.require_activation()
            wid, owner = self.workflow_id, self._owner
            self._core.store(lambda c: run_queries.record_patch(c, wid, owner, change_id))
            self._patches.add(change_id)
            decision = True
        self._patch_memo[change_id] = decision
        return decision

    # -- positions ---------------------------------------------------------------------------

    def _take(
        self, kind: str, name: str, check_cancel: bool = True
    ) -> tuple[int, StepRecord | None]:
        self._seq += 1
        seq = self._seq
        record = self._records.get(seq)
        if record is None and seq > self._core.settings.max_steps:
            raise LimitExceeded(self.workflow_id, "max_steps", self._core.settings.max_steps)
        if record is not None and (record.kind != kind or record.name != name):
            self.nondeterminism = NonDeterminismError(
                self.workflow_id, seq, f"{kind} {name}", f"{record.kind} {record.name}"
            )
            raise self.nondeterminism
        if check_cancel:
            self._check_cancel(seq, record)
        if record is not None and record.settled:
            if record.settling:
                self._now_unknown = True  # the step being settled: its commit time is ahead
            else:
                self.advance_now(record.completed_at)
        return seq, record

    def check_cancel(self, seq: int, record: StepRecord | None) -> None:
        """Deliver a requested cancellation at ``seq`` if that is where it lands."""
        self._check_cancel(seq, record)

    def _check_cancel(self, seq: int, record: StepRecord | None) -> None:
        """Raise WorkflowCancelled where the cancellation is (or now gets) delivered."""
        if self.cancel_delivered:
            return
        if self._cancelled_at == seq:
            self.cancel_delivered = True
            raise WorkflowCancelled(self.workflow_id)
        if self._cancel_requested and self._cancelled_at is None:
            if record is not None and record.status not in PENDING:
                return  # settled before the cancel: replays as it happened
            self.require_activation()
            wid, owner = self.workflow_id, self._owner
            self._core.store(lambda c: tree_queries.deliver_cancel(c, wid, owner, seq))
            self._cancelled_at = seq
            self.cancel_delivered = True
            raise WorkflowCancelled(self.workflow_id)

    def check_end(self) -> None:
        """At the function's return: every recorded position must have been reached."""
        if self._last_recorded > self._seq:
            record = self._records[self._seq + 1]
            raise NonDeterminismError(
                self.workflow_id,
                self._seq + 1,
                "the end of the workflow",
                f"{record.kind} {record.name}",
            )

    def _settled(self, seq: int, record: StepRecord) -> Any:
        if record.status == "completed":
            return self._core.decode(record.result)
        if record.status == "failed":
            raise StepFailed(
                self.workflow_id,
                seq,
                record.name,
                self._core.open_error(record.error or ""),
                record.attempts,
            )
        if record.status == "cancelled":
            raise WorkflowCancelled(self.workflow_id)
        raise Suspend()
