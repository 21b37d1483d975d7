"""One regression test per finding of the hostile-input probe (issue 17)."""

from __future__ import annotations

import logging
import re
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from durable import Durable, RetryPolicy, StoreUnavailable, WorkflowFailed
from durable.cli.beat import beat
from durable.errors import StoreError
from durable.store import engine as store_engine
from durable.store.statement import first_row, statement
from tests.conftest import query
from tests.test_hostile_input import KEY, SECRET, counts, invoke, with_password

ROOT = Path(__file__).resolve().parent.parent


def closed_port_url(url: str) -> str:
    """``url`` with its port changed to one nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return make_url(url).set(port=port).render_as_string(hide_password=False)


# 1. A NUL character in a step's result fails the attempt, under the step's RetryPolicy.
def test_nul_in_a_step_result_fails_the_step_in_one_attempt(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @app.task(name="hostile.nul", shared=False)
    def nul() -> str:
        return "a\x00b"

    @durable.workflow("hostile.nul_result")
    def wf(ctx: Any) -> str:
        return str(ctx.step(nul, retry=RetryPolicy(max_attempts=1)))

    with pytest.raises(WorkflowFailed) as info:
        durable.start("hostile.nul_result", workflow_id="nul-1").result(timeout=30)
    assert "NUL character" in info.value.error
    (step,) = query(database_url, "SELECT status, attempts FROM durable_steps")
    assert (step.status, step.attempts) == ("failed", 1)


# 2. SQL errors carry no parameter values, from SQLAlchemy or from the driver's cursor.
# 1. More generally: PostgreSQL refusing a step's settle fails the attempt, once.
def test_a_settle_the_database_refuses_fails_the_attempt_instead_of_looping(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    calls: list[int] = []

    @app.task(name="t.refused_settle", shared=False)
    def body() -> str:
        calls.append(1)
        return "done"

    @durable.workflow("wf.refused_settle")
    def wf(ctx: Any) -> str:
        return str(ctx.step(body))

    refuse = """
        CREATE FUNCTION refuse_completion() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.workflow_id = 'refused-1' AND NEW.status = 'completed' THEN
            RAISE EXCEPTION 'no completion here' USING ERRCODE = 'P0001';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_completion BEFORE UPDATE ON durable_steps
          FOR EACH ROW EXECUTE FUNCTION refuse_completion();
    """
    with store_engine.autocommit(database_url).connect() as conn:
        conn.execute(text(refuse))
    try:
        run = durable.start("wf.refused_settle", workflow_id="refused-1")
        with pytest.raises(WorkflowFailed) as info:
            run.result(timeout=30)
    finally:
        with store_engine.autocommit(database_url).connect() as conn:
            conn.execute(text("DROP TRIGGER refuse_completion ON durable_steps"))
            conn.execute(text("DROP FUNCTION refuse_completion()"))
    assert "StoreError" in str(info.value)
    assert calls == [1]  # the body ran once: the refused settle was not sent again
    [row] = query(
        database_url, "SELECT status, attempts FROM durable_steps WHERE workflow_id = 'refused-1'"
    )
    assert (row.status, row.attempts) == ("failed", 1)


def test_database_errors_do_not_show_the_values_they_were_given(durable: Durable) -> None:
    for run in (
        lambda c: c.execute(text("SELECT CAST(:v AS integer)"), {"v": SECRET}),
        lambda c: first_row(c, statement("SELECT CAST(:v AS integer)"), {"v": SECRET}),
        lambda c: c.execute(text("SELECT CAST(:v AS jsonb)"), {"v": "{" + SECRET}),
    ):
        with pytest.raises(StoreError) as info:
            durable.store(run)
        shown = "".join(traceback.format_exception(info.value))
        assert SECRET not in shown and info.value.sqlstate.startswith("22"), shown
    # Engines hide parameters in SQLAlchemy's own message too.
    with (
        pytest.raises(DBAPIError) as raw,
        store_engine.autocommit(durable.settings.database_url).connect() as conn,
    ):
        conn.execute(text("SELECT CAST(:v AS integer) / 0"), {"v": "1" + "0" * 5})
    assert "100000" not in str(raw.value).split("[SQL:")[1]


# 3. A password in a URL's query string is masked wherever the URL is shown.
def test_db_upgrade_masks_a_query_string_password(database_url: str) -> None:
    result = invoke({}, ["db", "upgrade", "--database-url", with_password(database_url)])
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output and "password=***" in result.output


def test_unreachable_store_masks_a_query_string_password(database_url: str) -> None:
    url = with_password(closed_port_url(database_url))
    engine = store_engine.autocommit(url)
    with pytest.raises(StoreUnavailable) as info:
        store_engine.with_retry(url, engine.connect, attempts=2, delay=0.01)
    assert SECRET not in str(info.value) and "password=***" in str(info.value)


# 4. (settings) and 5. (ids) are the tables of tests/test_hostile_input.py; the CLI's escaping:
def test_cli_escapes_control_characters_in_everything_it_prints(
    durable: Durable, database_url: str
) -> None:
    @durable.workflow("hostile.shown")
    def wf(ctx: Any, value: str) -> None:
        return None

    durable.start("hostile.shown", "\x1b[2J\u202eevil\x07", workflow_id="shown-1")
    for args in (["show", "shown-1"], ["show", "shown-1", "--json"], ["list"], ["list", "--json"]):
        result = invoke({"DURABLE_DATABASE_URL": database_url}, args)
        assert result.exit_code == 0, result.output
        for raw in ("\x1b[2J", "\u202e", "\x07"):
            assert raw not in result.output, args
    shown = invoke({"DURABLE_DATABASE_URL": database_url}, ["show", "shown-1"]).output
    assert "\\u001b[2J" in shown and "\\u202e" in shown


# 6. A broker that cannot be reached: one line, and the run is left to the beat.
def test_start_with_the_broker_unreachable_logs_one_line(
    database_url: str, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = Celery("nobroker", broker=closed_port_url(redis_url), set_as_current=False)
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    app.conf.task_publish_retry = False
    durable = Durable(app, database_url=database_url, redis_url=redis_url, key_prefix=prefix)

    @durable.workflow("hostile.unsent")
    def wf(ctx: Any) -> None:
        return None

    with caplog.at_level(logging.WARNING, logger="durable"):
        run = durable.start("hostile.unsent", workflow_id="unsent-1")
    assert run.status() == "running"
    warnings = [r for r in caplog.records if r.name.startswith("durable")]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    message = warnings[0].getMessage()
    assert "\n" not in message and "durable beat will send it" in message


# 7. Only a lost connection is retried; a statement timeout is reported as what it is.
def test_a_statement_timeout_is_not_retried_as_a_lost_connection(database_url: str) -> None:
    calls = []

    def slow() -> Any:
        calls.append(1)
        with store_engine.autocommit(database_url).connect() as conn:
            conn.execute(text("SET statement_timeout = 50"))
            try:
                return conn.execute(text("SELECT pg_sleep(2)")).scalar()
            finally:  # the connection goes back to the pool: leave nothing set on it
                conn.execute(text("RESET statement_timeout"))

    with pytest.raises(StoreError) as info:
        store_engine.with_retry(database_url, slow, attempts=3, delay=0.01)
    assert len(calls) == 1
    assert info.value.sqlstate == "57014" and "statement timeout" in str(info.value)


def test_a_refused_connection_is_retried(database_url: str) -> None:
    url = closed_port_url(database_url)
    calls = []

    def connect() -> Any:
        calls.append(1)
        return store_engine.autocommit(url).connect()

    with pytest.raises(StoreUnavailable):
        store_engine.with_retry(url, connect, attempts=3, delay=0.01)
    assert len(calls) == 3


# 9. Deployment defaults.
def test_metrics_listen_on_the_loopback_by_default() -> None:
    (option,) = [p for p in beat.params if p.name == "metrics_address"]
    assert option.default == "127.0.0.1"


def test_compose_has_no_fixed_password_and_separates_the_roles() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "durable-local" not in compose
    for variable in (
        "POSTGRES_PASSWORD",
        "DURABLE_OWNER_PASSWORD",
        "DURABLE_WORKER_PASSWORD",
        "REDIS_PASSWORD",
    ):
        assert f"${{{variable}:?" in compose, variable
    assert "--requirepass" in compose
    urls = re.findall(r"DURABLE_DATABASE_URL: (\S+)", compose)
    assert sorted(u.split("://")[1].split(":")[0] for u in urls) == [
        "durable_owner",
        "durable_worker",
    ]
    init = (ROOT / "config" / "postgres-init.sh").read_text()
    assert "CREATE ROLE durable_worker" in init and "GRANT SELECT, INSERT, UPDATE, DELETE" in init


def test_no_output_of_the_cli_shows_the_key(database_url: str) -> None:
    env = {"DURABLE_DATABASE_URL": with_password(database_url), "DURABLE_ENCRYPTION_KEYS": KEY}
    before = counts(database_url)
    for args in (["list"], ["show", "nothing-here"], ["timers", "list"], ["--help"]):
        result = invoke(env, args)
        assert KEY not in result.output and SECRET not in result.output
    assert counts(database_url) == before
