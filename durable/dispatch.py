"""The messages durable sends: their task names, ids, routing and headers.

Two tasks carry every message, and neither carries a value (arguments and results live in
PostgreSQL): ``durable.activate`` (a workflow id) replays a run, ``durable.step`` (a workflow
id and a step number) runs one step as the user's task. This module builds their send
options; :meth:`durable.core.Core.send_step` and ``send_activation`` send them.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

ACTIVATE_TASK = "durable.activate"
STEP_TASK = "durable.step"

ROUTING_OPTIONS = ("queue", "routing_key", "exchange", "priority")
"""The options of a task or signature that route its step's message."""

SENT_AT_HEADER = "durable_sent_at"
"""Message header of a step's first dispatch: its send time (epoch seconds)."""

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


def routing_options(read: Mapping[str, Any] | Callable[[str], Any]) -> dict[str, Any]:
    """The routing options that are set, read from a mapping or by a getter (a task's)."""
    get = read.get if isinstance(read, Mapping) else read
    found = {key: get(key) for key in ROUTING_OPTIONS}
    return {key: value for key, value in found.items() if value is not None}


def activation_options(workflow_id: str, name: str | None, queue: str | None) -> dict[str, Any]:
    """Send options of an activation: labelled with the workflow, on ``queue`` if set."""
    options: dict[str, Any] = {"shadow": f"workflow {name or ''}[{workflow_id}]".strip()}
    if queue:
        options["queue"] = queue
    options["task_id"] = task_id(workflow_id, "activation")
    return options


def step_options(
    workflow_id: str, seq: int, name: str, options: dict[str, Any], first: bool
) -> dict[str, Any]:
    """Send options of a step: routed like the user's task ``name``, labelled, time-limited.

    ``options`` are the step's stored options; ``first`` stamps the send time (a first
    dispatch, see :mod:`durable.runner`).
    """
    send = routing_options(options)
    send["route_name"] = name
    send["shadow"] = options.get("label") or f"{name}[{workflow_id}#{seq}]"
    send["argsrepr"] = repr((workflow_id, seq))
    send["task_id"] = task_id(workflow_id, str(seq))
    timeout = options.get("timeout")
    if timeout:
        # Celery's own limits stop the body where the pool can (prefork); the beat's
        # deadline sweep fails the attempt either way.
        send["soft_time_limit"] = float(timeout)
        send["time_limit"] = float(timeout) + TIME_LIMIT_GRACE
    if first:
        send["headers"] = {SENT_AT_HEADER: time.time()}
    return send
