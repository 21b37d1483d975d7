"""Bad input, as a hostile user would give it, to every CLI verb and the public API.

Each case asserts three things: a one-line error naming the cause (no traceback), nothing
written (row counts of every table before and after), and no secret in any output (the
database URL carries a password in its query string, the CLI gets an encryption key).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet

from durable import Durable, RetryPolicy
from durable import admin as admin_api
from durable.cli import cli
from durable.config import load_settings
from durable.errors import DurableError
from tests.conftest import clean_keys, query

SECRET = "hunter2-s3cret"
KEY = Fernet.generate_key().decode()
TABLES = (
    "durable_workflows",
    "durable_steps",
    "durable_signals",
    "durable_events",
    "durable_timers",
    "durable_schedules",
    "durable_history",
)
DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 50_000 + "1" + "}" * 50_000


def counts(database_url: str) -> tuple[int, ...]:
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
    return tuple(query(database_url, sql)[0])


def with_password(url: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}password={SECRET}"


def deep_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# -- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(database_url: str, redis_url: str) -> Iterator[dict[str, str | None]]:
    prefix = f"dh{uuid.uuid4().hex[:10]}"
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    yield {
        **clean,
        "DURABLE_DATABASE_URL": with_password(database_url),
        "DURABLE_REDIS_URL": redis_url,
        "DURABLE_ENCRYPTION_KEYS": KEY,
        "HOSTILE_PREFIX": prefix,
    }
    clean_keys(redis_url, prefix)


@pytest.fixture
def running(durable_app: tuple[Celery, Durable], database_url: str) -> str:
    """A running run, ``r-running``, of a workflow that waits for a signal."""
    _, durable = durable_app

    @durable.workflow("hostile.wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    durable.start("hostile.wait", workflow_id="r-running")
    return "r-running"


def invoke(env: dict[str, str | None], args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def assert_clean_failure(result: Result, cause: str) -> None:
    output = result.stdout + result.stderr
    assert result.exit_code != 0, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("durable: "), result.stderr
    assert cause.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in output
    assert SECRET not in output and KEY not in output
    assert "\x1b" not in output and "\x00" not in output and "\u202e" not in output


APP = ["--app", "tests.apps.hostile_app"]
ID_CASES = [
    ("", "must not be empty"),
    ("a\nb", "control character"),
    ("\x1b[2J", "control character"),
    ("a\u202eb", "control character"),
    ("a\u200bb", "control character"),
    ("a\x00b", "control character"),
    ("a\u2028b", "control character"),
    ("x" * 201, "over 200"),
    ("x" * 5000, "over 200"),
]
CLI_CASES: list[tuple[list[str], str]] = [
    # start
    (["start", "no.such.workflow", *APP], "unknown workflow"),
    (["start", "", *APP], "unknown workflow"),
    (["start", "evil\x1b[31m", *APP], "unknown workflow"),
    (["start", "hostile.echo"], "no app"),
    (["start", "hostile.echo", "--app", "no_such_module_x"], "cannot import"),
    (["start", "hostile.echo", "--app", "tests.apps.hostile_app:nothing"], "no attribute"),
    (["start", "hostile.echo", "--app", ":"], "expected module:attr"),
    (["start", "hostile.echo", *APP, "--args", "{"], "not valid JSON"),
    (["start", "hostile.echo", *APP, "--args", '{"a": 1}'], "must be a JSON array"),
    (["start", "hostile.echo", *APP, "--args", DEEP_ARRAY], "nested too deeply"),
    (["start", "hostile.echo", *APP, "--kwargs", DEEP_OBJECT], "nested too deeply"),
    (["start", "hostile.echo", *APP, "--kwargs", "[1]"], "must be a JSON object"),
    (["start", "hostile.echo", *APP, "--kwargs", '{"workflow_id": 1}'], "cannot pass"),
    (["start", "hostile.echo", *APP, "--args", '["a\\u0000b"]'], "NUL character"),
    (["start", "hostile.echo", *APP, "--kwargs", '{"k\\u0000": 1}'], "NUL character"),
    (["start", "hostile.echo", *APP, "--args", "[NaN]"], "not JSON-serialisable"),
    (["start", "hostile.echo", *APP, "--args", "[1e999]"], "not JSON-serialisable"),
    (["start", "hostile.echo", *APP, "--args", '["\\ud800"]'], "not valid UTF-8"),
    (["start", "hostile.echo", *APP, "--args", f'["{"x" * 1_100_000}"]'], "over the limit"),
    *[(["start", "hostile.echo", *APP, "--id", i], why) for i, why in ID_CASES],
    # list
    (["list", "--limit", "0"], "--limit"),
    (["list", "--limit", "-1"], "--limit"),
    (["list", "--limit", "99999999999999999999"], "--limit"),
    (["list", "--limit", "abc"], "--limit"),
    (["list", "--status", "bogus"], "--status"),
    (["list", "--since", "inf"], "--since"),
    (["list", "--since", "nan"], "--since"),
    (["list", "--since", "1e400"], "--since"),
    (["list", "--since", "99999999999d"], "--since"),
    (["list", "--since", "yesterday"], "--since"),
    (["list", "--waiting", "bogus"], "--waiting"),
    (["--database-url", "not a url", "list"], "PostgreSQL URL"),
    (["--database-url", f"mysql://u:{SECRET}@h/d", "list"], "PostgreSQL URL"),
    (["--database-url", f"postgresql://u:{SECRET}@h:port/d", "list"], "not a valid"),
    (["list", "--database-url", f"postgresql://h:port/d?password={SECRET}"], "not a valid"),
    # show
    (["show", "no-such-run"], "no workflow run"),
    *[(["show", i], why) for i, why in ID_CASES],
    (["show", "r-running", "--key", "not-a-key"], "key"),
    # signal
    (["signal", "no-such-run", "go", *APP], "no workflow run"),
    *[(["signal", i, "go", *APP], why) for i, why in ID_CASES],
    *[(["signal", "r-running", n, *APP], why) for n, why in ID_CASES],
    (["signal", "r-running", "go", *APP, "--payload", "{"], "not valid JSON"),
    (["signal", "r-running", "go", *APP, "--payload", DEEP_ARRAY], "nested too deeply"),
    (["signal", "r-running", "go", *APP, "--payload", '"a\\u0000"'], "NUL character"),
    (["signal", "r-running", "go", *APP, "--payload", "NaN"], "not JSON-serialisable"),
    (["signal", "r-running", "go", *APP, "--payload", "-Infinity"], "not JSON-serialisable"),
    (["signal", "r-running", "go", *APP, "--payload", f'"{"x" * 1_100_000}"'], "over the limit"),
    (["signal", "r-running", "go"], "no app"),
    # cancel, resume, retry, fork
    (["cancel", "no-such-run", *APP], "no workflow run"),
    *[(["cancel", i, *APP], why) for i, why in ID_CASES[:4]],
    (["resume", "no-such-run", *APP], "no workflow run"),
    *[(["resume", i, *APP], why) for i, why in ID_CASES[:4]],
    (["retry", "no-such-run", *APP], "no workflow run"),
    (["retry", "r-running", *APP], "not failed"),
    *[(["retry", i, *APP], why) for i, why in ID_CASES[:4]],
    (["fork", "no-such-run", "--from-step", "1", *APP], "no workflow run"),
    (["fork", "r-running", "--from-step", "0", *APP], "--from-step"),
    (["fork", "r-running", "--from-step", "99999999999999", *APP], "--from-step"),
    (["fork", "r-running", "--from-step", "abc", *APP], "--from-step"),
    (["fork", "r-running", *APP], "--from-step"),
    (["fork", "r-running", "--from-step", "1", "--id", "r-running", *APP], "is taken"),
    *[(["fork", "r-running", "--from-step", "1", "--id", i, *APP], w) for i, w in ID_CASES[:4]],
    # purge
    (["purge", "--older-than", "inf"], "--older-than"),
    (["purge", "--older-than", "nan"], "--older-than"),
    (["purge", "--older-than", "-5"], "--older-than"),
    (["purge", "--older-than", "1e309"], "--older-than"),
    (["purge", "--older-than", "9" * 400], "--older-than"),
    (["purge", "--older-than", "999999999w"], "--older-than"),
    (["purge", "--older-than", ""], "--older-than"),
    (["purge"], "--older-than"),
    # timers, reconcile
    (["timers", "list", "--limit", "0"], "--limit"),
    (["timers", "list", "--limit", "99999999999999999999"], "--limit"),
    (["timers", "list", "--workflow", "a\nb"], "control character"),
    (["timers", "bogus"], "no such command"),
    (["reconcile", "--grace", "inf"], "--grace"),
    (["reconcile", "--grace", "nan"], "--grace"),
    (["reconcile", "--grace", "-1"], "--grace"),
    (["reconcile", "--grace", "1e400"], "--grace"),
    (["reconcile", "--limit", "0"], "--limit"),
    # schedule
    (["schedule", "add", "s1", "--workflow", "hostile.echo"], "exactly one"),
    (["schedule", "add", "s1", "--workflow", "x", "--cron", "* * * * *", "--every", "5"], "one"),
    (["schedule", "add", "s1", "--workflow", "hostile.echo", "--cron", "bogus"], "cron"),
    (["schedule", "add", "s1", "--workflow", "w", "--cron", "* * * * * * * *"], "cron"),
    (["schedule", "add", "s1", "--workflow", "w", "--cron", "99 * * * *"], "cron"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "0"], "--every"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "-1"], "--every"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "inf"], "--every"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "nan"], "--every"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "1e300"], "--every"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "abc"], "--every"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "5", "--args", "{"], "--args"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "5", "--args", DEEP_ARRAY], "deep"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "5", "--kwargs", "[]"], "object"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "5", "--timezone", "Mars/X"], "zone"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "5", "--catchup", "x"], "--catchup"),
    (["schedule", "add", "s1", "--workflow", "w", "--every", "5", "--overlap", "x"], "--overlap"),
    (["schedule", "add", "", "--workflow", "w", "--every", "5"], "name"),
    (["schedule", "add", "a\nb", "--workflow", "w", "--every", "5"], "name"),
    (["schedule", "add", "s1", "--workflow", "no.such", "--every", "5", *APP], "unknown workflow"),
    (["schedule", "pause", "no-such-schedule"], "no schedule"),
    (["schedule", "resume", "no-such-schedule"], "no schedule"),
    (["schedule", "remove", "no-such-schedule"], "no schedule"),
    (["schedule", "trigger", "no-such-schedule", *APP], "no schedule"),
    (["schedule", "import-crontab", "/no/such/file"], "no such file"),
    (["schedule", "bogus"], "no such command"),
    # db, beat, the group
    (["db", "upgrade", "--database-url", f"mysql://u:{SECRET}@h/d"], "PostgreSQL URL"),
    (["db", "upgrade", "--database-url", f"postgresql://u:{SECRET}@h:port/d"], "not a valid"),
    (["db", "bogus"], "no such command"),
    (["beat", "--sweep-interval", "0", *APP], "--sweep-interval"),
    (["beat", "--sweep-interval", "-1", *APP], "--sweep-interval"),
    (["beat", "--sweep-interval", "inf", *APP], "--sweep-interval"),
    (["beat", "--sweep-interval", "nan", *APP], "--sweep-interval"),
    (["beat", "--metrics-port", "0", *APP], "--metrics-port"),
    (["beat", "--metrics-port", "70000", *APP], "--metrics-port"),
    (["beat"], "no app"),
    (["bogus-command"], "no such command"),
    (["list", "--no-such-option"], "no such option"),
]


@pytest.mark.parametrize(
    ("args", "cause"), CLI_CASES, ids=[f"{i}-{c[0][0]}" for i, c in enumerate(CLI_CASES)]
)
def test_cli_refuses_bad_input(
    args: list[str], cause: str, cli_env: dict[str, str | None], running: str, database_url: str
) -> None:
    before = counts(database_url)
    assert_clean_failure(invoke(cli_env, args), cause)
    assert counts(database_url) == before


def test_crontab_that_is_not_text(
    tmp_path: Path, cli_env: dict[str, str | None], database_url: str
) -> None:
    binary = tmp_path / "crontab"
    binary.write_bytes(bytes(range(256)) * 4)
    before = counts(database_url)
    assert_clean_failure(
        invoke(cli_env, ["schedule", "import-crontab", str(binary)]), "not a text file"
    )
    assert counts(database_url) == before


# -- the Python API -------------------------------------------------------------------------


@pytest.fixture
def api(durable: Durable, running: str) -> Durable:
    @durable.workflow("hostile.echo")
    def echo(ctx: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    return durable


BAD_IDS: list[tuple[Any, str]] = [
    (12345, "must be a string"),
    (["a"], "must be a string"),
    (b"bytes", "must be a string"),
    (("t",), "must be a string"),
    *ID_CASES,
    ("\ud800", "control character"),
]
BAD_VALUES: list[tuple[Any, str]] = [
    (object(), "not JSON-serialisable"),
    ({1, 2}, "not JSON-serialisable"),
    (math.nan, "not JSON-serialisable"),
    (math.inf, "not JSON-serialisable"),
    ("a\x00b", "NUL character"),
    ({"k\x00": 1}, "NUL character"),
    (["\\", "\x00"], "NUL character"),
    (deep_list(100_000), "nested too deeply"),
    ("\ud800", "not valid UTF-8"),
    (b"bytes", "not JSON-serialisable"),
    ("x" * 1_100_000, "over the limit"),
]
Call = Callable[[Durable], Any]
API_CASES: list[tuple[Call, str]] = [
    (lambda d: d.start("no.such.workflow"), "unknown workflow"),
    (lambda d: d.start(12345), "unknown workflow"),
    (lambda d: d.start("hostile.echo", workflow_id="r-running"), "belongs to a run of"),
    *[((lambda d, i=i: d.start("hostile.echo", workflow_id=i)), w) for i, w in BAD_IDS],
    *[((lambda d, v=v: d.start("hostile.echo", v)), w) for v, w in BAD_VALUES],
    *[((lambda d, v=v: d.start("hostile.echo", key=v)), w) for v, w in BAD_VALUES[:6]],
    *[((lambda d, i=i: d.signal(i, "go")), w) for i, w in BAD_IDS],
    *[((lambda d, n=n: d.signal("r-running", n)), w) for n, w in BAD_IDS],
    *[((lambda d, v=v: d.signal("r-running", "go", v)), w) for v, w in BAD_VALUES],
    (lambda d: d.signal("no-such-run", "go"), "no workflow run"),
    *[((lambda d, i=i: d.cancel(i)), w) for i, w in BAD_IDS[:6]],
    (lambda d: d.cancel("no-such-run"), "no workflow run"),
    *[((lambda d, i=i: d.run(i)), w) for i, w in BAD_IDS[:6]],
    (lambda d: d.run("no-such-run"), "no workflow run"),
    *[((lambda d, k=k: d.get_event("r-running", k)), w) for k, w in BAD_IDS[:6]],
    (lambda d: admin_api.fork(d, "r-running", 0), "from_step"),
    (lambda d: admin_api.fork(d, "r-running", 2**40), "from_step"),
    (lambda d: admin_api.fork(d, "r-running", 1, "a\nb"), "control character"),
    (lambda d: admin_api.fork(d, "r-running", 1, "r-running"), "is taken"),
    (lambda d: admin_api.fork(d, "no-such-run", 1), "no workflow run"),
    (lambda d: d.schedules.add("s", "hostile.echo", cron="bogus"), "cron"),
    (lambda d: d.schedules.add("s", "hostile.echo", every=-1), "interval"),
    (lambda d: d.schedules.add("s", "no.such.workflow", every=5), "unknown workflow"),
    (lambda d: d.schedules.pause("no-such-schedule"), "no schedule"),
]


@pytest.mark.parametrize(("call", "cause"), API_CASES, ids=[str(i) for i in range(len(API_CASES))])
def test_api_refuses_bad_input(
    call: Call, cause: str, api: Durable, database_url: str, capfd: Any
) -> None:
    before = counts(database_url)
    with pytest.raises((DurableError, ValueError)) as info:
        call(api)
    message = str(info.value)
    assert "\n" not in message and cause.lower() in message.lower(), message
    assert counts(database_url) == before
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


SETTINGS_CASES: list[tuple[dict[str, Any], str]] = [
    ({"encryption_key": KEY}, "did you mean 'encryption_keys'"),
    ({"databse_url": "postgresql://h/d"}, "did you mean 'database_url'"),
    ({"max_step": 5}, "did you mean 'max_steps'"),
    ({"lease_tt": 5}, "did you mean 'lease_ttl'"),
    ({"no_such_setting": 1}, "unknown setting"),
    ({"inline_activation": "maybe"}, "inline_activation"),
    ({"eager_start": "2"}, "eager_start"),
    ({"lease_ttl": -1}, "lease_ttl"),
    ({"lease_ttl": 0}, "lease_ttl"),
    ({"lease_ttl": math.inf}, "lease_ttl"),
    ({"lease_ttl": math.nan}, "lease_ttl"),
    ({"lease_ttl": 1e300}, "lease_ttl"),
    ({"lease_ttl": timedelta.max}, "lease_ttl"),
    ({"lease_ttl": True}, "lease_ttl"),
    ({"retention": "forever"}, "retention"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": 1.5}, "max_steps"),
    ({"max_steps": 10**30}, "max_steps"),
    ({"max_steps": "many"}, "max_steps"),
    ({"max_payload_bytes": -1}, "max_payload_bytes"),
    ({"connect_retries": 0}, "connect_retries"),
    ({"key_prefix": 5}, "key_prefix"),
    ({"workflow_queue": ["q"]}, "workflow_queue"),
    ({"redis_url": "http://example/0"}, "redis_url"),
    ({"database_url": f"mysql://u:{SECRET}@h/d"}, "PostgreSQL URL"),
    ({"database_url": f"postgresql://u:{SECRET}@h:port/d"}, "not a valid URL"),
    ({"database_url": f"postgresql://h:port/d?password={SECRET}"}, "not a valid URL"),
]


@pytest.mark.parametrize(
    ("given", "cause"), SETTINGS_CASES, ids=[str(i) for i in range(len(SETTINGS_CASES))]
)
def test_settings_refuse_unknown_and_invalid_values(
    given: dict[str, Any], cause: str, database_url: str, redis_url: str
) -> None:
    before = counts(database_url)
    base = {"database_url": database_url, "redis_url": redis_url}
    with pytest.raises(DurableError) as info:
        Durable(Celery("hostile", set_as_current=False), **{**base, **given}).settings  # noqa: B018
    message = str(info.value)
    assert "\n" not in message and cause.lower() in message.lower(), message
    assert SECRET not in message and KEY not in message
    assert counts(database_url) == before


DURATION_CASES: list[tuple[Call, str]] = [
    (lambda d: d.workflow("w.t1", execution_timeout=-1), "execution_timeout"),
    (lambda d: d.workflow("w.t2", execution_timeout=math.nan), "execution_timeout"),
    (lambda d: d.workflow("w.t3", execution_timeout=1e300), "execution_timeout"),
    (lambda d: d.workflow("w.t4", execution_timeout=timedelta.max), "execution_timeout"),
    (lambda d: d.workflow("w.t5", execution_timeout="10"), "execution_timeout"),  # type: ignore[arg-type]
    (lambda d: RetryPolicy(max_attempts=0), "max_attempts"),
    (lambda d: RetryPolicy(max_attempts=1.5), "max_attempts"),  # type: ignore[arg-type]
    (lambda d: RetryPolicy(max_attempts=2**40), "max_attempts"),
    (lambda d: RetryPolicy(backoff=0.5), "backoff"),
    (lambda d: RetryPolicy(backoff=math.inf), "backoff"),
    (lambda d: RetryPolicy(backoff=math.nan), "backoff"),
    (lambda d: RetryPolicy(initial_interval=-1), "initial_interval"),
    (lambda d: RetryPolicy(initial_interval=math.nan), "initial_interval"),
    (lambda d: RetryPolicy(max_interval=timedelta.max), "max_interval"),
    (lambda d: admin_api.parse_duration("inf"), "duration"),
    (lambda d: admin_api.parse_duration("1e400"), "duration"),
    (lambda d: admin_api.parse_duration("9" * 400), "duration"),
    (lambda d: admin_api.parse_duration("99999999999w"), "duration"),
]


@pytest.mark.parametrize(
    ("call", "cause"), DURATION_CASES, ids=[str(i) for i in range(len(DURATION_CASES))]
)
def test_durations_are_refused_at_the_call(
    call: Call, cause: str, durable: Durable, database_url: str
) -> None:
    before = counts(database_url)
    with pytest.raises(ValueError) as info:
        call(durable)
    message = str(info.value)
    assert "\n" not in message and cause.lower() in message.lower(), message
    assert counts(database_url) == before


def test_settings_repr_hides_passwords_and_keys(database_url: str, redis_url: str) -> None:
    settings = load_settings(
        None,
        database_url=with_password(database_url),
        redis_url=redis_url.replace("redis://", f"redis://:{SECRET}@", 1),
        encryption_keys=KEY,
    )
    shown = repr(settings)
    assert SECRET not in shown and KEY not in shown and "password=***" in shown


def test_unknown_durable_variable_warns_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, database_url: str, redis_url: str
) -> None:
    monkeypatch.setenv("DURABLE_ENCRYPTION_KEY", KEY)
    with pytest.warns(UserWarning, match="did you mean 'DURABLE_ENCRYPTION_KEYS'"):
        load_settings(None, database_url=database_url, redis_url=redis_url)
    app = Celery("hostile-conf", set_as_current=False)
    app.conf.durable_max_step = 5
    with pytest.warns(UserWarning, match="durable_max_steps"):
        load_settings(app.conf, database_url=database_url, redis_url=redis_url)
