"""Operating with secrets, for real: ``durable show`` on encrypted runs, retention run by the
beat, and the least-privilege deployment that docs/security.md describes."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet as KeyMaker

from durable import Durable
from durable.beat import Beat
from durable.cli import cli
from durable.codec import Compression, Fernet, seal
from tests.conftest import clean_keys, clean_tables, make_app, query, wait_until

ROOT = Path(__file__).resolve().parent.parent
SECRET = "tok_4242424242424242"
CLI = SimpleNamespace(durable=None)
"""What ``--app tests.test_security_ops:CLI.durable`` loads: the app of the encrypted run."""


def invoke(*args: str, **env: str) -> Result:
    """Run ``durable ARGS`` in-process, ignoring any DURABLE_* set by the caller's shell."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    return CliRunner().invoke(cli, list(args), env={**clean, **env}, catch_exceptions=False)


@pytest.fixture
def secret_run(
    database_url: str, redis_url: str, prefix: str
) -> Iterator[tuple[str, str, Durable]]:
    """A completed run whose every value was encrypted; yields (new key, old key, its app)."""
    clean_tables(database_url)
    old_key, new_key = KeyMaker.generate_key().decode(), KeyMaker.generate_key().decode()
    codec = Compression(min_size=64) | Fernet(keys=[new_key, old_key])
    app, durable = make_app(database_url, redis_url, prefix, codec=codec)

    @app.task(name="t.charge", shared=False)
    def charge(token: str) -> dict[str, str]:
        return {"charged": token}

    @durable.workflow("wf.secret")
    def wf(ctx: Any, token: str, *, customer: str) -> dict[str, Any]:
        ctx.set_event("last4", token[-4:])
        approved = ctx.wait_for_signal("approve")
        return {"charge": ctx.step(charge, token), "approved": approved, "customer": customer}

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        run = durable.start("wf.secret", SECRET, customer="alice", workflow_id="sec-1")
        durable.signal("sec-1", "approve", {"by": "bob"})
        run.result(timeout=20)
    CLI.durable = durable
    yield new_key, old_key, durable
    CLI.durable = None
    clean_keys(redis_url, prefix)


def shown(database_url: str, *options: str, **env: str) -> dict[str, Any]:
    result = invoke("show", "sec-1", "--json", "--database-url", database_url, *options, **env)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def values(run: dict[str, Any]) -> list[Any]:
    """Every value of a run that a codec encodes (events and signal waits have no args)."""
    steps = [s[k] for s in run["steps"] for k in ("args", "kwargs", "result")]
    found = [
        run["args"],
        run["kwargs"],
        run["result"],
        *steps,
        *[s["payload"] for s in run["signals"]],
        *run["events"].values(),
    ]
    return [v for v in found if v is not None]


def test_show_decodes_with_the_key_and_hides_values_without_it(
    secret_run: tuple[str, str, Durable], database_url: str
) -> None:
    new_key, old_key, _ = secret_run
    hidden = shown(database_url)
    assert set(values(hidden)) == {"<encrypted>"}
    assert len(values(hidden)) == 3 + (3 + 2) + 1 + 1
    assert [s["name"] for s in hidden["steps"]] == ["last4", "approve", "t.charge"]

    opened = shown(database_url, "--key", new_key)
    assert opened["args"] == [SECRET] and opened["kwargs"] == {"customer": "alice"}
    assert opened["result"] == {
        "charge": {"charged": SECRET},
        "approved": {"by": "bob"},
        "customer": "alice",
    }
    assert [s["result"] for s in opened["steps"]] == ["4242", {"by": "bob"}, {"charged": SECRET}]
    assert opened["steps"][2]["args"] == [SECRET]
    assert opened["signals"][0]["payload"] == {"by": "bob"}
    assert opened["events"] == {"last4": "4242"}
    # Keys from the environment, comma-separated, in any order; the old key alone opens
    # nothing the new one wrote.
    assert shown(database_url, DURABLE_ENCRYPTION_KEYS=f"{old_key},{new_key}") == opened
    assert shown(database_url, "--key", old_key, "--key", new_key) == opened
    assert set(values(shown(database_url, "--key", old_key))) == {"<encrypted>"}
    # The app's own codec, through --app.
    assert shown(database_url, "--app", "tests.test_security_ops:CLI.durable") == opened

    table = invoke("show", "sec-1", "--database-url", database_url)
    assert table.exit_code == 0, table.output
    assert "<encrypted>" in table.stdout and "could not be decoded" in table.stdout
    assert "4242" not in table.stdout and "alice" not in table.stdout
    table = invoke("show", "sec-1", "--database-url", database_url, "--key", new_key)
    assert SECRET in table.stdout and "alice" in table.stdout and "<encrypted>" not in table.stdout


