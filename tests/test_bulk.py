"""Bulk cancel, retry, resume and purge: selection by ``durable list``'s filters, dry runs,
confirmation, committed batches, runs changed meanwhile, and running again after an
interruption; through :mod:`durable.bulk` and the ``durable`` command."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from durable import Durable, bulk
from durable.cli import cli
from durable.store import bulk as queries
from durable.store import runs
from tests.conftest import query

ROOT = Path(__file__).resolve().parent.parent

# The Durable of the running test, loaded by the command as --app tests.test_bulk:CURRENT.
CURRENT: Durable | None = None


@pytest.fixture
def spec(durable: Durable) -> Iterator[str]:
    global CURRENT
    CURRENT = durable
    yield f"{__name__}:CURRENT"
    CURRENT = None


def durable_cli(spec: str, *args: str) -> Result:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    return CliRunner().invoke(cli, ["-A", spec, *args], env=clean, catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("durable: "), result.stderr
    return lines[0]


def running(durable: Durable, *ids: str, name: str = "bk.a") -> None:
    with durable.connect() as conn:
        for wid in ids:
            assert runs.insert_run(conn, wid, name, "[]", "{}").created


def failed(durable: Durable, *ids: str, name: str = "bk.a") -> None:
    running(durable, *ids, name=name)
    with durable.connect() as conn:
        for wid in ids:
            assert runs.acquire(conn, wid, "worker-1", 30.0)
            assert runs.finish(conn, wid, "worker-1", "failed", error="RuntimeError: boom")


def completed(durable: Durable, *ids: str, name: str = "bk.a") -> None:
    running(durable, *ids, name=name)
    with durable.connect() as conn:
        for wid in ids:
            assert runs.acquire(conn, wid, "worker-1", 30.0)
            assert runs.finish(conn, wid, "worker-1", "completed", result='"ok"')


def cancel_requested(database_url: str) -> set[str]:
    rows = query(database_url, "SELECT id FROM durable_workflows WHERE cancel_requested")
    return {r.id for r in rows}


def snapshot(database_url: str) -> list[Any]:
    """Every run's state and the number of history rows: what a dry run must not change."""
    rows = query(
        database_url,
        "SELECT id, status, cancel_requested, wake_seq, updated_at FROM durable_workflows "
        "ORDER BY id",
    )
    history = query(database_url, "SELECT count(*) AS n FROM durable_history")
    return [tuple(r) for r in rows] + [history[0].n]


@pytest.fixture
def mixed(durable: Durable, database_url: str) -> None:
    """Runs of two workflows in every status; one of them started two days ago."""
    running(durable, "a-1", "a-2", "a-3")
    running(durable, "b-1", name="bk.b")
    failed(durable, "f-1", "f-2")
    failed(durable, "g-1", name="bk.b")
    completed(durable, "c-1")
    query(
        database_url,
        "UPDATE durable_workflows SET created_at = now() - interval '2 days' "
        "WHERE id = 'a-3' RETURNING id",
    )


def test_each_action_selects_its_runs_by_list_s_filters(durable: Durable, mixed: None) -> None:
    def ids(action: str, **where: Any) -> list[str]:
        found = bulk.preview(durable, action, bulk.RunFilter(**where), sample=100)
        assert found.matched == len(found.sample)
        return found.sample

    assert ids("cancel", name="bk.a") == ["a-1", "a-2", "a-3"]
    assert ids("cancel", name="bk.a", since=timedelta(days=1)) == ["a-1", "a-2"]
    assert ids("cancel") == ["a-1", "a-2", "a-3", "b-1"]  # running runs only
    assert ids("resume", name="bk.b") == ["b-1"]
    assert ids("retry", name="bk.a") == ["f-1", "f-2"]
    assert ids("retry", status="running") == []
    assert ids("purge", status="failed") == ["f-1", "f-2", "g-1"]
    assert ids("purge", name="bk.a") == ["c-1", "f-1", "f-2"]
    assert ids("purge", older_than=timedelta(hours=1)) == []  # all finished just now
    assert ids("cancel", waiting="signal") == []
    with pytest.raises(ValueError):
        bulk.preview(durable, "delete", bulk.RunFilter())


