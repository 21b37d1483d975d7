"""Result waits are woken by PostgreSQL notices sent in the transaction that ends the run."""

from __future__ import annotations

import threading
import time
from typing import Any

from durable import Durable
from durable.store import engine as store_engine
from durable.store import notices
from durable.store import runs as run_queries
from durable.store import signals as signal_queries
from tests.conftest import clean_tables, query, wait_until


def _insert(database_url: str, wid: str) -> None:
    with store_engine.autocommit(database_url).connect() as conn:
        run_queries.insert_run(conn, wid, "wf.noticed", "[]", "{}")


def test_a_run_end_wakes_its_waiters_and_no_others(database_url: str) -> None:
    clean_tables(database_url)
    _insert(database_url, "n-1")
    _insert(database_url, "n-2")
    assert notices.listener(database_url) is not None  # LISTEN works on this server
    with (
        notices.waiter(database_url, notices.ENDED, "n-1") as mine,
        notices.waiter(database_url, notices.ENDED, "n-2") as other,
    ):
        assert mine.pushed
        with store_engine.autocommit(database_url).connect() as conn:
            assert run_queries.finish(conn, "n-1", "", "completed", "1").finished
        assert mine.wait(5.0)
        assert not other.wait(0.2)


def test_a_rolled_back_end_notifies_nobody(database_url: str) -> None:
    clean_tables(database_url)
    _insert(database_url, "n-3")
    with notices.waiter(database_url, notices.ENDED, "n-3") as mine:
        with store_engine.get_engine(database_url).connect() as conn:
            run_queries.finish(conn, "n-3", "", "completed", "1")
            conn.rollback()
        assert not mine.wait(0.3)


def test_setting_an_event_wakes_its_waiters(database_url: str) -> None:
    clean_tables(database_url)
    _insert(database_url, "n-4")
    with notices.waiter(database_url, notices.EVENT, "n-4") as mine:
        with store_engine.autocommit(database_url).connect() as conn:
            signal_queries.set_event(conn, "n-4", 1, "stage", '"ready"')
        assert mine.wait(5.0)


def test_result_returns_at_the_notice_not_at_a_poll(durable: Durable, worker: Any) -> None:
    @durable.workflow("wf.noticed_result")
    def wf(ctx: Any) -> str:
        ctx.set_event("stage", "waiting")
        return str(ctx.wait_for_signal("go"))

    run = durable.start("wf.noticed_result", workflow_id="n-5")
    assert durable.get_event("n-5", "stage", timeout=20) == "waiting"
    returned: list[float] = []
    waiting = threading.Thread(target=lambda: returned.append(_timed_result(run)))
    waiting.start()
    time.sleep(1.5)  # a polling wait would now be at its longest pause
    durable.signal("n-5", "go", "x")
    waiting.join(20)
    assert returned, "run.result() did not return"
    (finished,) = query(
        durable.settings.database_url,
        "SELECT extract(epoch FROM finished_at) AS at FROM durable_workflows WHERE id = 'n-5'",
    )
    # finished_at is the ending transaction's start; the commit follows within milliseconds.
    assert returned[0] - float(finished.at) < 0.08


def test_get_event_returns_at_the_notice(durable: Durable, worker: Any) -> None:
    @durable.workflow("wf.noticed_event")
    def wf(ctx: Any) -> None:
        ctx.wait_for_signal("go")
        ctx.set_event("stage", "set")

    durable.start("wf.noticed_event", workflow_id="n-6")
    wait_until(lambda: durable.run("n-6").status() == "running", what="the run")
    got: list[tuple[Any, float]] = []
    waiting = threading.Thread(
        target=lambda: got.append((durable.get_event("n-6", "stage", timeout=20), time.time()))
    )
    waiting.start()
    time.sleep(1.5)
    durable.signal("n-6", "go")
    waiting.join(20)
    assert got and got[0][0] == "set"
    (row,) = query(
        durable.settings.database_url,
        "SELECT extract(epoch FROM updated_at) AS at FROM durable_events WHERE workflow_id = 'n-6'",
    )
    assert got[0][1] - float(row.at) < 0.08


def _timed_result(run: Any) -> float:
    run.result(timeout=20)
    return time.time()