def test_show_opens_compression_without_a_key_and_names_what_it_cannot_open(
    secret_run: tuple[str, str, Durable], database_url: str
) -> None:
    stored = {
        "zipped": seal(json.dumps({"n": "1" * 100}), Compression(min_size=1)),
        "broken": '{"$durable": "zlib", "data": "bm90IHpsaWI="}',
        "custom": '{"$durable": "kms", "data": "eA=="}',
    }
    for key, value in stored.items():
        query(
            database_url,
            "INSERT INTO durable_events (workflow_id, key, value) "
            "VALUES ('sec-1', :key, CAST(:value AS jsonb)) RETURNING key",
            key=key,
            value=value,
        )
    events = shown(database_url)["events"]
    assert events == {
        "last4": "<encrypted>",
        "zipped": {"n": "1" * 100},
        "broken": "<encoded: zlib>",
        "custom": "<encoded: kms>",
    }


def test_show_refuses_a_malformed_key_without_echoing_it(
    secret_run: tuple[str, str, Durable], database_url: str
) -> None:
    result = invoke("show", "sec-1", "--database-url", database_url, "--key", "not-a-key-1234")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("durable: ") and "--key" in lines[0]
    assert "not-a-key-1234" not in result.output


# -- retention ---------------------------------------------------------------------------------

TABLES = ("durable_steps", "durable_history", "durable_signals", "durable_events", "durable_timers")


def rows_of(database_url: str, workflow_id: str) -> dict[str, int]:
    """How many rows each table holds for a run (its own row under ``durable_workflows``)."""
    counts = {
        table: query(
            database_url,
            f"SELECT count(*) AS n FROM {table} WHERE workflow_id = :id",
            id=workflow_id,
        )[0].n
        for table in TABLES
    }
    counts["durable_workflows"] = query(
        database_url, "SELECT count(*) AS n FROM durable_workflows WHERE id = :id", id=workflow_id
    )[0].n
    return counts


def age(database_url: str, *ids: str, days: int = 31) -> None:
    """Move runs' times back, as if they had started and finished ``days`` ago."""
    query(
        database_url,
        "UPDATE durable_workflows SET created_at = created_at - make_interval(days => :days), "
        "finished_at = finished_at - make_interval(days => :days) WHERE id = ANY(:ids) "
        "RETURNING id",
        days=days,
        ids=list(ids),
    )


def double(x: int) -> int:
    return 2 * x


