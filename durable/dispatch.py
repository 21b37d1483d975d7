"""The messages durable sends: their task names, ids, routing and headers.

No message carries a value (arguments and results live in PostgreSQL). ``durable.activate``
(a workflow id) replays a run. A step is sent as its task's own message, under the task's
name, whose one argument is the keyword ``durable_step``: a label ``"<workflow id>#<step
number>"`` (see :mod:`durable.stepmessage` for how a worker runs it). ``durable.step`` (a
workflow id and a step number), the step message of earlier versions, is still run for
messages left in queues. This module builds the send options;
:meth:`durable.core.Core.send_step` and ``send_activation`` send them.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

ACTIVATE_TASK = "durable.activate"
STEP_TASK = "durable.step"

ROUTING_OPTIONS = ("queue", "routing_key", "exchange", "priority")
"""The options of a task or signature that route its step's message."""

STEP_KWARG = "durable_step"
"""The one keyword argument of a step message: ``"<workflow id>#<step number>"``."""

SENT_AT_HEADER = "durable_sent_at"
"""Message header of a step's first dispatch when the step is its run's one open position:
its send time (epoch seconds). Its first delivery may run the step unclaimed."""

TIME_LIMIT_GRACE = 5.0
"""Seconds between a step's soft time limit (its ``timeout``) and Celery's hard kill."""

# Characters a Celery task id may not carry legibly into Flower's links and search.
_NOT_IN_TASK_ID = re.compile(r"[^\w.:@/-]")


def task_id(workflow_id: str, what: str) -> str:
    """A legible, unique Celery task id: ``<workflow id>:<what>:<8 hex>``.

    ``what`` is the step number or ``activation``; the suffix tells two messages for the
    same step (a re-send, a retry) apart. Characters that would break Flower's links become
    ``_``. Example: ``order-o-1:3:5f2a9c1e``.
    """
    return f"{_NOT_IN_TASK_ID.sub('_', workflow_id)}:{what}:{uuid.uuid4().hex[:8]}"


def step_label(workflow_id: str, seq: int) -> str:
    """The value of ``durable_step`` in a step message."""
    return f"{workflow_id}#{seq}"


def parse_step_label(value: Any) -> tuple[str, int] | None:
    """The (workflow id, step number) of a ``durable_step`` value, or None if malformed."""
    if not isinstance(value, str):
        return None
    workflow_id, sep, seq = value.rpartition("#")
    if not sep or not workflow_id or not seq.isdigit() or len(seq) > 9:
        return None
    return workflow_id, int(seq)


def routing_options(read: Mapping[str, Any] | Callable[[str], Any]) -> dict[str, Any]:
    """The routing options that are set, read from a mapping or by a getter (a task's)."""
    get = read.get if isinstance(read, Mapping) else read
    found = {key: get(key) for key in ROUTING_OPTIONS}
    return {key: value for key, value in found.items() if value is not None}


def expiry(expires: Any, start: datetime) -> float | None:
    """A Celery ``expires`` as epoch seconds; None when there is none.

    Seconds or a timedelta count from ``start``; a datetime (naive: UTC) or its ISO-8601
    string is a moment.
    """
    if expires is None:
        return None
    if isinstance(expires, str):
        expires = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    if isinstance(expires, datetime):
        return (expires if expires.tzinfo else expires.replace(tzinfo=UTC)).timestamp()
    if isinstance(expires, timedelta):
        expires = expires.total_seconds()
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return start.timestamp() + float(expires)
    raise ValueError(f"expires must be seconds, a timedelta or a datetime, not {expires!r}")


def activation_options(workflow_id: str, name: str | None, queue: str | None) -> dict[str, Any]:
    """Send options of an activation: on ``queue`` if set, its columns naming the run.

    Every activation has one task name, so Flower's task names stay few; its args column
    shows the workflow id and its kwargs column the workflow's name.
    """
    options: dict[str, Any] = {"argsrepr": repr([workflow_id]), "ignore_result": True}
    if name:
        options["kwargsrepr"] = repr({"workflow": name})
    if queue:
        options["queue"] = queue
    options["task_id"] = task_id(workflow_id, "activation")
    return options


def step_options(
    workflow_id: str,
    seq: int,
    name: str,
    options: dict[str, Any],
    first: bool,
) -> dict[str, Any]:
    """Send options of a step: the task ``name``'s message, routed as the step was.

    ``options`` are the step's stored options; ``first`` stamps the send time (a first
    dispatch, see :mod:`durable.runner`); ``expires`` (epoch seconds, stored with the step)
    becomes the message's Celery ``expires``. The task's own options (time limits, rate
    limit, acks_late, ignore_result) are applied by the worker, as for any message of that
    task.
    """
    send = routing_options(options)
    send["task_id"] = task_id(workflow_id, str(seq))
    send["headers"] = {}
    timeout = options.get("timeout")
    if timeout:
        # Celery's own limits stop the body where the pool can (prefork); the beat's
        # deadline sweep fails the attempt either way. Without a timeout the task's own
        # soft_time_limit / time_limit apply.
        send["soft_time_limit"] = float(timeout)
        send["time_limit"] = float(timeout) + TIME_LIMIT_GRACE
    expires = options.get("expires")
    if expires is not None:
        # The worker revokes the message past it, as Celery does (stepmessage fails the step).
        send["expires"] = datetime.fromtimestamp(float(expires), UTC)
    if first:
        send["headers"][SENT_AT_HEADER] = time.time()
    if not send["headers"]:
        del send["headers"]
    return send
