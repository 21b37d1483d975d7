"""OpenTelemetry tracing: one trace from ``start()`` through every step, crashes included.

The test process exports to the SDK's in-memory exporter; worker processes
(``tests/apps/otel_app.py``) append their spans to a JSON-lines file the test reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from durable import Durable, RetryPolicy, StepFailed
from durable.beat import Beat
from tests.conftest import ROOT, Background, Workers, clean_keys, clean_tables, query, wait_until

pytest.importorskip("opentelemetry.sdk", reason="the otel extra's SDK is not installed")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tests.apps.otel_app import build, span_record


class Switchable(SimpleSpanProcessor):
    """Exports while ``on``: a global provider cannot drop a processor after this module."""

    on = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            super().on_end(span)


@pytest.fixture(scope="module")
def memory() -> Iterator[InMemorySpanExporter]:
    """The in-memory exporter of this process's spans (the SDK installed once)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    processor = Switchable(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.on = False
    exporter.clear()


@pytest.fixture
def spans(memory: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    memory.clear()
    yield memory
    memory.clear()


def local_spans(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [span_record(span) for span in exporter.get_finished_spans()]


def file_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def named(found: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in found if span["name"] == name]


def step_spans(found: list[dict[str, Any]], workflow_id: str, seq: int) -> list[dict[str, Any]]:
    return [
        span
        for span in found
        if span["name"].startswith("durable.step ")
        and span["attributes"]["durable.workflow.id"] == workflow_id
        and span["attributes"]["durable.step.seq"] == seq
    ]


def trace_of(database_url: str, workflow_id: str) -> Any:
    (row,) = query(
        database_url, "SELECT trace_context FROM durable_workflows WHERE id = :id", id=workflow_id
    )
    return row.trace_context


@pytest.fixture
def worker_env() -> dict[str, str]:
    """What the worker processes' environment adds (a test may add to it first)."""
    return {}


@pytest.fixture
def traced_workers(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path, worker_env: dict[str, str]
) -> Iterator[tuple[Durable, Workers, Path]]:
    clean_tables(database_url)
    spans_file = tmp_path / "spans.jsonl"
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CRASH_PREFIX": prefix,
        "OTEL_SPANS_FILE": str(spans_file),
        "PYTHONPATH": str(ROOT),
        **worker_env,
    }
    _, durable = build(database_url, redis_url, prefix)
    workers = Workers(env, tmp_path, "tests.apps.otel_app")
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        yield durable, workers, spans_file
    finally:
        beat.stopping.set()
        thread.join(5)
        workers.stop_all()
        clean_keys(redis_url, prefix)


def test_one_trace_from_start_through_every_step_and_the_rerun_after_a_sigkill(
    traced_workers: tuple[Durable, Workers, Path],
    spans: InMemorySpanExporter,
    database_url: str,
    redis_url: str,
    prefix: str,
) -> None:
    durable, workers, spans_file = traced_workers
    first = workers.start("first")
    tracer = trace.get_tracer("tests.caller")
    with tracer.start_as_current_span("caller") as caller:
        run = durable.start("otel.flow", "o-1", 30, workflow_id="traced")
    caller_ctx = caller.get_span_context()
    trace_id = f"{caller_ctx.trace_id:032x}"
    (start,) = named(local_spans(spans), "durable.start otel.flow")
    assert start["parent_id"] == f"{caller_ctx.span_id:016x}"
    assert start["trace_id"] == trace_id
    assert start["attributes"]["durable.workflow.id"] == "traced"
    # The run records the start span's context, written by the start's own statement.
    recorded = trace_of(database_url, "traced")
    assert recorded["traceparent"].startswith(f"00-{trace_id}-{start['span_id']}-")

    # Kill the worker while the slow step (position 3) runs, once it holds a claim.
    slow_runs = redis.Redis.from_url(redis_url, decode_responses=True)
    wait_until(
        lambda: slow_runs.get(f"{prefix}:count:slow") == "1", timeout=60, what="the slow step"
    )
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = 'traced' AND seq = 3 "
            "AND status = 'started' AND attempts = 1",
        ),
        timeout=60,
        what="the slow step's claim",
    )
    workers.kill(first)
    workers.start("second")
    assert run.result(timeout=90) == [
        "traced o-1",
        "local o-1",
        "done on run 2",
        "leaf o-1",
    ]

    # The run's end is committed inside its last activation's span, which ends just after.
    def ended(span: dict[str, Any]) -> bool:
        attributes = span["attributes"]
        return (
            span["name"] == "durable.activation otel.flow"
            and attributes.get("durable.activation.outcome") == "completed"
        )

    wait_until(
        lambda: any(ended(s) for s in file_spans(spans_file)), what="the last activation's span"
    )
    found = local_spans(spans) + file_spans(spans_file)
    durable_spans = [s for s in found if s["name"].startswith("durable.")]
    assert {s["trace_id"] for s in found if s["name"] != "caller"} == {trace_id}
    # The run's spans hang from the start span: directly where nothing of the run's trace
    # was current (a worker taking a message), else under the span that was (a local step
    # under its activation, the in-memory replay of a settle under its step).
    by_id = {span["span_id"]: span for span in durable_spans}
    for span in durable_spans:
        parent = by_id.get(span["parent_id"])
        attributes = span["attributes"]
        if span["span_id"] == start["span_id"]:
            continue
        if attributes.get("durable.step.kind") == "local":
            assert parent is not None and parent["name"] == "durable.activation otel.flow"
            assert parent["attributes"]["durable.activation.in_memory"] is False
        elif attributes.get("durable.activation.in_memory") and parent != start:
            assert parent is not None and parent["name"].startswith("durable.step "), span
            assert parent["pid"] == span["pid"]
        else:
            assert span["parent_id"] == start["span_id"], span

    (traced,) = step_spans(found, "traced", 1)
    assert traced["name"] == "durable.step otel.traced"
    assert traced["attributes"] == {
        "durable.workflow.name": "otel.flow",
        "durable.workflow.id": "traced",
        "durable.step.seq": 1,
        "durable.step.name": "otel.traced",
        "durable.step.kind": "task",
        "durable.step.attempt": 1,
        "durable.step.outcome": "completed",
    }
    # What the task traced is a child of its step's span.
    (inside,) = named(found, "inside the task")
    assert inside["parent_id"] == traced["span_id"]
    assert inside["attributes"] == {"order": "o-1", "idempotency_key": "traced:1"}

    (local,) = step_spans(found, "traced", 2)
    assert local["attributes"]["durable.step.kind"] == "local"
    assert local["attributes"]["durable.step.outcome"] == "completed"

    # The killed attempt never ended; the re-run's is in the same trace, attempt 2, on the
    # second worker.
    (rerun,) = step_spans(found, "traced", 3)
    assert rerun["attributes"]["durable.step.attempt"] == 2
    assert rerun["attributes"]["durable.step.outcome"] == "completed"
    assert rerun["trace_id"] == trace_id
    assert rerun["pid"] not in (os.getpid(), traced["pid"])

    # The child run inherited the trace: its step and its activations are in it.
    assert trace_of(database_url, "traced/4") == recorded
    (leaf,) = step_spans(found, "traced/4", 1)
    assert leaf["attributes"]["durable.workflow.name"] == "otel.child"
    activations = [s for s in durable_spans if s["name"].startswith("durable.activation ")]
    by_run = {(s["attributes"]["durable.workflow.id"]) for s in activations}
    assert by_run == {"traced", "traced/4"}
    assert len([s for s in activations if ended(s)]) == 1


