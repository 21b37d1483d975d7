"""A settle that also schedules the run's next steps (replay in memory, one statement).

The worker that finished a step replays the run in memory on the history its claim read
and, when the run then only waits for remote steps, schedules them in the settling
statement. These tests pin when that is allowed (the run still at rest at the wake counter
the claim saw) and when it must fall back to a real activation.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql

from durable import Durable
from durable.activation import activate, replay_in_memory
from durable.dev.services import Services, create_database, drop_database
from durable.errors import ConfigurationError
from durable.runner import execute_step
from durable.store import engine as store_engine
from durable.store import runs as run_queries
from durable.store import steps as step_queries
from durable.store.migrate import upgrade
from durable.store.statement import on_statement
from tests.conftest import (
    HISTORY_ROWS,
    Background,
    clean_keys,
    clean_tables,
    make_app,
    query,
    wait_until,
)
from tests.store_helpers import schedule_step


def _sleeper(durable: Durable, name: str = "wf.adv.sleeper") -> None:
    @durable.workflow(name)
    def wf(ctx: Any) -> None:
        ctx.sleep(3600)


def _run_with_claimed_steps(durable: Durable, wid: str, seqs: tuple[int, ...]) -> list[Any]:
    """A run at rest with remote steps ``seqs`` scheduled and claimed (with its history)."""
    _sleeper(durable)
    durable.start("wf.adv.sleeper", workflow_id=wid)
    with durable.connect() as conn:
        conn.execute(
            text("UPDATE durable_workflows SET run_seq = wake_seq WHERE id = :id"),
            {"id": wid},
        )
        for seq in seqs:
            schedule_step(conn, wid, seq, "t.part", "[]", "{}", "{}")
        return [
            step_queries.claim_step(conn, wid, seq, f"w{seq}#1", 30, with_history=True)
            for seq in seqs
        ]


def _next(seq: int) -> step_queries.NewStep:
    return step_queries.NewStep(seq, "t.next", "[]", "{}", "{}")


def test_a_settle_advances_a_run_at_rest(durable: Durable, database_url: str) -> None:
    (claimed,) = _run_with_claimed_steps(durable, "adv-1", (1,))
    assert claimed.rest_wake is not None and claimed.run is not None
    assert [s.seq for s in claimed.run.steps] == [1]
    with durable.connect() as conn:
        settled = step_queries.settle_step(
            conn, "adv-1", 1, result='"one"', owner="w1#1", ttl=30, acquire=True,
            attempt=claimed.attempt, expect_wake=claimed.rest_wake, new=[_next(2)],
        )  # fmt: skip
    assert settled.settled and settled.advanced and settled.activation is None
    run = query(
        database_url, "SELECT wake_seq, run_seq, advances, lease_owner FROM durable_workflows"
    )[0]
    # At rest before and after: the counters of the owed-run index stay as they were, and
    # the run's version (wake_seq + advances) is one later.
    assert run.wake_seq == run.run_seq and run.advances == 1 and run.lease_owner is None
    assert run.wake_seq + run.advances == claimed.rest_wake + 1
    steps = query(database_url, "SELECT seq, status FROM durable_steps ORDER BY seq")
    assert [(s.seq, s.status) for s in steps] == [(1, "completed"), (2, "scheduled")]
    events = query(
        database_url,
        "SELECT seq, event FROM " + HISTORY_ROWS + " WHERE seq IS NOT NULL ORDER BY pos",
    )
    assert [(e.seq, e.event) for e in events][-2:] == [(1, "step completed"), (2, "step scheduled")]


def test_a_settle_returns_the_run_s_arguments_only_to_replay(
    durable: Durable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settle that advances the run sends back no arguments (they weigh what the caller
    gave, 100 kB here); one that takes the lease to replay gets them whole."""
    rows: list[Any] = []
    sent = step_queries.first_row

    def kept(*args: Any) -> Any:
        rows.append(sent(*args))
        return rows[-1]

    monkeypatch.setattr(step_queries, "first_row", kept)
    document = "x" * 100_000

    @durable.workflow("wf.adv.document")
    def wf(ctx: Any, text: str, *, lang: str) -> None:
        ctx.sleep(3600)

    durable.start("wf.adv.document", document, lang="en", workflow_id="adv-doc")
    with durable.connect() as conn:
        conn.execute(text("UPDATE durable_workflows SET run_seq = wake_seq WHERE id = 'adv-doc'"))
        for seq in (1, 2):
            schedule_step(conn, "adv-doc", seq, "t.part", "[]", "{}", "{}")
        first, second = (
            step_queries.claim_step(conn, "adv-doc", seq, f"w{seq}#1", 30, with_history=True)
            for seq in (1, 2)
        )
        assert first is not None and second is not None
        settled = step_queries.settle_step(
            conn, "adv-doc", 1, result='"one"', owner="w1#1", ttl=30, acquire=True,
            attempt=first.attempt, expect_wake=first.rest_wake, new=[_next(3)],
        )  # fmt: skip
        assert settled.advanced
        assert rows[-1].args is None and rows[-1].kwargs is None
        # The second step's claim read the run before that advance: it cannot advance it.
        settled = step_queries.settle_step(
            conn, "adv-doc", 2, result='"two"', owner="w2#1", ttl=30, acquire=True,
            attempt=second.attempt, expect_wake=second.rest_wake, new=[_next(4)],
        )  # fmt: skip
    assert not settled.advanced and settled.activation is not None
    assert settled.activation.args == [document]
    assert settled.activation.kwargs == {"lang": "en"}


