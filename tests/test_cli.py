"""The ``durable`` command against a real PostgreSQL database of its own (and Redis for
``start`` and ``beat``)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result

from durable.cli import cli, load_durable
from durable.config import normalise_database_url
from durable.dev.services import Services, create_database, drop_database
from durable.errors import ConfigurationError
from durable.store import engine as store_engine
from durable.store import runs, steps
from tests.conftest import clean_keys
from tests.store_helpers import complete_step, schedule_step

ROOT = Path(__file__).resolve().parent.parent
PREFIX = f"dcli{uuid.uuid4().hex[:10]}"
UNREACHABLE = "postgresql://nobody:secret@127.0.0.1:1/x"


def invoke(*args: str, **env: str | None) -> Result:
    """Run ``durable ARGS`` in-process, ignoring any DURABLE_* set by the caller's shell."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    return CliRunner().invoke(cli, list(args), env={**clean, **env}, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    """The one ``durable: ...`` line a failing command must print on stderr, and no more."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("durable: ")
    return lines[0]


@pytest.fixture(scope="module")
def database_url(services: Services, redis_url: str) -> Iterator[str]:
    """A database of the module's own on the suite's server, migrated by ``durable db upgrade``."""
    name = f"durable_cli_test_{uuid.uuid4().hex[:10]}"
    url = create_database(services.database_url, name)
    app_env = {  # read by tests/cli_app.py when a test loads it
        "CLI_APP_DATABASE_URL": url,
        "CLI_APP_REDIS_URL": redis_url,
        "CLI_APP_BROKER_URL": redis_url,
        "CLI_APP_PREFIX": PREFIX,
    }
    saved = {k: os.environ.get(k) for k in app_env}
    os.environ.update(app_env)
    try:
        result = invoke("db", "upgrade", "--database-url", url)
        assert result.exit_code == 0, result.output
        yield url
    finally:
        for engine in store_engine.engines(normalise_database_url(url)):
            engine.dispose()
        drop_database(services.database_url, name)
        clean_keys(redis_url, PREFIX)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def seeded(database_url: str) -> dict[str, str]:
    """Two runs: one running with a completed and a started step, one failed."""
    ids = {"running": "cli-running", "failed": "cli-failed"}
    engine = store_engine.autocommit(normalise_database_url(database_url))
    with engine.connect() as conn:
        assert runs.insert_run(conn, ids["running"], "orders.fulfill", '["o-1"]', "{}")
        for seq, name in ((1, "tasks.charge"), (2, "tasks.ship")):
            assert schedule_step(conn, ids["running"], seq, name, "[]", "{}", "{}")
            assert steps.claim_step(conn, ids["running"], seq, "worker-1", 30.0)
        assert complete_step(conn, ids["running"], 1, '{"txn": "t-1"}')
        time.sleep(0.01)  # a distinct created_at, so "newest first" is well defined
        assert runs.insert_run(conn, ids["failed"], "nightly.batch", "[]", '{"day": 1}')
        assert runs.acquire(conn, ids["failed"], "worker-1", 30.0)
        assert runs.finish(conn, ids["failed"], "worker-1", "failed", error="ValueError: boom")
    return ids


def test_db_upgrade_runs_again(database_url: str) -> None:
    result = invoke("db", "upgrade", "--database-url", database_url)
    assert result.exit_code == 0
    assert "up to date" in result.stdout


