"""``durable schedule``: the commands against a real store; ``trigger`` and ``--app`` in a real
process that loads ``tests/cli_app.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from durable.cli import cli
from durable.store import engine as store_engine
from tests.conftest import clean_keys, clean_tables, query

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(database_url: str) -> Iterator[str]:
    clean_tables(database_url)
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")
    yield database_url
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")


def invoke(database_url: str, *args: str, stdin: str | None = None) -> Result:
    """``durable --database-url URL ARGS`` in-process, ignoring the caller's DURABLE_*."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    argv = ["--database-url", database_url, *args]
    return CliRunner().invoke(cli, argv, env=clean, input=stdin, prog_name="durable")


def one_line_error(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("durable: ")
    return lines[0]


def test_add_list_pause_resume_remove(store: str) -> None:
    nightly = ["--workflow", "reports.nightly", "--cron", "0 3 * * *", "--args", '["eu"]']
    added = invoke(store, "schedule", "add", "nightly", *nightly, "--timezone", "Europe/Paris")
    assert added.exit_code == 0, added.output
    assert added.stdout.startswith("schedule nightly: next fire ")
    every = invoke(store, "schedule", "add", "tick", "--workflow", "ops.ping", "--every", "30")
    assert every.exit_code == 0, every.output
    listed = invoke(store, "schedule", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["nightly"]["cron"] == "0 3 * * *"
    assert rows["nightly"]["timezone"] == "Europe/Paris"
    assert rows["nightly"]["args"] == ["eu"]
    assert rows["tick"]["every"] == 30.0
    assert rows["tick"]["next_fire_at"] is not None and rows["tick"]["last_status"] is None
    assert invoke(store, "schedule", "pause", "tick").stdout == "schedule tick: paused\n"
    table = invoke(store, "schedule", "list").stdout
    assert "paused" in table and "0 3 * * * (Europe/Paris)" in table and "every 30s" in table
    assert invoke(store, "schedule", "resume", "tick").stdout.startswith("schedule tick: next")
    assert invoke(store, "schedule", "remove", "tick").stdout == "schedule tick: removed\n"
    assert [r.name for r in query(store, "SELECT name FROM durable_schedules")] == ["nightly"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--cron", "0 25 * * *"],
            1,
            "durable: schedule 'x': invalid cron expression '0 25 * * *': bad hour",
        ),
        (
            ["--cron", "0 3 * * *", "--timezone", "Europe/Pariss"],
            1,
            "durable: schedule 'x': unknown time zone 'Europe/Pariss'",
        ),
        (
            ["--every", "0.5"],
            1,
            "durable: schedule 'x': the interval must be a whole number of seconds, "
            "at least 1, not 0.5",
        ),
        (
            ["--cron", "* * * * *", "--every", "5"],
            2,
            "durable: give exactly one of --cron and --every; see 'durable schedule add --help'",
        ),
    ],
)
def test_bad_definitions_fail_with_one_line_and_write_nothing(
    store: str, args: list[str], code: int, message: str
) -> None:
    result = invoke(store, "schedule", "add", "x", "--workflow", "w", *args)
    assert result.exit_code == code
    assert one_line_error(result) == message
    assert query(store, "SELECT name FROM durable_schedules") == []


def test_unknown_names_fail_with_one_line(store: str) -> None:
    for verb in ("pause", "resume", "remove"):
        result = invoke(store, "schedule", verb, "ghost")
        assert result.exit_code == 1
        assert one_line_error(result) == "durable: no schedule named 'ghost'"


def test_schedule_commands_print_json(store: str) -> None:
    every = ("--workflow", "ops.ping", "--every", "30", "--json")
    added = invoke(store, "schedule", "add", "tick", *every)
    assert added.exit_code == 0, added.output
    assert (json.loads(added.stdout)["name"], json.loads(added.stdout)["every"]) == ("tick", 30.0)
    paused = json.loads(invoke(store, "schedule", "pause", "tick", "--json").stdout)
    assert paused["paused"] is True
    resumed = json.loads(invoke(store, "schedule", "resume", "tick", "--json").stdout)
    assert resumed["paused"] is False and resumed["next_fire_at"] is not None
    removed = invoke(store, "schedule", "remove", "tick", "--json")
    assert json.loads(removed.stdout) == {"name": "tick", "removed": True}
    crontab = "*/5 * * * * celery call shop.sync\n0 3 * * * /opt/run.sh\n"
    imported = invoke(store, "schedule", "import-crontab", "-", "--json", stdin=crontab)
    assert imported.exit_code == 1
    report = json.loads(imported.stdout)
    assert (report["added"], report["updated"], report["unchanged"]) == (["shop.sync"], [], [])
    assert [problem[:7] for problem in report["problems"]] == ["line 2:"]


def test_import_crontab_adds_what_it_can_and_reports_each_other_line(store: str) -> None:
    crontab = (
        "MAILTO=ops@example.com\n"
        "0 3 * * * durable start reports.nightly --args '[\"eu\"]'\n"
        "0 3 * * * /opt/run_ai_pipeline.sh\n"
        "*/5 * * * * celery call shop.sync\n"
        "@reboot durable start reports.nightly\n"
    )
    result = invoke(store, "schedule", "import-crontab", "-", stdin=crontab)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "schedule reports.nightly: added",
        "schedule shop.sync: added",
    ]
    assert result.stderr.splitlines() == [
        "cannot map line 3: the command names no workflow or task (use durable start NAME or "
        "celery call TASK): 0 3 * * * /opt/run_ai_pipeline.sh",
        "cannot map line 5: @reboot has no time to schedule: @reboot durable start reports.nightly",
        "durable: 2 crontab line(s) could not be mapped",
    ]
    again = invoke(store, "schedule", "import-crontab", "-", stdin=crontab.splitlines()[1])
    assert (again.exit_code, again.stdout) == (0, "schedule reports.nightly: unchanged\n")


def test_trigger_and_app_commands_in_a_real_process(
    store: str, redis_url: str, prefix: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env.update(
        CLI_APP_DATABASE_URL=store,
        CLI_APP_REDIS_URL=redis_url,
        CLI_APP_BROKER_URL=redis_url,
        CLI_APP_PREFIX=prefix,
        DURABLE_APP="tests.cli_app",
        PYTHONPATH=str(ROOT),
    )

    def durable(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "durable.cli", "schedule", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)

    try:
        unknown = durable("add", "greet", "--workflow", "cli.nope", "--every", "60")
        assert unknown.returncode == 1
        assert unknown.stderr.startswith("durable: unknown workflow 'cli.nope'")
        added = durable(
            "add", "greet", "--workflow", "cli.greet", "--every", "60", "--args", '["ann"]'
        )
        assert added.returncode == 0, added.stderr
        # With the app, the Redis index is updated at once.
        client = redis.Redis.from_url(redis_url)
        assert client.zscore(f"{prefix}:schedules", "greet") is not None
        client.close()
        triggered = durable("trigger", "greet")
        assert triggered.returncode == 0, triggered.stderr
        run_id = triggered.stdout.strip()
        assert run_id.startswith("greet@") and run_id.endswith("Z")
        (run,) = query(store, "SELECT name, args FROM durable_workflows WHERE id = :id", id=run_id)
        assert (run.name, run.args) == ("cli.greet", ["ann"])
        listed = json.loads(durable("list", "--json").stdout)
        assert (listed[0]["last_run_id"], listed[0]["last_status"]) == (run_id, "running")
    finally:
        clean_keys(redis_url, prefix)
