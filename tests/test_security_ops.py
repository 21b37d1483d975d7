"""Operating with secrets, for real: ``durable show`` on encrypted runs, retention run by the
beat, and the least-privilege deployment that docs/security.md describes."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet as KeyMaker
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import ProgrammingError

from durable import Durable
from durable.beat import Beat
from durable.cli import cli
from durable.codec import Compression, Fernet, seal
from durable.store import engine as store_engine
from durable.store.models import metadata
from tests.apps.crash_app import build
from tests.conftest import Background, clean_keys, clean_tables, make_app, query, wait_until

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
    thread = Background(leader.run)
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


# -- least privilege -----------------------------------------------------------------------------

SECURITY_DOC = ROOT / "docs" / "security.md"


def doc_block(language: str, containing: str) -> str:
    """The code block of docs/security.md in ``language`` that contains ``containing``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", SECURITY_DOC.read_text(), re.S)
    return next(b for b in blocks if containing in b)


def documented_grants(role: str, password: str, database: str) -> list[str]:
    """The documented SQL statements, for ``role`` on ``database``."""
    sql = "\n".join(line.split("--")[0] for line in doc_block("sql", "GRANT").splitlines())
    sql = sql.replace("durable_worker", role).replace("choose-a-password", password)
    sql = sql.replace("ON DATABASE durable ", f'ON DATABASE "{database}" ')
    return [s.strip() for s in sql.split(";") if s.strip()]


def documented_acl(user: str, password: str, prefix: str, db: int) -> list[str]:
    """The documented ``ACL SETUSER`` arguments, for ``user`` and the key prefix ``prefix``."""
    block = doc_block("sh", "ACL SETUSER")
    command = block[block.index("redis-cli ACL SETUSER") :].replace("\\\n", " ")
    tokens = shlex.split(command, comments=True)
    assert tokens[:4] == ["redis-cli", "ACL", "SETUSER", "shop"]
    rules = [t.replace("shop:", f"{prefix}:").replace("/0.", f"/{db}.") for t in tokens[4:]]
    return [user, *[f">{password}" if r.startswith(">") else r for r in rules]]


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def query_none(database_url: str, sql: str) -> None:
    with store_engine.autocommit(database_url).connect() as conn:
        conn.execute(text(sql))


@pytest.fixture
def least_privilege(
    database_url: str, redis_url: str, prefix: str
) -> Iterator[tuple[str, str, str]]:
    """A PostgreSQL role and a Redis ACL user made from docs/security.md, dropped afterwards.

    Yields the role's database URL, the user's Redis URL and the user's name.
    """
    clean_tables(database_url)
    role, secret = f"durable_worker_{prefix}", uuid.uuid4().hex
    database = make_url(database_url).database or ""
    admin_redis = redis.Redis.from_url(redis_url, decode_responses=True)
    db = int(admin_redis.connection_pool.connection_kwargs.get("db") or 0)
    user = f"durable-test-{prefix}"
    # Beyond the documented commands: INCRBY, which the test app's tasks count their runs with.
    admin_redis.execute_command("ACL", "SETUSER", *documented_acl(user, secret, prefix, db))
    admin_redis.execute_command("ACL", "SETUSER", user, "+incrby")
    for statement in documented_grants(role, secret, database):
        query_none(database_url, statement)
    role_url = make_url(database_url).set(username=role, password=secret)
    try:
        yield (
            role_url.render_as_string(hide_password=False),
            with_credentials(redis_url, user, secret),
            user,
        )
    finally:
        store_engine.dispose_all()
        query_none(database_url, f'DROP OWNED BY "{role}"')
        query_none(database_url, f'DROP ROLE "{role}"')
        admin_redis.execute_command("ACL", "DELUSER", user)
        clean_keys(redis_url, prefix)
        admin_redis.close()


def test_a_least_privilege_deployment_runs_workflows(
    least_privilege: tuple[str, str, str],
    database_url: str,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    role_url, acl_url, user = least_privilege
    grants = doc_block("sql", "GRANT")
    sequences = query(
        database_url,  # durable's own: other tests' example apps add tables of theirs
        "SELECT sequencename AS name FROM pg_sequences WHERE sequencename LIKE 'durable\\_%'",
    )
    assert set(metadata.tables) | {s.name for s in sequences} <= set(re.findall(r"\w+", grants))
    assert "durable_alembic_version" not in grants

    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env.update(DURABLE_DATABASE_URL=role_url, DURABLE_REDIS_URL=acl_url, CRASH_PREFIX=prefix)
    app = ["-A", "tests.apps.crash_app"]
    worker = [*app, "worker", "-E", "--pool=prefork", "--concurrency=1", "--loglevel=INFO"]
    beat = ["-m", "durable.cli", "beat", "--app", "tests.apps.crash_app:app"]
    procs = [
        spawn(["-m", "celery", *worker, f"--hostname=lp-{prefix}@%h"], env, tmp_path / "w.log"),
        spawn([*beat, "--sweep-interval", "0.5"], env, tmp_path / "beat.log"),
    ]
    try:
        client_app, durable = build(role_url, acl_url, prefix)
        nap = durable.start("crash.nap", 0.3, workflow_id="lp-nap")  # a timer, then a step
        waiting = durable.start("crash.wait", workflow_id="lp-wait")
        durable.signal("lp-wait", "go", {"ok": True})
        assert nap.result(timeout=30) == "after"
        assert waiting.result(timeout=30) == [{"ok": True}, "after"]
        assert wait_until(lambda: client_app.control.ping(timeout=0.5), what="a pong")
    finally:
        for proc in procs:
            stop(proc)
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert "NoPermissionError" not in logs and "permission denied" not in logs

    engine = create_engine(role_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == make_url(role_url).username
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(text("CREATE TABLE durable_intruder (id int)"))
    engine.dispose()
    restricted = redis.Redis.from_url(acl_url)
    for command in (lambda: restricted.keys("*"), lambda: restricted.get("elsewhere:key")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            command()
    restricted.close()
    age(database_url, "lp-nap")
    purged = invoke("purge", "--older-than", "1d", "--database-url", role_url)
    assert purged.exit_code == 0, purged.output
    assert rows_of(database_url, "lp-nap")["durable_workflows"] == 0
    assert rows_of(database_url, "lp-wait")["durable_workflows"] == 1

    admin_redis = redis.Redis.from_url(redis_url, decode_responses=True)
    refused = [e for e in admin_redis.acl_log(count=1000) if e["username"] == user]
    admin_redis.close()
    # Only the two probes above, the beat's look at the eviction policy, which it skips when
    # refused ("config|get"; "config" on Redis 6.2), and, on Redis before 7.2, redis-py's
    # CLIENT SETINFO at connect, whose refusal it ignores ("client" on 6.2).
    ignored = {"config|get", "config", "client"}
    assert {e["object"] for e in refused} - ignored == {"keys", "elsewhere:key"}, refused


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
