"""Error messages under a codec: stored encoded, the type readable, opened only with the key."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet as KeyMaker

from durable import Durable, StepFailed, WorkflowFailed
from durable.cli import cli
from durable.codec import Compression, Fernet
from durable.errors import CodecUnavailable
from durable.serialization import (
    describe_exception,
    mask_error,
    open_error,
    readable_error,
    seal_error,
)
from tests.conftest import clean_keys, clean_tables, make_app, query

CARD = "4111111111111111"
DECLINED = f"{__name__}.CardDeclined"


class CardDeclined(Exception):
    """What a careless payment task raises: the card number in the message."""


class Lines(logging.Handler):
    """Keeps the text of every record logged under ``durable`` (Celery's worker set-up
    replaces the root logger's handlers, so pytest's ``caplog`` would miss them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def durable_log() -> Iterator[list[str]]:
    logger = logging.getLogger("durable")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def invoke(*args: str, **env: str) -> Result:
    """Run ``durable ARGS`` in-process, ignoring any DURABLE_* set by the caller's shell."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    return CliRunner().invoke(cli, list(args), env={**clean, **env}, catch_exceptions=False)


def run_declined(database_url: str, redis_url: str, prefix: str, **settings: Any) -> Durable:
    """Run ``wf.card`` to its failure: a remote step's failure caught, a local one's not."""
    clean_tables(database_url)
    app, durable = make_app(database_url, redis_url, prefix, **settings)

    @app.task(name="t.charge", shared=False)
    def charge(card: str) -> str:
        raise CardDeclined(f"card {card} declined")

    @durable.workflow("wf.card")
    def wf(ctx: Any, card: str) -> None:
        try:
            ctx.step(charge, card)
        except StepFailed as exc:
            ctx.set_event("seen", exc.error)  # compensation logic sees the real message
        ctx.step(charge, card, local=True)

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        run = durable.start("wf.card", CARD, workflow_id="card-1")
        with pytest.raises(WorkflowFailed):
            run.result(timeout=20)
    clean_keys(redis_url, prefix)
    return durable


def stored_errors(database_url: str) -> list[str]:
    """Every error the store holds for ``card-1``: runs, steps and history details."""
    run = query(database_url, "SELECT error FROM durable_workflows WHERE id = 'card-1'")
    steps = query(
        database_url, "SELECT error FROM durable_steps WHERE workflow_id = 'card-1' ORDER BY seq"
    )
    details = query(
        database_url,
        "SELECT detail->>'error' AS error FROM durable_history"
        " WHERE workflow_id = 'card-1' AND detail->>'error' IS NOT NULL",
    )
    return [r.error for r in [*run, *steps, *details] if r.error is not None]


def shown(database_url: str, *options: str) -> dict[str, Any]:
    result = invoke("show", "card-1", "--json", "--database-url", database_url, *options)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def errors_shown(run: dict[str, Any]) -> list[str]:
    """The run's error, its steps' and their attempts', and the errors in its timeline."""
    steps = [s["error"] for s in run["steps"]]
    attempts = [a["error"] for s in run["steps"] for a in s["attempt_history"]]
    details = [h["detail"].get("error") for h in run["history"] if isinstance(h["detail"], dict)]
    return [e for e in [run["error"], *steps, *attempts, *details] if e]


def test_with_a_codec_error_messages_are_stored_encoded_with_their_type_readable(
    database_url: str, redis_url: str, prefix: str, durable_log: list[str]
) -> None:
    key = KeyMaker.generate_key().decode()
    durable = run_declined(database_url, redis_url, prefix, codec=Fernet(keys=[key]))
    message = f"{DECLINED}: card {CARD} declined"
    # The workflow caught the remote step's failure with its message, and failed on the
    # local step's.
    assert durable.get_event("card-1", "seen") == message
    with pytest.raises(WorkflowFailed) as failed:
        durable.run("card-1").result(timeout=1)
    assert failed.value.error.startswith("durable.errors.StepFailed: step 3 (t.charge)")
    assert failed.value.error.endswith(message)

    stored = stored_errors(database_url)
    assert len(stored) >= 4 and not [e for e in stored if CARD in e]
    (run_error, *_) = stored
    assert run_error.startswith('durable.errors.StepFailed: {"$durable":"fernet","data":"')
    steps = query(database_url, "SELECT seq, error FROM durable_steps WHERE error IS NOT NULL")
    assert [s.seq for s in steps] == [1, 3]
    assert all(s.error.startswith(f'{DECLINED}: {{"$durable":"fernet"') for s in steps)

    # Without the key: the types, and <encrypted> for the messages.
    _, keyless = make_app(database_url, redis_url, prefix)
    with pytest.raises(WorkflowFailed) as masked:
        keyless.run("card-1").result(timeout=1)
    assert masked.value.error == "durable.errors.StepFailed: <encrypted>"
    assert keyless.run("card-1").traceback == "durable.errors.StepFailed: <encrypted>"
    hidden = shown(database_url)
    assert hidden["error"] == "durable.errors.StepFailed: <encrypted>"
    assert [s["error"] for s in hidden["steps"] if s["error"]] == [f"{DECLINED}: <encrypted>"] * 2
    assert not [e for e in errors_shown(hidden) if not e.endswith(": <encrypted>")]
    table = invoke("show", "card-1", "--database-url", database_url)
    assert table.exit_code == 0, table.output
    assert "<encrypted>" in table.stdout and "CardDeclined" in table.stdout
    assert CARD not in table.stdout

    # With the key: the messages.
    opened = shown(database_url, "--key", key)
    assert [s["error"] for s in opened["steps"] if s["error"]] == [message] * 2
    assert opened["error"] == failed.value.error
    assert "<encrypted>" not in json.dumps(errors_shown(opened))
    table = invoke("show", "card-1", "--database-url", database_url, "--key", key)
    assert CARD in table.stdout

    # durable's own log lines name the failure and its type, never the message.
    assert f"durable: step card-1#1 (t.charge) raised {DECLINED}: <encrypted>" in durable_log
    failed_line = "durable: workflow card-1 failed: durable.errors.StepFailed: <encrypted>"
    assert failed_line in durable_log
    assert not [line for line in durable_log if CARD in line]


@pytest.mark.parametrize("settings", ["no codec", "encode_errors=False"])
def test_without_a_codec_or_with_encode_errors_off_messages_stay_plain(
    database_url: str, redis_url: str, prefix: str, settings: str
) -> None:
    key = KeyMaker.generate_key().decode()
    extra: dict[str, Any] = {}
    if settings != "no codec":
        extra = {"codec": Fernet(keys=[key]), "encode_errors": False}
    durable = run_declined(database_url, redis_url, prefix, **extra)
    message = f"{DECLINED}: card {CARD} declined"
    assert durable.get_event("card-1", "seen") == message
    steps = query(database_url, "SELECT error FROM durable_steps WHERE error IS NOT NULL")
    assert [s.error for s in steps] == [message] * 2
    (run,) = query(database_url, "SELECT error FROM durable_workflows WHERE id = 'card-1'")
    assert run.error.startswith("durable.errors.StepFailed: step 3 (t.charge)")
    assert run.error.endswith(message)
    assert not [e for e in stored_errors(database_url) if "$durable" in e]
    hidden = shown(database_url)
    assert [s["error"] for s in hidden["steps"] if s["error"]] == [message] * 2
    assert hidden["error"] == run.error


def test_an_error_keeps_its_type_and_prefix_through_sealing() -> None:
    key = KeyMaker.generate_key().decode()
    codec = Compression(min_size=10_000) | Fernet(keys=[key])
    error = describe_exception(CardDeclined(f"card {CARD} declined\nsecond line"))
    assert error == f"{DECLINED}: card {CARD} declined"
    sealed = seal_error(error, codec)
    assert sealed.startswith(f'{DECLINED}: {{"$durable":"fernet","data":"') and CARD not in sealed
    assert open_error(sealed, codec) == error
    # A child's error reaches its parent's step as "failed: <the child's error>".
    assert open_error(f"failed: {sealed}", codec) == f"failed: {error}"
    assert mask_error(f"failed: {sealed}") == f"failed: {DECLINED}: <encrypted>"
    assert readable_error(sealed, None) == f"{DECLINED}: <encrypted>"
    assert readable_error(sealed, Fernet(keys=[KeyMaker.generate_key()])) == mask_error(sealed)
    with pytest.raises(CodecUnavailable):
        open_error(sealed, None)
    # Nothing to encode: no message, no codec, or a codec that declines a short message.
    assert seal_error(DECLINED, codec) == DECLINED
    assert seal_error(error, None) == error
    assert seal_error(error, Compression(min_size=10_000)) == error
    assert open_error(error, codec) == mask_error(error) == error