def test_the_settle_every_step_sends_stays_under_psycopg_s_cached_size() -> None:
    """psycopg caches the conversion of a query's placeholders up to 4,096 bytes; past that
    it parses the settle again at every step (about 150 us of CPU). The run-ending variant,
    sent once per run, may be longer."""
    sql = str(step_queries._SETTLE.compile(dialect=postgresql.psycopg.dialect()))
    assert len(sql.encode()) <= 4096


def _hot_and_all_updates(conn: Any, table: str) -> tuple[int, int]:
    """(HOT updates, updates) of ``table`` counted by this backend and not yet published.

    Read twice in one transaction, their difference is what the statements between did.
    """
    row = conn.execute(
        text(
            "SELECT pg_stat_get_xact_tuples_hot_updated(CAST(:t AS regclass)) AS hot,"
            " pg_stat_get_xact_tuples_updated(CAST(:t AS regclass)) AS updated"
        ),
        {"t": table},
    ).one()
    return int(row.hot), int(row.updated)


def test_an_advance_updates_the_run_without_touching_its_indexes(durable: Durable) -> None:
    """The run's row changes no indexed column when a settle advances it: a HOT update.

    The plain settle (the run woken meanwhile) is the contrast: it bumps the counters that
    the index of owed runs names, and PostgreSQL cannot make that update HOT.
    """
    (claimed,) = _run_with_claimed_steps(durable, "adv-hot", (1,))
    with durable.transaction() as conn:
        hot, updated = _hot_and_all_updates(conn, "durable_workflows")
        settled = step_queries.settle_step(
            conn, "adv-hot", 1, result='"one"', owner="w1#1", ttl=30, acquire=False,
            attempt=claimed.attempt, expect_wake=claimed.rest_wake, new=[_next(2)],
        )  # fmt: skip
        assert settled.advanced
        assert _hot_and_all_updates(conn, "durable_workflows") == (hot + 1, updated + 1)
    with durable.connect() as conn:
        second = step_queries.claim_step(conn, "adv-hot", 2, "w2#1", 30, with_history=True)
    assert second is not None and second.rest_wake == claimed.rest_wake + 1
    durable.signal("adv-hot", "poke", {"n": 1})  # wakes the run after the claim read it
    with durable.transaction() as conn:
        hot, updated = _hot_and_all_updates(conn, "durable_workflows")
        settled = step_queries.settle_step(
            conn, "adv-hot", 2, result='"two"', owner="w2#1", ttl=30, acquire=False,
            attempt=second.attempt, expect_wake=second.rest_wake, new=[_next(3)],
        )  # fmt: skip
        assert settled.settled and not settled.advanced
        assert _hot_and_all_updates(conn, "durable_workflows") == (hot, updated + 1)