def test_dry_run_prints_the_count_and_a_sample_and_writes_nothing(
    durable: Durable, mixed: None, spec: str, database_url: str
) -> None:
    before = snapshot(database_url)
    for action in ("cancel", "resume", "retry", "purge"):
        result = durable_cli(spec, action, "--name", "bk.a", "--dry-run", "--yes")
        assert result.exit_code == 0, result.output
    shown = as_json(durable_cli(spec, "cancel", "--name", "bk.a", "--dry-run", "--json"))
    assert shown == {
        "action": "cancel",
        "dry_run": True,
        "matched": 3,
        "sample": ["a-1", "a-2", "a-3"],
    }
    text = durable_cli(spec, "retry", "--all", "--dry-run")
    assert text.stdout.splitlines() == [
        "would have retried 3 run(s); the first 3:",
        "  f-1",
        "  f-2",
        "  g-1",
    ]
    assert snapshot(database_url) == before


def test_without_a_terminal_or_yes_it_refuses_in_one_line(
    durable: Durable, mixed: None, spec: str, database_url: str
) -> None:
    before = snapshot(database_url)
    result = durable_cli(spec, "cancel", "--name", "bk.a")
    assert result.exit_code == 1
    assert "refusing to cancel 3 run(s)" in one_line_error(result)
    assert "--yes" in result.stderr
    assert snapshot(database_url) == before


def test_a_bulk_form_needs_a_filter_or_all_and_not_an_id(
    durable: Durable, mixed: None, spec: str, database_url: str
) -> None:
    before = snapshot(database_url)
    for action in ("cancel", "resume", "retry", "purge"):
        bare = durable_cli(spec, action, "--yes")
        assert bare.exit_code == 2 and "--all" in one_line_error(bare)
    both = durable_cli(spec, "cancel", "a-1", "--name", "bk.a")
    assert both.exit_code == 2 and "not both" in one_line_error(both)
    assert snapshot(database_url) == before
    everything = as_json(durable_cli(spec, "cancel", "--all", "--yes", "--json"))
    assert (everything["acted"], everything["skipped"]) == (4, 0)


def test_yes_acts_in_batches_each_committed(durable: Durable, spec: str, database_url: str) -> None:
    running(durable, "r-1", "r-2", "r-3", "r-4", "r-5")
    running(durable, "other", name="bk.other")
    result = durable_cli(spec, "cancel", "--name", "bk.a", "--batch-size", "2", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "batch 1: cancelled 2, skipped 0, failed 0 (2 of about 5)",
        "batch 2: cancelled 2, skipped 0, failed 0 (4 of about 5)",
        "batch 3: cancelled 1, skipped 0, failed 0 (5 of about 5)",
        "cancelled 5 run(s); skipped 0 (changed meanwhile); failed 0",
    ]
    assert cancel_requested(database_url) == {"r-1", "r-2", "r-3", "r-4", "r-5"}
    events = query(
        database_url, "SELECT count(*) AS n FROM durable_history WHERE event = 'cancel requested'"
    )
    assert events[0].n == 5
    again = as_json(durable_cli(spec, "cancel", "--name", "bk.a", "--yes", "--json"))
    assert again == {
        "action": "cancel",
        "dry_run": False,
        "acted": 0,
        "skipped": 0,
        "failed": {},
        "batches": 0,
    }


def test_a_run_that_changed_after_selection_is_skipped(durable: Durable, database_url: str) -> None:
    running(durable, "s-1", "s-2", "s-3")
    where = bulk.RunFilter(name="bk.a")
    ids = durable.store(lambda c: queries.select_matching(c, "cancel", where.criteria(), None, 10))
    assert ids == ["s-1", "s-2", "s-3"]
    durable.cancel("s-2")  # another operator was quicker
    batch = bulk.act(durable, "cancel", ids, where)
    assert (batch.acted, batch.skipped, batch.failed) == (["s-1", "s-3"], ["s-2"], {})
    history = query(
        database_url,
        "SELECT workflow_id FROM durable_history WHERE event = 'cancel requested' "
        "AND workflow_id = 's-2'",
    )
    assert len(history) == 1  # not twice