class Lines(logging.Handler):
    """Keeps the messages logged to it (the worker's logging set-up replaces the root's)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_beat_purges_finished_runs_past_retention(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    app, durable = make_app(database_url, redis_url, prefix, retention=timedelta(days=30))

    @durable.workflow("wf.kept")
    def wf(ctx: Any, x: int) -> int:
        ctx.set_event("seen", x)
        got = ctx.wait_for_signal("go", timeout=timedelta(hours=1))  # a timer row
        return int(ctx.step(double, got, local=True))

    old, recent = ["old-1", "old-2", "old-3"], "recent-1"
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        for wid in [*old, recent, "running-1"]:
            durable.start("wf.kept", 1, workflow_id=wid)
        for wid in [*old, recent]:
            wait_until(lambda w=wid: rows_of(database_url, w)["durable_timers"], what="the wait")
            durable.signal(wid, "go", 21)
        for wid in [*old, recent]:
            assert durable.run(wid).result(timeout=20) == 42
        durable.signal("running-1", "note", "unread")
    assert all(n > 0 for n in rows_of(database_url, "old-1").values())
    age(database_url, *old, "running-1")  # a run still running is never purged, however old

    beats = [Beat(durable, sweep_interval=0.1, retention_batch=2) for _ in range(2)]
    leader, standby = beats
    logged, logger = Lines(), logging.getLogger("durable.beat")
    level = logger.level
    logger.addHandler(logged)
    logger.setLevel(logging.INFO)
    thread = threading.Thread(target=leader.run, daemon=True)
    thread.start()
    try:
        # Three runs, two per batch: a full batch is followed by another at the next sweep.
        wait_until(lambda: leader.stats.runs_purged == 3, timeout=10, what="the old runs purged")
        for wid in old:
            assert set(rows_of(database_url, wid).values()) == {0}, wid
        for wid in (recent, "running-1"):
            assert all(n > 0 for n in rows_of(database_url, wid).values()), wid
        purges = [line for line in logged.lines if ": purged" in line]
        assert purges[0].startswith("durable beat: purged 2 run(s) finished more than 30d ago;")
        assert purges[1].startswith("durable beat: purged 1 run(s)")
        # The backlog is gone: the next pass waits for the interval (minutes), and a beat
        # that does not lead never purges.
        age(database_url, recent)
        for _ in range(5):
            standby.tick()
            time.sleep(0.1)
        assert not standby.leader.held() and standby.stats.runs_purged == 0
        assert leader.stats.runs_purged == 3
        assert rows_of(database_url, recent)["durable_workflows"] == 1
    finally:
        leader.stopping.set()
        thread.join(timeout=5)
        logger.removeHandler(logged)
        logger.setLevel(level)
        for beat in beats:
            beat.leader.release()
        clean_keys(redis_url, prefix)


# -- docker-compose ------------------------------------------------------------------------------


def test_compose_keeps_flower_behind_a_password_and_the_stores_unpublished() -> None:
    text_ = (ROOT / "docker-compose.yml").read_text()
    services = text_[text_.index("\nservices:") : text_.index("\nvolumes:")]
    blocks: dict[str, str] = {}
    name = ""
    for line in services.splitlines():
        start = re.fullmatch(r"  (\w[\w-]*):", line)
        if start:
            name = start.group(1)
        elif name and line.startswith("    "):
            blocks[name] = blocks.get(name, "") + line + "\n"
    assert {"postgres", "redis", "worker", "beat", "flower"} <= set(blocks)
    flower = blocks["flower"]
    # Required from the environment, with no default: `:?` stops compose without it.
    assert "FLOWER_BASIC_AUTH: ${FLOWER_BASIC_AUTH:?" in flower
    assert "FLOWER_UNAUTHENTICATED_API" not in text_
    # Only the broker and Flower's own settings: no database URL, no keys, nothing merged in.
    after = flower[flower.index("    environment:\n") :].splitlines()[1:]
    environment = itertools.takewhile(lambda x: x.startswith("      "), after)
    keys = [m.group(1) for m in (re.match(r"      ([^\s#][^:]*):", x) for x in environment) if m]
    assert keys and all(k.startswith(("CELERY_", "FLOWER_")) for k in keys), keys
    assert "ports:" not in blocks["postgres"] and "ports:" not in blocks["redis"]
    published = re.findall(r"ports:\n((?:\s+- .*\n)+)", services)
    for port in re.findall(r'- "?([^"\n]+)', "".join(published)):
        assert port.startswith("127.0.0.1:"), port