@pytest.fixture
def celery_instrumented(worker_env: dict[str, str]) -> Iterator[None]:
    """Celery's own OpenTelemetry instrumentation, here and in the worker processes."""
    instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.celery",
        reason="opentelemetry-instrumentation-celery is not installed",
    )
    worker_env["OTEL_CELERY"] = "1"
    instrumentor = instrumentation.CeleryInstrumentor()
    instrumentor.instrument()
    try:
        yield
    finally:
        instrumentor.uninstrument()


def test_celery_instrumentation_and_the_steps_nest_in_one_trace(
    celery_instrumented: None,
    traced_workers: tuple[Durable, Workers, Path],
    spans: InMemorySpanExporter,
) -> None:
    durable, workers, spans_file = traced_workers
    workers.start("instrumented")
    with trace.get_tracer("tests.caller").start_as_current_span("caller") as caller:
        run = durable.start("otel.pair", "o-2", workflow_id="pair")
    assert run.result(timeout=60) == ["traced o-2", "leaf o-2"]
    # Celery's span of the last step's message ends after the step's settle ended the run.
    wait_until(
        lambda: named(file_spans(spans_file), "run/otel.leaf"), what="Celery's last task span"
    )
    found = local_spans(spans) + file_spans(spans_file)
    assert {s["trace_id"] for s in found} == {f"{caller.get_span_context().trace_id:032x}"}

    def one(name: str) -> dict[str, Any]:
        (span,) = named(found, name)
        return span

    start = one("durable.start otel.pair")
    # The first step's message is published under the start span (Celery's instrumentation
    # in the caller), its run in the worker under that, and the step's span under its run;
    # what the task traces under the step's span.
    assert one("apply_async/otel.traced")["parent_id"] == start["span_id"]
    assert one("run/otel.traced")["parent_id"] == one("apply_async/otel.traced")["span_id"]
    assert one("durable.step otel.traced")["parent_id"] == one("run/otel.traced")["span_id"]
    assert one("inside the task")["parent_id"] == one("durable.step otel.traced")["span_id"]
    # The next step is sent by the first one's settle, inside its span.
    traced_step = one("durable.step otel.traced")
    assert one("apply_async/otel.leaf")["parent_id"] == traced_step["span_id"]
    assert one("run/otel.leaf")["parent_id"] == one("apply_async/otel.leaf")["span_id"]
    assert one("durable.step otel.leaf")["parent_id"] == one("run/otel.leaf")["span_id"]