def test_running_again_after_an_interruption_finishes_the_rest(
    durable: Durable, database_url: str
) -> None:
    failed(durable, "i-1", "i-2", "i-3", "i-4", "i-5")
    seen: list[bulk.Batch] = []

    def interrupt_after_two(batch: bulk.Batch) -> None:
        seen.append(batch)
        if len(seen) == 2:
            raise KeyboardInterrupt

    where = bulk.RunFilter(name="bk.a")
    with pytest.raises(KeyboardInterrupt):
        bulk.run(durable, "retry", where, batch_size=2, on_batch=interrupt_after_two)
    statuses = {
        r.id: r.status for r in query(database_url, "SELECT id, status FROM durable_workflows")
    }
    assert statuses == {
        "i-1": "running",
        "i-2": "running",
        "i-3": "running",
        "i-4": "running",
        "i-5": "failed",
    }
    done = bulk.run(durable, "retry", where, batch_size=2)
    assert (done.acted, done.skipped, done.failed, done.batches) == (1, 0, {}, 1)
    retried = query(
        database_url, "SELECT count(*) AS n FROM durable_history WHERE event = 'retried'"
    )
    assert retried[0].n == 5


def test_bulk_resume_and_retry_through_the_command(
    durable: Durable, mixed: None, spec: str, database_url: str
) -> None:
    resumed = as_json(durable_cli(spec, "resume", "--name", "bk.a", "--yes", "--json"))
    assert (resumed["acted"], resumed["skipped"]) == (3, 0)
    events = query(database_url, "SELECT workflow_id FROM durable_history WHERE event = 'resumed'")
    assert sorted(r.workflow_id for r in events) == ["a-1", "a-2", "a-3"]

    retried = durable_cli(spec, "retry", "--status", "failed", "--name", "bk.b", "--yes")
    assert retried.exit_code == 0, retried.output
    assert (
        retried.stdout.splitlines()[-1]
        == "retried 1 run(s); skipped 0 (changed meanwhile); failed 0"
    )
    status = query(database_url, "SELECT status FROM durable_workflows WHERE id = 'g-1'")
    assert status[0].status == "running"


def test_bulk_purge_deletes_the_finished_runs_selected_with_their_history(
    durable: Durable, mixed: None, spec: str, database_url: str
) -> None:
    result = as_json(
        durable_cli(spec, "purge", "--name", "bk.a", "--batch-size", "2", "--yes", "--json")
    )
    assert (result["acted"], result["batches"]) == (3, 2)
    left = {r.id for r in query(database_url, "SELECT id FROM durable_workflows")}
    assert left == {"a-1", "a-2", "a-3", "b-1", "g-1"}
    history = query(
        database_url,
        "SELECT 1 FROM durable_history WHERE workflow_id IN ('c-1', 'f-1', 'f-2')",
    )
    assert history == []
    none_old = as_json(
        durable_cli(spec, "purge", "--name", "bk.b", "--older-than", "1h", "--dry-run", "--json")
    )
    assert none_old["matched"] == 0


def test_the_single_id_forms_are_unchanged(
    durable: Durable, mixed: None, spec: str, database_url: str
) -> None:
    result = durable_cli(spec, "cancel", "a-1")
    assert result.exit_code == 0 and result.stdout == "cancellation of a-1 requested\n"
    result = durable_cli(spec, "retry", "f-1")
    assert result.exit_code == 0 and result.stdout == "retrying f-1 replaying its whole history\n"
    result = durable_cli(spec, "resume", "a-2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "resumed a-2: activation sent; steps re-sent: none\n"
    ended = durable_cli(spec, "resume", "c-1")
    assert ended.exit_code == 1 and "already completed" in one_line_error(ended)
    assert cancel_requested(database_url) == {"a-1"}


def on_a_terminal(answer: str, *args: str) -> tuple[int, str]:
    """Run ``durable ARGS`` on a pseudo-terminal, answer its question; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "durable.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 30
    answered = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if not answered and b"[y/N]" in output:
                os.write(master, answer.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=10), output.decode()
    finally:
        os.close(master)


def test_on_a_terminal_it_asks_first_showing_the_count(
    durable: Durable, mixed: None, database_url: str
) -> None:
    args = ("purge", "--name", "bk.a", "--database-url", database_url)
    code, output = on_a_terminal("n", *args)
    assert code == 1 and "Purge 3 run(s)? [y/N]" in output and "not confirmed" in output
    assert len(query(database_url, "SELECT id FROM durable_workflows")) == 8
    code, output = on_a_terminal("y", *args)
    assert code == 0, output
    assert "purged 3 run(s)" in output
    assert len(query(database_url, "SELECT id FROM durable_workflows")) == 5
