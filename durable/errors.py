"""Errors raised by durable.

Every error the library raises on purpose derives from :class:`DurableError`::

    DurableError
    ├── ConfigurationError        settings missing or malformed
    ├── StoreUnavailable          PostgreSQL could not be reached (after retries)
    ├── StoreError                PostgreSQL refused a statement (shown without its values)
    ├── PayloadError              a value is not JSON-serialisable or is over the size limit
    │   └── CodecUnavailable      a stored value is encoded and no configured key opens it
    ├── InvalidIdentifier         a workflow id or name breaks the rules of durable.ids
    ├── InvalidAttributes         run attributes or a filter on them break durable.attributes
    ├── InvalidDuration           a duration is negative, not finite or too long
    ├── UnknownWorkflow           no workflow is registered under that name
    ├── WorkflowNotFound          no run exists with that id
    ├── WorkflowIdConflict        the id exists for a workflow of another name
    ├── WorkflowNotRunning        a signal or cancel for a run that has already ended
    ├── LimitExceeded             a run went over max_steps, max_signals or the signal rate
    ├── WorkflowNotFailed         ``retry`` of a run that has not failed
    ├── WorkflowIdTaken           a new run (``fork``) asked for under an id that exists
    ├── InvalidSchedule           a schedule's definition is malformed (cron, zone, interval)
    ├── ScheduleNotFound          no schedule exists with that name
    ├── InvalidLimit              a ``Limit``'s definition is malformed (also a ValueError)
    ├── LimitKeyError             a limit's key function raised or returned no string
    ├── LimitNotFound             no limit is registered under that name
    ├── NonDeterminismError       replay found another step than the one recorded
    ├── StepFailed                a step exhausted its retries (raised inside the workflow)
    ├── TaskExpired               a step's task was not started before its ``expires``
    ├── WorkflowFailed            ``WorkflowRun.result()`` of a failed run
    ├── WorkflowCancelled         the run was cancelled
    ├── SignalTimeout             ``wait_for_signal`` timed out
    └── ResultTimeout             ``WorkflowRun.result(timeout=...)`` ran out (also a TimeoutError)

Each keeps its facts as attributes so callers need not parse messages.
"""

from __future__ import annotations

from datetime import UTC, datetime


class DurableError(Exception):
    """Root of every error raised by durable."""


class ConfigurationError(DurableError):
    """A setting is missing or malformed."""


class StoreUnavailable(DurableError):
    """PostgreSQL could not be reached, even after retrying."""

    def __init__(self, url: str, cause: str) -> None:
        self.url = url
        self.cause = cause
        super().__init__(f"database unreachable at {url}: {cause}")


class StoreError(DurableError):
    """PostgreSQL refused a statement: a deadlock, a timeout, a value it cannot hold...

    The message names the SQLSTATE and the error's class, and the server's message unless
    it may quote a value (SQLSTATE class 22, data exceptions): values are users' data, and
    this error reaches logs, task events and Flower.
    """

    def __init__(self, sqlstate: str, kind: str, message: str = "") -> None:
        self.sqlstate = sqlstate
        self.kind = kind
        shown = f": {message}" if message else ""
        super().__init__(f"database error {sqlstate} ({kind}){shown}")


class PayloadError(DurableError):
    """A value cannot be stored: not JSON-serialisable, or over the size limit."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class CodecUnavailable(PayloadError):
    """A stored value is encoded, and this process has no codec or key that opens it."""

    def __init__(self, reason: str) -> None:
        super().__init__("stored value", reason)


class InvalidIdentifier(DurableError, ValueError):
    """A workflow id, signal name or event key breaks the rules of :mod:`durable.ids`."""

    def __init__(self, what: str, value: object, reason: str) -> None:
        self.what = what
        self.value = value
        self.reason = reason
        # repr escapes control characters; a value that is not text is named by its type.
        shown = (
            repr(value[:40] + "..." if len(value) > 40 else value) if isinstance(value, str) else ""
        )
        super().__init__(f"{what} {shown}: {reason}" if shown else f"{what}: {reason}")


class InvalidAttributes(DurableError, ValueError):
    """Run attributes, or a filter on them, break the rules of :mod:`durable.attributes`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid attributes: {reason}")


class InvalidDuration(DurableError, ValueError):
    """A duration is negative, not a finite number, or longer than durable can store."""

    def __init__(self, what: str, value: object, reason: str) -> None:
        self.what = what
        self.value = value
        self.reason = reason
        shown = type(value).__name__
        if isinstance(value, (float, str)) or (isinstance(value, int) and value.bit_length() < 64):
            shown = repr(value)[:40]
        super().__init__(f"{what} {shown}: {reason}")


class UnknownWorkflow(DurableError):
    """No workflow is registered under the name."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        self.known = sorted(known or [])
        hint = f" (registered: {', '.join(self.known)})" if self.known else ""
        super().__init__(f"unknown workflow {name!r}{hint}")


class WorkflowNotFound(DurableError):
    """No run exists with the id."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"no workflow run with id {workflow_id!r}")


