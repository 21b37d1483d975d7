"""Property-based tests (Hypothesis) of ids, names, JSON payloads and durations through
``start``, ``signal`` and the CLI's parsers: whatever the input, either it is accepted and
reads back as given, or it is refused with a one-line error and nothing is written."""

from __future__ import annotations

import math
import unicodedata
from datetime import timedelta
from typing import Any

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable import Durable
from durable import admin as admin_api
from durable.cli._common import Seconds, parse_json
from durable.durations import MAX_DURATION, checked
from durable.errors import InvalidDuration, InvalidIdentifier, PayloadError
from durable.ids import MAX_LENGTH, check_id, escape
from durable.store import runs, signals
from tests.test_hostile_input import counts

ON_DATABASE = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PURE = settings(max_examples=300, deadline=None)
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=260)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.text(st.characters(codec=None), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec=None), max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def follows_the_rules(value: str) -> bool:
    refused = {"Cc", "Cf", "Cs", "Zl", "Zp"}
    return 0 < len(value) <= MAX_LENGTH and all(
        unicodedata.category(c) not in refused for c in value
    )


def same(a: Any, b: Any) -> bool:
    """Equal as JSON through jsonb: a float past 2**53 may read back as the nearest integer."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.fixture
def noop(durable: Durable) -> Durable:
    @durable.workflow("prop.noop")
    def wf(ctx: Any, *args: Any) -> None:
        return None

    @durable.workflow("prop.wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    return durable


@PURE
@given(ANY_TEXT)
def test_an_id_is_accepted_exactly_when_it_follows_the_rules(value: str) -> None:
    try:
        assert check_id(value) == value and follows_the_rules(value)
    except InvalidIdentifier as exc:
        assert not follows_the_rules(value)
        one_line(exc)


@PURE
@given(ANY_TEXT)
def test_escaped_text_holds_no_control_or_bidi_character(value: str) -> None:
    shown = escape(value)
    assert not any(unicodedata.category(c) in {"Cc", "Zl", "Zp", "Cs"} for c in shown)
    assert "\u202e" not in shown and "\u2066" not in shown


@ON_DATABASE
@given(ANY_TEXT)
def test_start_with_any_id(noop: Durable, database_url: str, value: str) -> None:
    before = counts(database_url)
    try:
        run = noop.start("prop.noop", workflow_id=value)
    except InvalidIdentifier as exc:
        one_line(exc)
        assert counts(database_url) == before
        return
    assert follows_the_rules(value) and run.id == value
    assert noop.store(lambda c: runs.get_run(c, value)).name == "prop.noop"


@ON_DATABASE
@given(JSON)
def test_start_with_any_json_like_value(noop: Durable, database_url: str, value: Any) -> None:
    before = counts(database_url)
    try:
        run = noop.start("prop.noop", value)
    except PayloadError as exc:
        one_line(exc)
        assert counts(database_url) == before
        return
    stored = noop.decode(noop.store(lambda c: runs.get_run(c, run.id)).args)
    assert same(stored, [value])


@ON_DATABASE
@given(name=ANY_TEXT, payload=JSON)
def test_signal_with_any_name_and_payload(
    noop: Durable, database_url: str, name: str, payload: Any
) -> None:
    run = noop.start("prop.wait", workflow_id="prop-waiting")
    before = counts(database_url)
    try:
        noop.signal(run.id, name, payload)
    except (InvalidIdentifier, PayloadError) as exc:
        one_line(exc)
        assert counts(database_url) == before
        return
    assert follows_the_rules(name)
    sent = noop.store(lambda c: signals.list_signals(c, run.id))
    assert name in {row.name for row in sent}


DURATIONS = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.timedeltas(),
    st.booleans(),
    st.text(max_size=10),
)


@PURE
@given(DURATIONS)
def test_a_duration_is_finite_not_negative_and_at_most_a_century(value: Any) -> None:
    try:
        amount = checked("timeout", value)
    except InvalidDuration as exc:
        one_line(exc)
        return
    assert 0 <= amount <= MAX_DURATION.total_seconds()


@PURE
@given(st.text(max_size=30))
def test_cli_parsers_accept_or_refuse_in_one_line(text: str) -> None:
    for parse in (
        lambda: Seconds(positive=True).convert(text, None, None),
        lambda: admin_api.parse_duration(text),
        lambda: parse_json(text, None, object, "value"),
    ):
        try:
            parsed = parse()
        except (click.BadParameter, ValueError) as exc:
            message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            assert "\n" not in message
            continue
        if isinstance(parsed, timedelta):
            assert timedelta(0) <= parsed <= MAX_DURATION