def test_list_table(database_url: str, seeded: dict[str, str]) -> None:
    result = invoke("list", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    for word in ("cli-running", "cli-failed", "orders.fulfill", "running", "failed", "created"):
        assert word in result.stdout


def test_list_json_filters(database_url: str, seeded: dict[str, str]) -> None:
    result = invoke("list", "--json", "--database-url", database_url)
    rows = json.loads(result.stdout)
    seeded_ids = set(seeded.values())  # other tests of the module start runs of their own
    assert [r["id"] for r in rows if r["id"] in seeded_ids] == ["cli-failed", "cli-running"]
    assert set(rows[0]) >= {"id", "name", "status", "created_at", "updated_at"}
    datetime.fromisoformat(rows[0]["created_at"])
    failed = json.loads(
        invoke("list", "--json", "--status", "failed", "--database-url", database_url).stdout
    )
    assert [r["id"] for r in failed if r["id"] in seeded_ids] == ["cli-failed"]
    assert {r["status"] for r in failed} == {"failed"}
    named = json.loads(
        invoke("list", "--json", "--name", "orders.fulfill", "--database-url", database_url).stdout
    )
    assert [r["id"] for r in named if r["id"] in seeded_ids] == ["cli-running"]
    assert {r["name"] for r in named} == {"orders.fulfill"}
    newest = json.loads(
        invoke("list", "--json", "--limit", "1", "--database-url", database_url).stdout
    )
    assert [r["id"] for r in newest] == [rows[0]["id"]]


def test_options_read_the_environment(database_url: str, seeded: dict[str, str]) -> None:
    result = invoke(
        "list", DURABLE_DATABASE_URL=database_url, DURABLE_LIST_JSON="1", DURABLE_LIST_LIMIT="1"
    )
    newest = json.loads(invoke("list", "--json", "--database-url", database_url).stdout)[0]
    assert [r["id"] for r in json.loads(result.stdout)] == [newest["id"]]


def test_show_json(database_url: str, seeded: dict[str, str]) -> None:
    result = invoke("show", "cli-running", "--json", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert set(run) >= {"id", "name", "status", "result", "error", "steps", "events"}
    assert (run["id"], run["name"], run["status"], run["events"]) == (
        "cli-running", "orders.fulfill", "running", {},
    )  # fmt: skip
    assert run["args"] == ["o-1"]
    first, second = run["steps"]
    assert set(first) >= {"seq", "name", "status", "attempts", "result", "error"}
    assert (first["seq"], first["name"], first["status"]) == (1, "tasks.charge", "completed")
    assert (first["attempts"], first["result"], first["error"]) == (1, {"txn": "t-1"}, None)
    datetime.fromisoformat(first["completed_at"])
    assert (second["name"], second["status"], second["result"]) == ("tasks.ship", "started", None)
    events = [h["event"] for h in run["history"]]
    assert events[0] == "started"
    assert {"step scheduled", "step started", "step completed"} <= set(events)
    datetime.fromisoformat(run["history"][0]["at"])

    failed = json.loads(
        invoke("show", "cli-failed", "--json", "--database-url", database_url).stdout
    )
    assert (failed["status"], failed["error"], failed["steps"]) == (
        "failed",
        "ValueError: boom",
        [],
    )


def test_show_text(database_url: str, seeded: dict[str, str]) -> None:
    result = invoke("show", "cli-running", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    for word in ("cli-running", "orders.fulfill", "steps", "tasks.charge", "t-1", "timeline"):
        assert word in result.stdout
    assert "step completed" in result.stdout
    failed = invoke("show", "cli-failed", "--database-url", database_url)
    assert "ValueError: boom" in failed.stdout


def test_show_unknown_id(database_url: str) -> None:
    result = invoke("show", "no-such-run", "--database-url", database_url)
    assert result.exit_code == 1
    assert "no-such-run" in one_line_error(result)
    assert result.stdout == ""


def test_unreachable_database() -> None:
    result = invoke("list", "--database-url", UNREACHABLE)
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "postgresql://nobody:***@127.0.0.1:1/x" in line
    assert "refused" in line.lower()
    assert "secret" not in line


def test_malformed_database_url() -> None:
    result = invoke("list", "--database-url", "postgresql://nobody:secret@host:port/x")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "nobody:***@host" in line
    assert "secret" not in line


def test_no_database_url() -> None:
    result = invoke("list")
    assert result.exit_code == 1
    assert "DURABLE_DATABASE_URL" in one_line_error(result)


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--args", "[1,", "not valid JSON"),
        ("--args", '{"a": 1}', "must be a JSON array"),
        ("--kwargs", "[1]", "must be a JSON object"),
        ("--kwargs", '{"workflow_id": "x"}', "cannot pass workflow_id"),
    ],
)
def test_start_rejects_bad_json(option: str, value: str, reason: str) -> None:
    result = invoke("start", "cli.greet", option, value)
    assert result.exit_code == 2
    line = one_line_error(result)
    assert option in line
    assert reason in line


def test_start_prints_the_id(database_url: str) -> None:
    args = ("start", "cli.greet", "--app", "tests.cli_app", "--args", '["ann"]')
    result = invoke(*args, "--kwargs", '{"punctuation": "?"}')
    assert result.exit_code == 0, result.output
    workflow_id = result.stdout.strip()
    assert result.stdout == f"{workflow_id}\n"
    with store_engine.autocommit(normalise_database_url(database_url)).connect() as conn:
        row = runs.get_run(conn, workflow_id)
    assert row is not None
    assert (row.name, row.args, row.kwargs) == ("cli.greet", ["ann"], {"punctuation": "?"})

    for _ in range(2):  # idempotent by id
        again = invoke("start", "cli.greet", "--id", "cli-fixed", DURABLE_APP="tests.cli_app")
        assert again.stdout == "cli-fixed\n"


def test_start_registers_the_workflows_the_app_includes(database_url: str, redis_url: str) -> None:
    # config.celery_app defines no workflow itself: orders.fulfill is in a module it includes,
    # which a worker imports at start-up, and so must the command.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "CELERY_"))}
    env.update(
        DURABLE_DATABASE_URL=database_url,
        DURABLE_REDIS_URL=redis_url,
        DURABLE_KEY_PREFIX=PREFIX,
        CELERY_KEY_PREFIX=f"{PREFIX}:",
    )
    command = [sys.executable, "-m", "durable.cli", "start", "orders.fulfill"]
    options = ["--app", "config.celery_app:app", "--id", "cli-include", "--args", '["o-1"]']
    done = subprocess.run(
        [*command, *options], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "cli-include\n", "")
    with store_engine.autocommit(normalise_database_url(database_url)).connect() as conn:
        row = runs.get_run(conn, "cli-include")
    assert row is not None and row.name == "orders.fulfill"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


def test_every_command_that_shows_something_has_json() -> None:
    # `durable beat` runs until stopped and shows only its log; every other command prints.
    found = {" ".join(path) for path in _commands(cli)}
    assert {"start", "signal", "cancel", "db upgrade", "schedule trigger"} <= found
    for path in found - {"beat"}:
        result = invoke(*path.split(), "--help")
        assert result.exit_code == 0, result.output
        assert "--json" in result.stdout, f"durable {path} has no --json"


def test_start_signal_cancel_and_db_upgrade_print_json(database_url: str) -> None:
    app = {"DURABLE_APP": "tests.cli_app"}
    started = invoke("start", "cli.greet", "--id", "cli-json", "--json", **app)
    assert (started.exit_code, json.loads(started.stdout)) == (0, {"id": "cli-json"})
    sent = invoke("signal", "cli-json", "go", "--json", **app)
    assert json.loads(sent.stdout) == {"workflow_id": "cli-json", "signal": "go"}
    cancelled = invoke("cancel", "cli-json", "--json", **app)
    assert json.loads(cancelled.stdout) == {"workflow_id": "cli-json", "cancel_requested": True}
    upgraded = invoke("db", "upgrade", "--database-url", database_url, "--json")
    assert json.loads(upgraded.stdout)["up_to_date"] is True


def test_start_unknown_workflow(database_url: str) -> None:
    result = invoke("start", "no.such.workflow", "--app", "tests.cli_app")
    assert result.exit_code == 1
    assert "unknown workflow" in one_line_error(result)


def test_store_commands_can_use_the_app(database_url: str, seeded: dict[str, str]) -> None:
    result = invoke("list", "--json", DURABLE_APP="tests.cli_app")
    assert "cli-running" in {r["id"] for r in json.loads(result.stdout)}


def test_app_specs(database_url: str) -> None:
    found = load_durable("tests.cli_app")
    assert load_durable("tests.cli_app:app") is found
    assert load_durable("tests.cli_app:durable") is found
    for bad in ("tests.no_such_module", "tests.cli_app:nothing", "tests.cli_app:PREFIX"):
        with pytest.raises(ConfigurationError):
            load_durable(bad)


def test_beat_stops_on_sigterm(database_url: str, redis_url: str) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    command = [sys.executable, "-m", "durable.cli", "beat", "--app", "tests.cli_app"]
    proc = subprocess.Popen(
        [*command, "--sweep-interval", "0.1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 20
        # The first sweep marks the (empty) timer index as built: the beat is looping.
        while not client.exists(f"{PREFIX}:timers:built"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "beat never swept"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "durable beat started" in stderr
    assert "durable beat stopped" in stderr
    assert "Traceback" not in stderr


def test_cli_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    written = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert written == gen_cli.render(), "docs/cli.md is stale: run python docs/gen_cli.py"