def test_a_run_woken_since_the_claim_is_not_advanced(durable: Durable, database_url: str) -> None:
    (claimed,) = _run_with_claimed_steps(durable, "adv-2", (1,))
    durable.signal("adv-2", "poke", {"n": 1})  # wakes the run after the claim read it
    with durable.connect() as conn:
        settled = step_queries.settle_step(
            conn, "adv-2", 1, result='"one"', owner="w1#1", ttl=30, acquire=True,
            attempt=claimed.attempt, expect_wake=claimed.rest_wake, new=[_next(2)],
        )  # fmt: skip
    assert settled.settled and not settled.advanced
    # The plain settle instead: the run is leased to the settling worker with a fresh read.
    assert settled.activation is not None
    assert [s.seq for s in settled.activation.steps] == [1]
    assert query(database_url, "SELECT count(*) AS n FROM durable_steps WHERE seq = 2")[0].n == 0


def test_a_run_held_by_an_activation_is_not_advanced(durable: Durable, database_url: str) -> None:
    (claimed,) = _run_with_claimed_steps(durable, "adv-3", (1,))
    with durable.connect() as conn:
        assert run_queries.acquire(conn, "adv-3", "other#1", 30) is not None
        settled = step_queries.settle_step(
            conn, "adv-3", 1, result='"one"', owner="w1#1", ttl=30, acquire=True,
            attempt=claimed.attempt, expect_wake=claimed.rest_wake, new=[_next(2)],
        )  # fmt: skip
    assert settled.settled and not settled.advanced and settled.activation is None
    run = query(database_url, "SELECT wake_seq, run_seq, lease_owner FROM durable_workflows")[0]
    assert run.lease_owner == "other#1" and run.wake_seq > run.run_seq  # its release will fail


def test_of_two_settles_at_once_only_the_first_advances(
    durable: Durable, database_url: str
) -> None:
    """Siblings settling together: the second waited for the row lock and must fall back."""
    one, two = _run_with_claimed_steps(durable, "adv-4", (1, 2))
    assert one.rest_wake == two.rest_wake
    engine = store_engine.get_engine(database_url)
    holder = engine.connect()
    holder_tx = holder.begin()
    first = step_queries.settle_step(
        holder, "adv-4", 1, result='"one"', owner="w1#1", ttl=30, acquire=True,
        attempt=one.attempt, expect_wake=one.rest_wake, new=[],
    )  # fmt: skip
    assert first.advanced
    outcome: dict[str, Any] = {}

    def settle_two() -> None:
        with durable.connect() as conn:
            outcome["settled"] = step_queries.settle_step(
                conn, "adv-4", 2, result='"two"', owner="w2#1", ttl=30, acquire=True,
                attempt=two.attempt, expect_wake=two.rest_wake, new=[_next(3)],
            )  # fmt: skip

    waiter = Background(settle_two)
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()",
        ),
        what="the second settle to wait for the run's row lock",
    )
    holder_tx.commit()
    holder.close()
    waiter.join(10)
    second = outcome["settled"]
    assert second.settled and not second.advanced
    assert query(database_url, "SELECT count(*) AS n FROM durable_steps WHERE seq = 3")[0].n == 0
    run = query(database_url, "SELECT wake_seq, run_seq FROM durable_workflows")[0]
    assert run.wake_seq == run.run_seq + 1  # the second wake-up is owed to an activation


def _replay(durable: Durable, database_url: str, wid: str, body: Any) -> Any:
    """Replay ``body`` in memory once its first step is done; checks that nothing is written."""
    durable.workflow(f"wf.{wid}")(body)
    durable.start(f"wf.{wid}", workflow_id=wid)
    with durable.connect() as conn:
        schedule_step(conn, wid, 1, "t.first", "[]", "{}", "{}")
        conn.execute(
            text("UPDATE durable_workflows SET run_seq = wake_seq WHERE id = :id"),
            {"id": wid},
        )
        claimed = step_queries.claim_step(conn, wid, 1, "w#1", 30, with_history=True)
    assert claimed is not None and claimed.run is not None
    counts = """SELECT (SELECT count(*) FROM durable_history) + (SELECT count(*) FROM durable_steps)
                     + (SELECT count(*) FROM durable_timers) + (SELECT count(*) FROM durable_events)
                     + (SELECT count(*) FROM durable_workflows) AS n"""
    before = query(database_url, counts)[0].n
    replayed = replay_in_memory(durable, claimed.run, 1, '"done"', None, claimed.attempt)
    assert query(database_url, counts)[0].n == before, "an in-memory replay wrote"
    return replayed


