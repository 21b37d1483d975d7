"""The app the tracing test runs in real worker processes (``celery -A tests.apps.otel_app``).

A worker started with ``OTEL_SPANS_FILE`` installs the OpenTelemetry SDK with an exporter
that appends each finished span, as one JSON line, to that file: the worker's prefork
children export synchronously (``SimpleSpanProcessor``), so a span is on disk once it ends,
and a worker killed mid-step leaves the spans it finished before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from durable import Durable, current_step
from tests.apps.crash_app import build as build_crash_app


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object a line (see :func:`span_record`)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(span)) + "\n" for span in spans)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the test reads of a span: ids as hex, attributes, status and the process."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "pid": os.getpid(),
    }


def build(database_url: str, redis_url: str, prefix: str) -> tuple[Celery, Durable]:
    """The crash tests' app (its ``crash.slow`` step runs long the first time) and:

    ``otel.flow``: a task that makes a span of its own, a local step, the slow step (the one
    a test kills), then a child workflow with one step. ``otel.pair``: two remote steps.
    """
    app, durable = build_crash_app(database_url, redis_url, prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    tracer = trace.get_tracer("tests.otel_app")

    @app.task(name="otel.traced", shared=False)
    def traced(order: str) -> str:
        with tracer.start_as_current_span("inside the task") as span:
            span.set_attribute("order", order)
            span.set_attribute("idempotency_key", str(current_step().idempotency_key))
        return f"traced {order}"

    def local_part(order: str) -> str:
        client.incr(f"{prefix}:count:local-part")
        return f"local {order}"

    @app.task(name="otel.leaf", shared=False)
    def leaf(order: str) -> str:
        return f"leaf {order}"

    @durable.workflow("otel.child")
    def child(ctx: Any, order: str) -> str:
        return str(ctx.step(leaf, order))

    @durable.workflow("otel.pair")
    def pair(ctx: Any, order: str) -> list[str]:
        return [ctx.step(traced, order), ctx.step(leaf, order)]

    @durable.workflow("otel.flow")
    def flow(ctx: Any, order: str, seconds: float) -> list[str]:
        done = [ctx.step(traced, order), ctx.step(local_part, order, local=True)]
        done.append(ctx.step(app.tasks["crash.slow"], seconds))
        done.append(ctx.child("otel.child", order))
        return done

    return app, durable


def install_exporter(path: str) -> None:
    """Install the SDK in this process, exporting every span to ``path`` as it ends."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)


def instrument_celery(**_: Any) -> None:
    """Celery's own OpenTelemetry instrumentation, in each pool process as its docs say."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()


if os.environ.get("CRASH_PREFIX"):
    if os.environ.get("OTEL_SPANS_FILE"):
        install_exporter(os.environ["OTEL_SPANS_FILE"])
    if os.environ.get("OTEL_CELERY"):
        worker_process_init.connect(instrument_celery, weak=False)
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["CRASH_PREFIX"],
    )