def failing_workflows(app: Celery, durable: Durable, redis_url: str, prefix: str) -> None:
    """``tr.flaky`` (fails its first attempt, then succeeds) and ``tr.fail`` (always fails)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    @app.task(name="tr.flaky", shared=False)
    def flaky(secret: str) -> str:
        if int(client.incr(f"{prefix}:count:flaky")) == 1:
            raise RuntimeError(f"first attempt fails with {secret}")
        return "ok"

    @app.task(name="tr.fail", shared=False)
    def fail(secret: str) -> None:
        raise LookupError(f"always fails with {secret}")

    @durable.workflow("tr.failing")
    def failing(ctx: Any, secret: str) -> str:
        first = ctx.step(flaky, secret, retry=RetryPolicy(max_attempts=2, initial_interval=0))
        try:
            ctx.step(fail, secret, retry=RetryPolicy(max_attempts=1))
        except StepFailed:
            return f"{first}, then compensated"
        return "not reached"


def test_failed_attempts_are_errors_and_start_many_shares_one_trace(
    durable: Durable,
    app: Celery,
    worker: Any,
    beat: Any,
    spans: InMemorySpanExporter,
    redis_url: str,
    prefix: str,
    database_url: str,
) -> None:
    failing_workflows(app, durable, redis_url, prefix)
    tracer = trace.get_tracer("tests.caller")
    with tracer.start_as_current_span("caller") as caller:
        runs = durable.start_many("tr.failing", [("s-1",), ("s-2",)], workflow_ids=["m-1", "m-2"])
    assert [run.result(timeout=60) for run in runs] == ["ok, then compensated"] * 2
    trace_id = caller.get_span_context().trace_id

    def step_spans_ended() -> list[Any]:
        return [s for s in spans.get_finished_spans() if s.name.startswith("durable.step ")]

    # A run's end is committed by its last step's settle, inside that step's span: wait for
    # the five attempts' spans (two flaky ones, one each succeeding, two failing) to end.
    wait_until(lambda: len(step_spans_ended()) == 5, what="every attempt's span")
    finished = spans.get_finished_spans()
    (start,) = [s for s in finished if s.name == "durable.start tr.failing"]
    assert start.parent is not None and start.parent.span_id == caller.get_span_context().span_id
    # Both runs record the one start span's context.
    assert trace_of(database_url, "m-1") == trace_of(database_url, "m-2")
    assert f"{start.context.span_id:016x}" in trace_of(database_url, "m-1")["traceparent"]
    steps = [s for s in finished if s.name.startswith("durable.step ")]
    assert {s.context.trace_id for s in steps} == {trace_id}
    assert {s.parent.span_id for s in steps if s.parent} == {start.context.span_id}

    def attempts(wid: str, seq: int) -> list[tuple[int, str, str]]:
        found = [
            s
            for s in steps
            if s.attributes["durable.workflow.id"] == wid
            and s.attributes["durable.step.seq"] == seq
        ]
        return sorted(
            (
                int(s.attributes["durable.step.attempt"]),
                str(s.attributes["durable.step.outcome"]),
                s.status.status_code.name,
            )
            for s in found
        )

    flaky_runs = sorted(attempts("m-1", 1) + attempts("m-2", 1))
    # One of the two runs' flaky step failed its first attempt (the counter is shared).
    assert flaky_runs == [
        (1, "completed", "UNSET"),
        (1, "retrying", "ERROR"),
        (2, "completed", "UNSET"),
    ]
    for wid in ("m-1", "m-2"):
        assert attempts(wid, 2) == [(1, "failed", "ERROR")]
    (failed,) = [
        s
        for s in steps
        if s.attributes["durable.workflow.id"] == "m-1" and s.attributes["durable.step.seq"] == 2
    ]
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "LookupError"
    assert "always fails with s-1" in str(event.attributes["exception.message"])


def test_a_sealing_codec_keeps_error_messages_out_of_spans(
    database_url: str, redis_url: str, prefix: str, spans: InMemorySpanExporter
) -> None:
    from celery.contrib.testing.worker import start_worker
    from cryptography.fernet import Fernet as KeyMaker

    from durable.codec import Fernet
    from tests.conftest import make_app

    clean_tables(database_url)
    app, durable = make_app(
        database_url, redis_url, prefix, codec=Fernet(keys=[KeyMaker.generate_key()])
    )

    @app.task(name="tr.secret", shared=False)
    def secret(value: str) -> None:
        raise LookupError(f"card {value} declined")

    def local_secret(value: str) -> None:
        raise KeyError(f"card {value} unknown")

    @durable.workflow("tr.sealed")
    def sealed(ctx: Any, value: str) -> str:
        for fn, local in ((secret, False), (local_secret, True)):
            with contextlib.suppress(StepFailed):
                ctx.step(fn, value, local=local, retry=RetryPolicy(max_attempts=1))
        return "done"

    try:
        with start_worker(
            app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
        ):
            assert durable.start("tr.sealed", "4111").result(timeout=60) == "done"
    finally:
        clean_keys(redis_url, prefix)
    failed = [s for s in spans.get_finished_spans() if s.name.startswith("durable.step ")]
    assert sorted(s.attributes["durable.step.kind"] for s in failed) == ["local", "task"]
    for span in failed:
        assert span.status.status_code.name == "ERROR"
        (event,) = span.events
        assert event.name == "exception"
        assert dict(event.attributes or {}).keys() == {"exception.type"}
        assert "4111" not in json.dumps(span_record(span))


def test_without_opentelemetry_tracing_is_off_and_runs_record_no_context(
    database_url: str, redis_url: str, prefix: str
) -> None:
    """With the extra absent (``opentelemetry`` not importable) durable starts runs as ever."""
    clean_tables(database_url)
    script = f"""
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from durable import tracing
assert tracing.trace is None
from tests.conftest import make_app
app, durable = make_app({database_url!r}, {redis_url!r}, {prefix!r})

