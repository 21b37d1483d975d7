"""OpenTelemetry tracing: a run's trace context, and the spans of starts, activations and steps.

Tracing is the optional extra ``celery-durable[otel]`` (``opentelemetry-api``); without it
every function here does nothing. With the API alone the spans are the API's no-op spans;
the application installs the SDK, its ``TracerProvider`` and exporters, as it would for any
instrumented library. The tracer is named ``durable``.

- ``durable.start`` (and ``start_many``) opens a span ``durable.start <workflow>`` under the
  caller's current span and records that span's context on the run (W3C ``traceparent`` and
  ``tracestate``, the global propagator's carrier), in the statement that creates the run. A
  child workflow inherits its parent run's context.
- Each run of the workflow's code (an activation, or the in-memory replay of an eager start
  or of a worker settling a step) is a span ``durable.activation <workflow>``, and each step
  attempt (remote, or ``local=True``) a span ``durable.step <step>``. Their parent is the
  run's recorded context, or the current span where that is already in the run's trace (a
  local step's activation, the step whose settle replays the run, Celery's instrumentation
  of the message), so a run is one trace however many workers and crashes it spans. A
  step's span is the current span while its body runs: what the task traces nests under it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any

try:
    from opentelemetry import propagate, trace
except ImportError:  # the extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

TRACER_NAME = "durable"

WORKFLOW_NAME = "durable.workflow.name"
WORKFLOW_ID = "durable.workflow.id"
STEP_SEQ = "durable.step.seq"
STEP_NAME = "durable.step.name"
STEP_KIND = "durable.step.kind"
STEP_ATTEMPT = "durable.step.attempt"
STEP_OUTCOME = "durable.step.outcome"
ACTIVATION_OUTCOME = "durable.activation.outcome"
ACTIVATION_IN_MEMORY = "durable.activation.in_memory"

FAILED_OUTCOMES = frozenset({"failed", "retrying"})
"""Outcomes whose span has status error."""

Carrier = dict[str, str]
"""A trace context as the propagator writes it: ``traceparent`` and maybe ``tracestate``."""


class Span:
    """What the code traced tells its span: the outcome, or the exception that ended it.

    Does nothing when tracing is off.
    """

    def __init__(self, span: Any = None, outcome_key: str = STEP_OUTCOME) -> None:
        self._span = span
        self._key = outcome_key

    def outcome(self, outcome: str, error: str | None = None) -> None:
        """Record how the traced work ended; a failure sets the span's status to error."""
        if self._span is None or trace is None:
            return
        self._span.set_attribute(self._key, outcome)
        if outcome in FAILED_OUTCOMES:
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, error or outcome))

    def exception(self, exc: BaseException, sealed: bool = False) -> None:
        """Record an exception the traced work raised (as a span event).

        ``sealed``: errors are stored encoded (a codec with ``encode_errors``), so the span
        gets the exception's type only, never its message or traceback.
        """
        if self._span is None:
            return
        if sealed:
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
            self._span.add_event("exception", {"exception.type": kind})
        else:
            self._span.record_exception(exc)


@cache
def _tracer() -> Any:
    """The ``durable`` tracer, made once: the API's proxy follows a provider set later."""
    return trace.get_tracer(TRACER_NAME)


def _context(carrier: Mapping[str, str] | None) -> Any:
    """The parent of a run's span (None: the current span).

    The current span if it is in the run's trace, else the run's recorded context; the
    current span when the run recorded none. So a span nests under what already traces the
    same run in this process (a step's span under Celery's instrumentation of its message,
    a local step under its activation), and starts from the run's own context anywhere else
    (a worker after a crash).
    """
    if trace is None or not carrier:
        return None
    recorded = propagate.extract(dict(carrier))
    run_trace = trace.get_current_span(recorded).get_span_context()
    current = trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_id == run_trace.trace_id:
        return None
    return recorded


def current_carrier() -> Carrier | None:
    """The current trace context as a carrier, or None when there is none to record."""
    if trace is None:
        return None
    carrier: Carrier = {}
    propagate.inject(carrier)
    return carrier or None


@contextmanager
def start_span(workflow_name: str, workflow_id: str | None = None) -> Iterator[Carrier | None]:
    """A ``durable.start`` span under the caller's; yields its context to record on the run."""
    if trace is None:
        yield None
        return
    attributes: dict[str, str] = {WORKFLOW_NAME: workflow_name}
    if workflow_id is not None:
        attributes[WORKFLOW_ID] = workflow_id
    with _tracer().start_as_current_span(f"durable.start {workflow_name}", attributes=attributes):
        yield current_carrier()


@contextmanager
def activation_span(
    workflow_name: str, workflow_id: str, carrier: Mapping[str, str] | None, in_memory: bool
) -> Iterator[Span]:
    """A run of the workflow's code, child of the run's recorded trace context."""
    if trace is None:
        yield Span()
        return
    attributes: dict[str, Any] = {
        WORKFLOW_NAME: workflow_name,
        WORKFLOW_ID: workflow_id,
        ACTIVATION_IN_MEMORY: in_memory,
    }
    with _tracer().start_as_current_span(
        f"durable.activation {workflow_name}",
        context=_context(carrier),
        attributes=attributes,
        record_exception=True,
    ) as span:
        yield Span(span, ACTIVATION_OUTCOME)


@contextmanager
def step_span(
    workflow_name: str | None,
    workflow_id: str,
    seq: int,
    step_name: str,
    attempt: int,
    carrier: Mapping[str, str] | None,
    kind: str = "task",
) -> Iterator[Span]:
    """One attempt of a step, child of the run's recorded trace context, current meanwhile."""
    if trace is None:
        yield Span()
        return
    attributes: dict[str, Any] = {
        WORKFLOW_ID: workflow_id,
        STEP_SEQ: seq,
        STEP_NAME: step_name,
        STEP_KIND: kind,
        STEP_ATTEMPT: attempt,
    }
    if workflow_name is not None:
        attributes[WORKFLOW_NAME] = workflow_name
    # An exception leaving the block is not recorded: the caller records the body's own
    # (``Span.exception``, which honours sealed errors) and sets the status from the outcome.
    with _tracer().start_as_current_span(
        f"durable.step {step_name}",
        context=_context(carrier),
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield Span(span)
