"""Operating with secrets, for real: ``durable show`` on encrypted runs, retention run by the
beat, and the least-privilege deployment that docs/security.md describes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet as KeyMaker

from durable import Durable
from durable.cli import cli
from durable.codec import Compression, Fernet, seal
from tests.conftest import clean_keys, clean_tables, make_app, query

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