@durable.workflow("tr.plain")
def plain(ctx, x):
    return ctx.step(lambda y: y + 1, x, local=True)

durable.start("tr.plain", 1, workflow_id="no-otel")
print("started")
"""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        clean_keys(redis_url, prefix)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"
    assert query(database_url, "SELECT name FROM durable_workflows WHERE id = 'no-otel'")
    assert trace_of(database_url, "no-otel") is None


def test_a_delayed_start_records_the_trace_its_run_continues(
    durable: Durable,
    app: Celery,
    worker: Any,
    beat: Any,
    spans: InMemorySpanExporter,
    database_url: str,
) -> None:
    @app.task(name="tr.later", shared=False)
    def later(x: int) -> int:
        return x * 2

    @durable.workflow("tr.delayed")
    def delayed_flow(ctx: Any, x: int) -> int:
        return int(ctx.step(later, x))

    with trace.get_tracer("tests.caller").start_as_current_span("caller") as caller:
        run = durable.start("tr.delayed", 21, workflow_id="later-1", countdown=0.2)
    (start,) = [s for s in spans.get_finished_spans() if s.name == "durable.start tr.delayed"]
    recorded = trace_of(database_url, "later-1")
    assert recorded["traceparent"].startswith(
        f"00-{caller.get_span_context().trace_id:032x}-{start.context.span_id:016x}-"
    )
    assert run.result(timeout=60) == 42

    def step_span() -> list[Any]:
        return [s for s in spans.get_finished_spans() if s.name == "durable.step tr.later"]

    # The run's end is committed inside the step's span, which ends just after.
    (step,) = wait_until(step_span, what="the step's span")
    assert step.context.trace_id == caller.get_span_context().trace_id
    assert step.parent is not None and step.parent.span_id == start.context.span_id
    activations = [
        s for s in spans.get_finished_spans() if s.name == "durable.activation tr.delayed"
    ]
    assert activations
    assert {s.context.trace_id for s in activations} == {caller.get_span_context().trace_id}
