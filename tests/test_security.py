"""What we store, send and refuse: codecs, limits, crafted input."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from celery import Celery
from cryptography.fernet import Fernet as KeyMaker

from durable import Durable, LimitExceeded, PayloadError, WorkflowFailed
from durable.codec import Compression, Fernet, is_sealed
from tests.conftest import clean_tables, make_app, query, wait_until


def test_fernet_codec_keeps_only_ciphertext_in_the_store(
    database_url: str, redis_url: str, prefix: str
) -> None:
    from celery.contrib.testing.worker import start_worker

    old_key, new_key = KeyMaker.generate_key(), KeyMaker.generate_key()
    codec = Compression(min_size=64) | Fernet(keys=[new_key, old_key])
    app, durable = make_app(database_url, redis_url, prefix, codec=codec)

    @app.task(name="t.card", shared=False)
    def card(token: str) -> dict[str, str]:
        return {"charged": token, "pad": "x" * 200}

    @durable.workflow("wf.secret")
    def wf(ctx: Any, token: str) -> dict[str, Any]:
        ctx.set_event("last4", token[-4:])
        approved = ctx.wait_for_signal("approve")
        return {"charge": ctx.step(card, token), "approved": approved}

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        run = durable.start("wf.secret", "tok_4242424242424242", workflow_id="sec-1")
        durable.signal("sec-1", "approve", {"by": "alice"})
        result = run.result(timeout=20)
    assert result["charge"]["charged"] == "tok_4242424242424242"
    assert result["approved"] == {"by": "alice"}
    assert durable.get_event("sec-1", "last4") == "4242"
    dump = json.dumps(
        [
            [
                r._asdict()
                for r in query(database_url, f"SELECT * FROM {table} WHERE workflow_id = 'sec-1'")
            ]
            for table in ("durable_steps", "durable_signals", "durable_events")
        ]
        + [
            [
                r._asdict()
                for r in query(database_url, "SELECT * FROM durable_workflows WHERE id = 'sec-1'")
            ]
        ],
        default=str,
    )
    assert "4242" not in dump and "alice" not in dump
    (row,) = query(database_url, "SELECT result FROM durable_workflows WHERE id = 'sec-1'")
    assert is_sealed(row.result) and row.result["$durable"] == "zlib+fernet"
    # A reader holding only the old key cannot open what the new key wrote.
    _, reader = make_app(database_url, redis_url, prefix, codec=Fernet(keys=[old_key]))
    with pytest.raises(PayloadError):
        reader.run("sec-1").result(timeout=1)
    # Without any codec, the value reads as encoded, never as garbage.
    _, plain = make_app(database_url, redis_url, prefix)
    with pytest.raises(PayloadError) as info:
        plain.run("sec-1").result(timeout=1)
    assert "encoded" in str(info.value)


def test_codec_from_settings(database_url: str, redis_url: str, prefix: str) -> None:
    key = KeyMaker.generate_key().decode()
    _, durable = make_app(
        database_url, redis_url, prefix, encryption_keys=key, compress_min_bytes=100
    )
    sealed = durable.encode({"card": "4242" * 50}, "a value")
    assert "4242" not in sealed
    assert durable.decode(json.loads(sealed)) == {"card": "4242" * 50}


def test_crafted_payloads_are_refused_cleanly(durable: Durable, database_url: str) -> None:
    @durable.workflow("wf.anything")
    def wf(ctx: Any, value: Any) -> None:
        ctx.wait_for_signal("x")

    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    bad_utf8 = "\udcff"  # a lone surrogate: what undecodable bytes become in Python text
    for value, reason in [
        (deep, "nested too deeply"),
        ("x" * (2 * 1024 * 1024), "over the limit"),
        (bad_utf8, "not valid UTF-8"),
        (object(), "not JSON-serialisable"),
    ]:
        with pytest.raises(PayloadError) as info:
            durable.start("wf.anything", value)
        assert reason in str(info.value) and "\n" not in str(info.value)
    assert query(database_url, "SELECT count(*) AS n FROM durable_workflows")[0].n == 0
    run = durable.start("wf.anything", 1, workflow_id="crafted-1")
    for value in (deep, bad_utf8):
        with pytest.raises(PayloadError):
            durable.signal(run.id, "x", value)
    signals = "SELECT count(*) AS n FROM durable_signals WHERE workflow_id = 'crafted-1'"
    assert query(database_url, signals)[0].n == 0


def test_step_limit_fails_the_run_clearly(database_url: str, redis_url: str, prefix: str) -> None:
    from durable.activation import activate

    clean_tables(database_url)
    _, durable = make_app(database_url, redis_url, prefix, max_steps=5)

    @durable.workflow("wf.runaway")
    def wf(ctx: Any) -> None:
        while True:
            ctx.step(lambda: 1, local=True)

    durable.start("wf.runaway", workflow_id="runaway-1")
    assert activate(durable, "runaway-1") == "failed"
    with pytest.raises(WorkflowFailed) as info:
        durable.run("runaway-1").result(timeout=1)
    assert "over its limit max_steps=5" in info.value.error
    assert (
        query(
            database_url, "SELECT count(*) AS n FROM durable_steps WHERE workflow_id = 'runaway-1'"
        )[0].n
        == 5
    )


def test_signal_limits(database_url: str, redis_url: str, prefix: str) -> None:
    clean_tables(database_url)
    _, durable = make_app(database_url, redis_url, prefix, max_signals=5, max_signals_per_minute=3)

    @durable.workflow("wf.inbox")
    def wf(ctx: Any) -> None:
        ctx.wait_for_signal("never")

    durable.start("wf.inbox", workflow_id="inbox-1")
    for i in range(3):
        durable.signal("inbox-1", "note", i)
    with pytest.raises(LimitExceeded) as info:
        durable.signal("inbox-1", "note", 3)
    assert info.value.limit == "max_signals_per_minute"
    signals = "SELECT count(*) AS n FROM durable_signals WHERE workflow_id = 'inbox-1'"
    assert query(database_url, signals)[0].n == 3


def test_messages_carry_ids_not_payloads_or_secrets(
    app: Celery, durable: Durable, redis_url: str, prefix: str
) -> None:
    import redis as redis_lib

    from durable.activation import activate

    @app.task(name="t.pay", shared=False)
    def pay(card: str) -> str:
        return "ok"

    @durable.workflow("wf.pay")
    def wf(ctx: Any, card: str) -> None:
        ctx.step(pay, card)

    durable.start("wf.pay", "4111111111111111", workflow_id="msg-1")
    assert activate(durable, "msg-1") == "suspended"  # no worker: both messages stay queued
    client = redis_lib.Redis.from_url(redis_url)
    messages = [json.loads(m) for m in client.lrange(f"{prefix}:celery", 0, -1)]
    # The bodies are base64 on the Redis transport: read them decoded, as a worker does.
    bodies = [base64.b64decode(m["body"]) for m in messages]
    raw = b"".join(json.dumps(m).encode() for m in messages) + b"".join(bodies)
    assert raw.count(b"msg-1") >= 2
    assert b"4111111111111111" not in raw
    assert durable.settings.database_url.encode() not in raw
    assert all(m["content-type"] == "application/json" for m in messages)
    by_task = {m["headers"]["task"]: json.loads(b) for m, b in zip(messages, bodies, strict=True)}
    assert by_task["t.pay"][:2] == [[], {"durable_step": "msg-1#1"}]  # the step, by label
    if "durable.activate" in by_task:  # started without eager_start
        assert by_task["durable.activate"][:2] == [["msg-1"], {}]


def test_crafted_messages_on_the_broker_are_refused_and_the_worker_stays_up(
    app: Celery,
    durable: Durable,
    worker: Any,
    database_url: str,
    tmp_path: Any,
    redis_url: str,
    prefix: str,
) -> None:
    import pickle

    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(marker), "w"))  # creates the marker if ever unpickled

    with app.producer_or_acquire() as producer:
        # A pickled body: Celery's default accept_content (json) refuses it unread.
        producer.publish(
            pickle.dumps(((Bomb(),), {}, {})),
            routing_key="celery",
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "durable.step", "id": "bomb-1", "args": None},
            declare=[app.amqp.queues["celery"]],
        )
    # JSON, but not what the step task takes, and a step of a run that does not exist.
    app.send_task("durable.step", args=[{"$where": "1"}, "x" * 10_000])
    app.send_task("durable.step", args=["no-such-run", 1])
    app.send_task("durable.activate", args=["no-such-run"])
    # Step messages under a task's own name: crafted labels, a step of no run, values in the
    # message. None of them runs the body.
    victim_runs: list[Any] = []

    @app.task(name="t.victim", shared=False)
    def victim(*args: Any, **kwargs: Any) -> None:
        victim_runs.append((args, kwargs))

    for crafted in (
        {"kwargs": {"durable_step": "no-such-run#1"}},
        {"kwargs": {"durable_step": {"$where": "1"}}},
        {"kwargs": {"durable_step": "no-such-run#x" + "9" * 5000}},
        {"args": ["secret"], "kwargs": {"durable_step": "no-such-run#1"}},
        {"kwargs": {"durable_step": "no-such-run#1", "amount": 10**6}},
    ):
        app.send_task("t.victim", **crafted)

    @app.task(name="t.ok", shared=False)
    def ok() -> str:
        return "still up"

    @durable.workflow("wf.after_bombs")
    def wf(ctx: Any) -> str:
        return str(ctx.step(ok))

    assert durable.start("wf.after_bombs", workflow_id="after-1").result(timeout=20) == "still up"
    assert query(database_url, "SELECT count(*) AS n FROM durable_workflows")[0].n == 1
    assert not marker.exists()
    client = redis.Redis.from_url(redis_url)

    def consumed() -> bool:  # acks_late: a message leaves "unacked" once its task has run
        return client.llen(f"{prefix}:celery") == 0 and client.hlen(f"{prefix}:unacked") == 0

    wait_until(consumed, what="the crafted messages to be consumed")
    client.close()
    assert victim_runs == []


def test_a_worker_without_the_key_leaves_the_run_to_one_with_it(
    database_url: str, redis_url: str, prefix: str
) -> None:

    from durable.activation import activate

    key = KeyMaker.generate_key()
    _, keyed = make_app(database_url, redis_url, prefix, codec=Fernet(keys=[key]))
    _, keyless = make_app(database_url, redis_url, prefix, lease_ttl=1)
    for durable in (keyed, keyless):

        @durable.workflow("wf.keyed")
        def wf(ctx: Any, secret: str) -> str:
            return secret[::-1]

    keyed.start("wf.keyed", "abc", workflow_id="keyed-1")
    assert activate(keyless, "keyed-1") == "undecodable"
    assert keyed.run("keyed-1").status() == "running"  # not failed: not the run's fault
    wait_until(  # the keyless worker's lease runs out
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_workflows WHERE id = 'keyed-1'"
            " AND (lease_expires_at IS NULL OR lease_expires_at < now())",
        ),
        what="the lease to run out",
    )
    assert activate(keyed, "keyed-1") == "completed"
    assert keyed.run("keyed-1").result(timeout=1) == "cba"