class WorkflowIdConflict(DurableError):
    """The workflow id is taken by a run of another workflow."""

    def __init__(self, workflow_id: str, existing: str, requested: str) -> None:
        self.workflow_id = workflow_id
        self.existing = existing
        self.requested = requested
        super().__init__(
            f"workflow id {workflow_id!r} belongs to a run of {existing!r}, not {requested!r}"
        )


class WorkflowNotRunning(DurableError):
    """The run has already ended, so it cannot be signalled or cancelled."""

    def __init__(self, workflow_id: str, status: str, action: str) -> None:
        self.workflow_id = workflow_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} workflow {workflow_id!r}: it is already {status}")


class LimitExceeded(DurableError):
    """A run went over one of its limits (``max_steps``, ``max_signals``, signal rate)."""

    def __init__(self, workflow_id: str, limit: str, value: int) -> None:
        self.workflow_id = workflow_id
        self.limit = limit
        self.value = value
        super().__init__(f"workflow {workflow_id!r} is over its limit {limit}={value}")


class WorkflowNotFailed(DurableError):
    """``retry`` was asked of a run that has not failed."""

    def __init__(self, workflow_id: str, status: str) -> None:
        self.workflow_id = workflow_id
        self.status = status
        super().__init__(f"cannot retry workflow {workflow_id!r}: it is {status}, not failed")


class WorkflowIdTaken(DurableError):
    """A new run was asked for under an id that exists already."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"workflow id {workflow_id!r} is taken")


class NonDeterminismError(DurableError):
    """Replay met a different step than the one recorded at that position."""

    def __init__(self, workflow_id: str, step: int, expected: str, recorded: str) -> None:
        self.workflow_id = workflow_id
        self.step = step
        self.expected = expected
        self.recorded = recorded
        super().__init__(
            f"non-determinism in workflow {workflow_id!r} at step {step}: the code now calls "
            f"{expected!r} but the history records {recorded!r}"
        )


class StepFailed(DurableError):
    """A step raised and has no retries left; the workflow may catch it and compensate."""

    def __init__(self, workflow_id: str, step: int, name: str, error: str, attempts: int) -> None:
        self.workflow_id = workflow_id
        self.step = step
        self.name = name
        self.error = error
        self.attempts = attempts
        super().__init__(
            f"step {step} ({name}) of workflow {workflow_id!r} failed after "
            f"{attempts} attempt(s): {error}"
        )


class TaskExpired(DurableError):
    """A step's task was not started before its ``expires`` deadline, so it was not run.

    Celery revokes such a message; durable fails the step (not retried) with this error,
    and the ``durable.task`` workflow raises it when the deadline passed before the step.
    """

    def __init__(self, name: str, expires: datetime) -> None:
        self.name = name
        self.expires = expires
        when = expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        super().__init__(f"task {name} expired: not started by {when}")


class WorkflowFailed(DurableError):
    """The workflow ended in failure; ``error`` holds the recorded reason."""

    def __init__(self, workflow_id: str, error: str) -> None:
        self.workflow_id = workflow_id
        self.error = error
        super().__init__(f"workflow {workflow_id!r} failed: {error}")


class WorkflowCancelled(DurableError):
    """The workflow was cancelled."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"workflow {workflow_id!r} was cancelled")


class SignalTimeout(DurableError):
    """No signal of that name arrived before the timeout."""

    def __init__(self, workflow_id: str, name: str) -> None:
        self.workflow_id = workflow_id
        self.name = name
        super().__init__(f"workflow {workflow_id!r} timed out waiting for signal {name!r}")


class ResultTimeout(DurableError, TimeoutError):
    """``WorkflowRun.result(timeout=...)`` ran out before the run finished."""

    def __init__(self, workflow_id: str, timeout: float, status: str) -> None:
        self.workflow_id = workflow_id
        self.timeout = timeout
        self.status = status
        super().__init__(
            f"workflow {workflow_id!r} still {status} after waiting {timeout:g}s for its result"
        )


class InvalidSchedule(DurableError):
    """A schedule's definition is malformed: cron expression, time zone, interval or policy."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"schedule {name!r}: {reason}" if name else reason)


class ScheduleNotFound(DurableError):
    """No schedule exists with the name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r}")


class InvalidLimit(DurableError, ValueError):
    """A ``Limit``'s definition is malformed: its name, concurrency or priority."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"limit {name!r}: {reason}" if name else f"limit: {reason}")


class LimitKeyError(DurableError):
    """A limit's key function raised, or returned something other than a string."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"limit {name!r}: key function {reason}")


class LimitNotFound(DurableError):
    """No limit is registered under the name (none of its steps was ever admitted)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no limit named {name!r}")
