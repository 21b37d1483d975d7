"""Bad input gets a clear one-line error and writes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery

from durable import (
    ConfigurationError,
    Durable,
    PayloadError,
    StoreUnavailable,
    UnknownWorkflow,
    WorkflowFailed,
    WorkflowIdConflict,
)
from tests.conftest import make_app, query


def _runs(database_url: str) -> int:
    return int(query(database_url, "SELECT count(*) AS n FROM durable_workflows")[0].n)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_unknown_workflow_name(durable: Durable, database_url: str) -> None:
    @durable.workflow("known.one")
    def wf(ctx: Any) -> None:
        return None

    with pytest.raises(UnknownWorkflow) as info:
        durable.start("no.such.workflow")
    assert "no.such.workflow" in _one_line(info.value) and "known.one" in str(info.value)
    assert _runs(database_url) == 0


def test_arguments_that_are_not_json(durable: Durable, database_url: str) -> None:
    @durable.workflow("wf.args")
    def wf(ctx: Any, value: Any) -> None:
        return None

    with pytest.raises(PayloadError) as info:
        durable.start("wf.args", object())
    assert "not JSON-serialisable" in _one_line(info.value)
    assert _runs(database_url) == 0


def test_payload_over_the_limit(database_url: str, redis_url: str, prefix: str) -> None:
    _, durable = make_app(database_url, redis_url, prefix, max_payload_bytes=1000)

    @durable.workflow("wf.big")
    def wf(ctx: Any, value: str) -> None:
        return None

    before = _runs(database_url)
    with pytest.raises(PayloadError) as info:
        durable.start("wf.big", "x" * 2000)
    assert "over the limit of 1000 bytes" in _one_line(info.value)
    assert _runs(database_url) == before


def test_step_arguments_and_results_that_are_not_json(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @app.task(name="t.returns_set", shared=False)
    def returns_set() -> set[int]:
        return {1, 2}

    @durable.workflow("wf.bad_step_args")
    def bad_args(ctx: Any) -> None:
        ctx.step(returns_set, {1, 2})

    @durable.workflow("wf.bad_step_result")
    def bad_result(ctx: Any) -> None:
        ctx.step(returns_set)

    with pytest.raises(WorkflowFailed) as info:
        durable.start("wf.bad_step_args", workflow_id="bad-args").result(timeout=20)
    assert "arguments of step 1" in info.value.error
    assert query(database_url, "SELECT 1 FROM durable_steps WHERE workflow_id = 'bad-args'") == []
    with pytest.raises(WorkflowFailed) as info:
        durable.start("wf.bad_step_result", workflow_id="bad-result").result(timeout=20)
    assert "result of step 1" in info.value.error and "not JSON-serialisable" in info.value.error


def test_database_unreachable_at_start(redis_url: str, prefix: str) -> None:
    app = Celery("unreachable", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    durable = Durable(
        app,
        database_url="postgresql://someone:secret@127.0.0.1:1/nowhere",
        redis_url=redis_url,
        connect_retries=2,
    )

    @durable.workflow("wf.anything")
    def wf(ctx: Any) -> None:
        return None

    with pytest.raises(StoreUnavailable) as info:
        durable.start("wf.anything")
    message = _one_line(info.value)
    assert message.startswith("database unreachable at postgresql+psycopg://someone:***@")
    assert "secret" not in message
    assert redis.Redis.from_url(redis_url).llen(f"{prefix}:celery") == 0  # nothing sent


def test_workflow_id_taken_by_another_workflow(durable: Durable) -> None:
    @durable.workflow("wf.a")
    def a(ctx: Any) -> None:
        return None

    @durable.workflow("wf.b")
    def b(ctx: Any) -> None:
        return None

    durable.start("wf.a", workflow_id="shared-id")
    with pytest.raises(WorkflowIdConflict) as info:
        durable.start("wf.b", workflow_id="shared-id")
    assert "wf.a" in _one_line(info.value) and "wf.b" in str(info.value)


def test_missing_database_url_is_a_configuration_error(monkeypatch: Any, redis_url: str) -> None:
    monkeypatch.delenv("DURABLE_DATABASE_URL", raising=False)
    durable = Durable(Celery("nodb", set_as_current=False), redis_url=redis_url)
    with pytest.raises(ConfigurationError) as info:
        _ = durable.settings
    assert "DURABLE_DATABASE_URL" in _one_line(info.value)


def test_store_without_tables_says_to_upgrade(services: Any, redis_url: str, prefix: str) -> None:
    from durable.dev.services import create_database, drop_database

    name = f"durable_empty_{prefix}"
    url = create_database(services.database_url, name)
    try:
        app = Celery("empty", broker=redis_url, set_as_current=False)
        durable = Durable(app, database_url=url, redis_url=redis_url)

        @durable.workflow("wf.empty")
        def wf(ctx: Any) -> None:
            return None

        with pytest.raises(ConfigurationError) as info:
            durable.start("wf.empty")
        assert "run `durable db upgrade`" in _one_line(info.value)
    finally:
        from durable.store import engine as store_engine

        store_engine.dispose_all()
        drop_database(services.database_url, name)