def test_replay_in_memory_schedules_remote_steps_and_writes_nothing(
    durable: Durable, app: Celery, database_url: str
) -> None:
    @app.task(name="t.first", shared=False)
    def first() -> str:
        return "done"

    @app.task(name="t.then", shared=False)
    def then(value: str) -> str:
        return value

    def body(ctx: Any) -> Any:
        value = ctx.step(first)
        return ctx.parallel([then.s(value), then.s(value + "!")])

    replayed = _replay(durable, database_url, "mem-1", body)
    assert replayed is not None
    effects, steps = replayed.effects, replayed.steps
    assert replayed.result is None
    assert [(s.seq, s.name) for s in effects.schedules] == [(2, "t.then"), (3, "t.then")]
    assert [s.status for s in steps] == ["completed"]


def test_replay_in_memory_leaves_everything_else_to_an_activation(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """A local step, a sleep, an event, a child, a new patch, the time, an error: refused."""

    @app.task(name="t.first", shared=False)
    def first() -> str:
        return "done"

    ran: list[str] = []

    def local() -> str:
        ran.append("local")
        return "x"

    tails = {
        "local": lambda ctx: ctx.step(local, local=True),
        "sleep": lambda ctx: ctx.sleep(5),
        "event": lambda ctx: ctx.set_event("k", 1),
        "signal": lambda ctx: ctx.wait_for_signal("go"),
        "child": lambda ctx: ctx.child("wf.adv.sleeper"),
        "patch": lambda ctx: ctx.patched("new-path"),
        "now": lambda ctx: ctx.now(),
        "error": lambda ctx: 1 / 0,
    }
    _sleeper(durable)
    for name, tail in tails.items():

        def body(ctx: Any, tail: Any = tail) -> Any:
            ctx.step(first)
            return tail(ctx)

        assert _replay(durable, database_url, f"mem-{name}", body) is None, name
    assert ran == []  # a local step's body never runs in memory


def test_now_after_a_step_is_its_commit_time_on_every_path(
    durable: Durable, app: Celery, database_url: str, worker: Any
) -> None:
    """``ctx.now()`` right after a step, and again on later replays that use kept histories."""

    @app.task(name="t.tick", shared=False)
    def tick(i: int) -> int:
        return i

    @durable.workflow("wf.clock")
    def wf(ctx: Any) -> list[str]:
        seen = []
        for i in range(4):
            ctx.step(tick, i)
            ctx.step(tick, i)
            seen.append(ctx.now().isoformat())
        return seen

    run = durable.start("wf.clock", workflow_id="clock-1")
    seen = [datetime.fromisoformat(s) for s in run.result(timeout=30)]
    completed = query(
        database_url,
        "SELECT completed_at FROM durable_steps WHERE workflow_id = 'clock-1' ORDER BY seq",
    )
    assert seen == [completed[i].completed_at for i in (1, 3, 5, 7)]


def test_a_sequential_run_costs_one_statement_per_step(
    durable: Durable, app: Celery, database_url: str, worker: Any
) -> None:
    """The settle schedules the next step, no lease and no second read; and the process
    that scheduled a step runs its first delivery without a claim."""

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.seq")
    def wf(ctx: Any, n: int) -> int:
        x = 0
        for _ in range(n):
            x = ctx.step(inc, x)
        return x

    seen: list[str] = []
    engines = store_engine.engines(database_url)

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "durable_steps" in statement:
            seen.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    # The step path's claim and settle go straight to the driver: counted by their hook.
    stop_counting = on_statement(lambda clause, seconds: record(None, None, clause.text))
    try:
        assert durable.start("wf.seq", 20, workflow_id="seq-1").result(timeout=30) == 20
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
        stop_counting()
    claims = [s for s in seen if "SET status = 'started'" in s]
    reads = [s for s in seen if s == step_queries._READ_FIRST.text]
    settles = [s for s in seen if "AS settled_attempts" in s]
    # The first step is scheduled by the start's own statement (an eager start, the
    # default); the worker did not schedule it, so it reads it (a first dispatch, the run's
    # one step: it runs unclaimed, no claim). Every other step is scheduled by a settle in
    # the process that runs it, which kept the history: it runs unclaimed with no read. The
    # last settle ends the run: no activation, no finish statement.
    assert len(claims) == 0 and len(reads) == 1 and len(settles) == 20
    start = [s for s in seen if "INSERT INTO durable_workflows" in s]
    others = [s for s in seen if s not in reads and s not in settles and s not in start]
    assert len(start) == 1 and len(others) == 0, others
    run = query(database_url, "SELECT status, result, lease_owner FROM durable_workflows")[0]
    assert (run.status, run.result, run.lease_owner) == ("completed", 20, None)
    events = query(
        database_url,
        "SELECT event FROM "
        + HISTORY_ROWS
        + " WHERE workflow_id = 'seq-1' ORDER BY pos DESC LIMIT 2",
    )
    assert [e.event for e in events] == ["completed", "step completed"]
    steps = query(
        database_url,
        "SELECT attempts, started_at <= completed_at AS ordered FROM durable_steps "
        "WHERE workflow_id = 'seq-1'",
    )
    assert [(s.attempts, s.ordered) for s in steps] == [(1, True)] * 20
    started = query(
        database_url,
        "SELECT seq, detail FROM " + HISTORY_ROWS + " "
        "WHERE workflow_id = 'seq-1' AND event = 'step started' ORDER BY seq",
    )
    assert [(e.seq, e.detail["attempt"]) for e in started] == [(i, 1) for i in range(1, 21)]
    # The steps' rows are their history: only the run's start and end are written as rows,
    # and the history reads as before, step by step.
    written = query(database_url, "SELECT event FROM durable_history WHERE workflow_id = 'seq-1'")
    assert sorted(r.event for r in written) == ["completed", "started"]
    events = query(
        database_url,
        "SELECT seq, event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'seq-1' ORDER BY pos",
    )
    step = ["step scheduled", "step started", "step completed"]
    assert [(e.seq, e.event) for e in events] == [
        (None, "started"),
        *[(i, event) for i in range(1, 21) for event in step],
        (None, "completed"),
    ]


def test_a_kept_history_is_not_used_once_the_run_moved_on(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """A signal between two steps: the next claim reads the history again."""

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.kept")
    def wf(ctx: Any) -> int:
        x = ctx.step(inc, 0)
        x = ctx.step(inc, x)
        return int(ctx.step(inc, x))

    durable.start("wf.kept", workflow_id="kept-1")
    assert activate(durable, "kept-1") == "suspended"  # schedules step 1
    assert execute_step(durable, "kept-1", 1) == "completed"  # advances: step 2 scheduled
    kept = durable.histories.wake_of("kept-1")
    assert kept is not None
    durable.signal("kept-1", "noise", 1)  # wakes the run: the kept history is stale now
    assert activate(durable, "kept-1") == "suspended"  # at rest again, at a later wake
    claimed: list[Any] = []
    original = step_queries.claim_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        claimed.append(original(*args, **kwargs))
        return claimed[-1]

    step_queries.claim_step = spy  # type: ignore[assignment]
    try:
        assert execute_step(durable, "kept-1", 2) == "completed"
    finally:
        step_queries.claim_step = original  # type: ignore[assignment]
    assert claimed[0].rest_wake > kept and claimed[0].run is not None  # read again
    steps = query(database_url, "SELECT seq, status FROM durable_steps ORDER BY seq")
    assert [(s.seq, s.status) for s in steps] == [
        (1, "completed"),
        (2, "completed"),
        (3, "scheduled"),
    ]
    assert durable.histories.wake_of("kept-1") == claimed[0].rest_wake + 1


def test_a_kept_history_is_not_used_once_another_process_advanced_the_run(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """An advance elsewhere leaves wake_seq alone but moves the version the cache is kept at."""

    @app.task(name="t.inc2", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.kept2")
    def wf(ctx: Any) -> int:
        x = ctx.step(inc, 0)
        x = ctx.step(inc, x)
        return int(ctx.step(inc, x))

    durable.start("wf.kept2", workflow_id="kept-2")
    assert activate(durable, "kept-2") == "suspended"  # schedules step 1
    assert execute_step(durable, "kept-2", 1) == "completed"  # advances: step 2 scheduled
    kept = durable.histories.wake_of("kept-2")
    assert kept is not None
    # Step 2 runs in another process (its own claim, replay and settle), which advances.
    with durable.connect() as conn:
        other = step_queries.claim_step(conn, "kept-2", 2, "other#1", 30, with_history=True)
        assert other is not None and other.run is not None and other.rest_wake == kept
        replayed = replay_in_memory(durable, other.run, 2, "2", None, other.attempt)
        assert replayed is not None and [n.seq for n in replayed.effects.schedules] == [3]
        settled = step_queries.settle_step(
            conn, "kept-2", 2, result="2", owner="other#1", ttl=30,
            attempt=other.attempt, expect_wake=other.rest_wake, new=replayed.effects.schedules,
        )  # fmt: skip
    assert settled.advanced
    run = query(database_url, "SELECT wake_seq, run_seq FROM durable_workflows")[0]
    assert run.wake_seq == run.run_seq  # at rest, its wake counter where this process kept it
    claimed: list[Any] = []
    original = step_queries.claim_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        claimed.append(original(*args, **kwargs))
        return claimed[-1]

    step_queries.claim_step = spy  # type: ignore[assignment]
    try:
        assert execute_step(durable, "kept-2", 3) == "completed"
    finally:
        step_queries.claim_step = original  # type: ignore[assignment]
    assert claimed[0].rest_wake == kept + 1 and claimed[0].run is not None  # read again
    done = query(database_url, "SELECT status, result FROM durable_workflows")[0]
    assert (done.status, done.result) == ("completed", 3)


def test_without_kept_histories_every_claim_reads_the_history(
    database_url: str, redis_url: str, prefix: str
) -> None:
    app, durable = make_app(database_url, redis_url, prefix, history_cache_size=0)
    clean_tables(database_url)
    try:
        _run_without_cache(app, durable)
    finally:
        clean_keys(redis_url, prefix)
    with pytest.raises(ConfigurationError, match="history_cache_size"):
        _ = make_app(database_url, redis_url, prefix, history_cache_size=-1)[1].settings


def _run_without_cache(app: Celery, durable: Durable) -> None:

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.nocache")
    def wf(ctx: Any) -> int:
        return int(ctx.step(inc, ctx.step(inc, 0)))

    durable.start("wf.nocache", workflow_id="nocache-1")
    assert activate(durable, "nocache-1") == "suspended"
    assert execute_step(durable, "nocache-1", 1) == "completed"  # advanced: step 2 scheduled
    assert durable.histories.wake_of("nocache-1") is None
    assert execute_step(durable, "nocache-1", 2) == "completed"  # read again, then the end
    assert durable.run("nocache-1").result(timeout=5) == 2


def test_a_dict_result_replays_with_its_keys_in_one_order(
    durable: Durable, app: Celery, worker: Any
) -> None:
    """The value a workflow sees first and the one replay reads back iterate alike."""

    @app.task(name="t.unordered", shared=False)
    def unordered() -> dict[str, int]:
        return {"zz": 1, "a": 2, "é": 3, "mm": 4}  # not the order jsonb keeps

    def local_unordered() -> dict[str, int]:
        return {"yy": 1, "b": 2}

    def echo_task(k: str) -> Any:
        def echo(value: str) -> str:
            return value

        return app.task(name=f"t.key.{k}", shared=False)(echo)

    by_key = {k: echo_task(k) for k in ("zz", "a", "é", "mm", "yy", "b")}

    @durable.workflow("wf.keys")
    def wf(ctx: Any) -> list[str]:
        seen = []
        for k in ctx.step(unordered):  # each key names the next step's task
            seen.append(ctx.step(by_key[k], k))
        for k in ctx.step(local_unordered, local=True):
            seen.append(ctx.step(by_key[k], k))
        return seen

    run = durable.start("wf.keys", workflow_id="keys-1")
    assert run.result(timeout=30) == ["a", "mm", "zz", "é", "b", "yy"]


def test_a_kept_history_is_not_used_for_a_new_run_under_the_same_id(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """A run purged and started again under its id counts its wake-ups from the start."""

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.again")
    def wf(ctx: Any, start: int) -> int:
        return int(ctx.step(inc, ctx.step(inc, ctx.step(inc, start))))

    def scheduled() -> list[int]:
        rows = query(database_url, "SELECT seq FROM durable_steps WHERE status = 'scheduled'")
        return sorted(r.seq for r in rows)

    durable.start("wf.again", 0, workflow_id="again-1")
    assert activate(durable, "again-1") == "suspended"
    assert execute_step(durable, "again-1", 1) == "completed"  # advanced, history kept
    kept = durable.histories.wake_of("again-1")
    query(database_url, "DELETE FROM durable_workflows WHERE id = 'again-1' RETURNING id")
    query(database_url, "DELETE FROM durable_history WHERE workflow_id = 'again-1' RETURNING id")
    # The same id again, brought to rest at the kept wake counter with its step 1 pending.
    durable.start("wf.again", 10, workflow_id="again-1")
    assert activate(durable, "again-1") == "suspended"
    durable.signal("again-1", "noise", 1)
    assert activate(durable, "again-1") == "suspended"
    rest = query(database_url, "SELECT wake_seq, run_seq FROM durable_workflows")[0]
    assert rest.wake_seq == rest.run_seq == kept
    assert execute_step(durable, "again-1", 1) == "completed"
    assert scheduled() == [2]  # worked out on the new run's history, not the kept one
    assert execute_step(durable, "again-1", 2) == "completed"
    assert execute_step(durable, "again-1", 3) == "completed"
    assert durable.run("again-1").result(timeout=5) == 13


def test_the_last_settle_ends_the_run_and_wakes_its_parent(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """A child whose last step settles ends in that statement; its parent is woken."""

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.kid")
    def kid(ctx: Any, x: int) -> int:
        return int(ctx.step(inc, x))

    @durable.workflow("wf.parent")
    def parent(ctx: Any) -> int:
        return int(ctx.child("wf.kid", 41)) + 1

    durable.start("wf.parent", workflow_id="parent-1")
    assert activate(durable, "parent-1") == "suspended"  # starts the child
    assert activate(durable, "parent-1/1") == "suspended"  # the child schedules its step
    with durable.connect() as conn:  # the child at rest, as after its release
        conn.execute(text("UPDATE durable_workflows SET run_seq = wake_seq"))
    sent: list[tuple[str, str | None]] = []
    original = durable.send_activation
    durable.send_activation = lambda wid, name=None: sent.append((wid, name))  # type: ignore[method-assign]
    try:
        assert execute_step(durable, "parent-1/1", 1) == "completed"
    finally:
        durable.send_activation = original  # type: ignore[method-assign]
    child = query(
        database_url, "SELECT status, result FROM durable_workflows WHERE id = 'parent-1/1'"
    )
    assert (child[0].status, child[0].result) == ("completed", 42)
    assert sent == [("parent-1", "wf.parent")]
    assert activate(durable, "parent-1") == "completed"
    assert durable.run("parent-1").result(timeout=5) == 43


def test_an_eager_start_schedules_the_first_steps_with_the_run(
    database_url: str, redis_url: str, prefix: str
) -> None:
    app, durable = make_app(database_url, redis_url, prefix, eager_start=True)
    clean_tables(database_url)

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    def local_first() -> int:
        return 1

    @durable.workflow("wf.eager")
    def eager(ctx: Any, x: int) -> int:
        a, b = ctx.parallel([inc.s(x), inc.s(x + 10)])
        return int(ctx.step(inc, a + b))

    @durable.workflow("wf.not_eager")
    def not_eager(ctx: Any, local: bool) -> str:
        ctx.step(local_first, local=True) if local else ctx.now()
        ctx.step(inc, 1)
        return "done"

    def messages() -> list[str]:
        raw = _queued(redis_url, f"{prefix}:celery")
        return [m["headers"]["task"] for m in raw]

    try:
        durable.start("wf.eager", 1, workflow_id="eager-1")
        steps = query(database_url, "SELECT seq, status FROM durable_steps ORDER BY seq")
        assert [(s.seq, s.status) for s in steps] == [(1, "scheduled"), (2, "scheduled")]
        run = query(database_url, "SELECT wake_seq, run_seq FROM durable_workflows")[0]
        assert run.wake_seq == run.run_seq  # at rest: no activation owed
        assert messages() == ["t.inc", "t.inc"]
        # Started again under its id: the existing run, nothing scheduled twice.
        durable.start("wf.eager", 1, workflow_id="eager-1")
        assert len(query(database_url, "SELECT seq FROM durable_steps")) == 2
        assert execute_step(durable, "eager-1", 1) == "completed"
        assert execute_step(durable, "eager-1", 2) == "completed"
        assert execute_step(durable, "eager-1", 3) == "completed"
        assert durable.run("eager-1").result(timeout=5) == 15  # (1 + 1) + (11 + 1) + 1
        # A local step or ctx.now() first: started as usual, by an activation.
        for wid, local in (("plain-1", True), ("plain-2", False)):
            durable.start("wf.not_eager", local, workflow_id=wid)
            rows = query(
                database_url, "SELECT seq FROM durable_steps WHERE workflow_id = :w", w=wid
            )
            assert rows == []
        assert messages().count("durable.activate") == 2
    finally:
        clean_keys(redis_url, prefix)


def _queued(redis_url: str, key: str) -> list[dict[str, Any]]:
    import json

    import redis

    client = redis.Redis.from_url(redis_url)
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


def test_steps_find_their_run_by_key_on_a_database_without_statistics(
    services: Services, redis_url: str, prefix: str
) -> None:
    """On a new database (no ANALYZE yet), stepping many runs never scans the status index.

    Each settle and wake-up takes its run by primary key. Were the status test indexable,
    the planner could cost ``ix_durable_workflows_status_created_at`` the same as the key
    while the table has no statistics, and every step would scan all running runs.
    """
    name = f"durable_test_plan_{uuid.uuid4().hex[:8]}"
    url = create_database(services.database_url, name)
    try:
        upgrade(url)
        app, durable = make_app(url, redis_url, prefix)

        @app.task(name="t.plan.add")
        def add(x: int) -> int:
            return x + 1

        @durable.workflow("wf.plan.steps")
        def steps(ctx: Any, n: int) -> int:
            x = 0
            for _ in range(n):
                x = ctx.step(add, x)
            return int(x)

        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
            runs = [durable.start("wf.plan.steps", 8) for _ in range(30)]
            assert [run.result(timeout=60) for run in runs] == [8] * 30
        store_engine.dispose_all()  # the worker's sessions end and publish their statistics

        def scans() -> dict[str, int]:
            rows = query(
                url,
                "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes"
                " WHERE relname = 'durable_workflows'",
            )
            return {row.indexrelname: row.idx_scan for row in rows}

        # 240 settles, each of which reads its run by key.
        wait_until(lambda: scans()["pk_durable_workflows"] >= 240, what="statistics")
        assert scans()["ix_durable_workflows_status_created_at"] == 0
    finally:
        clean_keys(redis_url, prefix)
        store_engine.dispose_all()
        drop_database(services.database_url, name)


def test_a_start_by_default_writes_the_first_step_and_any_first_action_still_works(
    durable: Durable, app: Celery, worker: Any, beat: Any, database_url: str
) -> None:
    """Eager start is the default: the start's statement schedules the first remote step;
    a workflow that begins with a local step, a sleep or a signal wait starts as before."""

    @app.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @durable.workflow("wf.first_remote")
    def first_remote(ctx: Any) -> int:
        return int(ctx.step(add, 1, 2))

    def one() -> int:
        return 1

    @durable.workflow("wf.first_other")
    def first_other(ctx: Any, first: str) -> str:
        if first == "local":
            ctx.step(one, local=True)
        elif first == "sleep":
            ctx.sleep(0.1)
        else:
            return str(ctx.wait_for_signal("go", timeout=30))
        return first

    run = durable.start("wf.first_remote", workflow_id="first-remote")
    steps = query(database_url, "SELECT status FROM durable_steps")
    assert [r.status for r in steps] == ["scheduled"]  # no activation: the start wrote it
    assert run.result(timeout=20) == 3
    for first in ("local", "sleep"):
        assert durable.start("wf.first_other", first).result(timeout=20) == first
    waiting = durable.start("wf.first_other", "wait", workflow_id="first-wait")
    wait_until(
        lambda: query(database_url, "SELECT 1 FROM durable_steps WHERE workflow_id = 'first-wait'"),
        what="the wait recorded",
    )
    durable.signal("first-wait", "go", "went")
    assert waiting.result(timeout=20) == "went"
