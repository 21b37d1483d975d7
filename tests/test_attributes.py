"""Searchable attributes: set at the start and by ``ctx.set_attributes``, found by
``Durable.list_runs``, ``durable list --attr`` and the bulk forms; bad ones refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from durable import Durable, InvalidAttributes, bulk
from durable.attributes import MAX_BYTES, MAX_KEYS, AttributeFilter, check, parse_filter
from durable.cli import cli
from durable.store import runs
from tests.conftest import query, wait_until

# The Durable of the running test, loaded by the command as --app tests.test_attributes:CURRENT.
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
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("durable: "), result.stderr
    return lines[0]


def tagged(durable: Durable, wid: str, attributes: dict[str, Any], status: str = "running") -> None:
    """A run of ``at.idle`` with ``attributes``, ended in ``status`` unless running."""
    with durable.connect() as conn:
        assert runs.insert_run(conn, wid, "at.idle", "[]", "{}", None, None, json.dumps(attributes))
        if status != "running":
            assert runs.acquire(conn, wid, "worker-1", 30.0)
            assert runs.finish(conn, wid, "worker-1", status).finished


def ids(found: list[Any]) -> set[str]:
    return {r.id if hasattr(r, "id") else r["id"] for r in found}


def run_count(database_url: str) -> int:
    return int(query(database_url, "SELECT count(*) AS n FROM durable_workflows")[0].n)


# -- rules and parsing ---------------------------------------------------------------------------


def test_parse_filter_reads_equality_as_json_scalars_and_ranges_as_numbers_or_times() -> None:
    assert parse_filter("customer=42") == AttributeFilter("customer", "=", 42)
    assert parse_filter('customer="42"') == AttributeFilter("customer", "=", "42")
    assert parse_filter("customer=acme") == AttributeFilter("customer", "=", "acme")
    assert parse_filter("vip=true") == AttributeFilter("vip", "=", True)
    assert parse_filter("note=null") == AttributeFilter("note", "=", None)
    assert parse_filter("tags=[1]") == AttributeFilter("tags", "=", "[1]")
    assert parse_filter("amount>=100") == AttributeFilter("amount", ">=", 100)
    assert parse_filter("amount<2.5") == AttributeFilter("amount", "<", 2.5)
    assert parse_filter("due<2026-12-01T00:00") == AttributeFilter(
        "due", "<", datetime(2026, 12, 1, tzinfo=UTC)
    )
    moment = datetime(2026, 12, 1, 10, tzinfo=UTC) - timedelta(hours=1)
    assert parse_filter("due>2026-12-01T10:00+01:00").value == moment
    assert parse_filter("expr=a=b").value == "a=b"  # the first operator splits
    assert parse_filter("x=NaN").value == "NaN"  # not JSON: text


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("customer", "is not KEY=VALUE"),
        ("=42", "must be 1 to 64 characters"),
        ("9lives=1", "must be 1 to 64 characters"),
        ("amount>=lots", "a range needs a number or an ISO-8601 time"),
        ("amount>=NaN", "the bound must be a finite number"),
        ("amount<=true", "a range needs a number or an ISO-8601 time"),
        ("due<2026-13-01", "a range needs a number or an ISO-8601 time"),
        ("note=" + "x" * 1025, "over 1024"),
    ],
)
def test_bad_filters_are_refused_with_their_cause(text: str, cause: str) -> None:
    with pytest.raises(InvalidAttributes, match=cause) as caught:
        parse_filter(text)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("attributes", "cause"),
    [
        ({"": 1}, "must be 1 to 64"),
        ({"a b": 1}, "must be 1 to 64"),
        ({"k" * 65: 1}, "must be 1 to 64"),
        ({1: 1}, "must be a string"),
        ({"k": [1]}, "must be a str, int, float, bool or None, not list"),
        ({"k": {"a": 1}}, "not dict"),
        ({"k": datetime.now(UTC)}, "not datetime"),
        ({"k": float("inf")}, "finite"),
        ({"k": "x" * 1025}, "over 1024"),
        ({"k": "a\x00b"}, "NUL"),
        ({"k": "\ud800"}, "not valid UTF-8"),
        ({f"k{i}": i for i in range(MAX_KEYS + 1)}, f"over the limit of {MAX_KEYS}"),
        ({f"k{i}": "x" * 1000 for i in range(20)}, f"over the limit of {MAX_BYTES}"),
        ([("k", 1)], "must be a mapping"),
    ],
)
def test_bad_attributes_are_refused_with_their_cause(attributes: Any, cause: str) -> None:
    with pytest.raises(InvalidAttributes, match=cause):
        check(attributes)


keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,20}", fullmatch=True)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
)
times = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
bounds = st.integers() | st.floats(allow_nan=False, allow_infinity=False) | times


@given(keys, scalars)
def test_an_equality_reads_back_as_written(key: str, value: Any) -> None:
    written = AttributeFilter(key, "=", value)
    assert parse_filter(str(written)) == written


@given(keys, st.sampled_from([">=", ">", "<=", "<"]), bounds)
def test_a_bound_reads_back_as_written(key: str, op: str, value: Any) -> None:
    written = AttributeFilter(key, op, value)
    assert parse_filter(str(written)) == written


@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused_in_one_line(text: str) -> None:
    try:
        found = parse_filter(text)
    except InvalidAttributes as exc:
        assert "\n" not in str(exc)
    else:
        assert found.op in ("=", ">=", ">", "<=", "<") and found.key in text


# -- starting with attributes --------------------------------------------------------------------


def test_start_start_many_and_a_child_write_their_attributes(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @durable.workflow("at.idle")
    def idle(ctx: Any) -> None:
        ctx.wait_for_signal("never")

    @durable.workflow("at.parent")
    def parent(ctx: Any) -> str:
        ctx.child("at.leaf", workflow_id="leaf-1", attributes={"customer": 7, "role": "child"})
        return "done"

    @durable.workflow("at.leaf")
    def leaf(ctx: Any) -> int:
        return 1

    durable.start("at.idle", workflow_id="one", attributes={"customer": 42, "vip": True})
    many = durable.start_many(
        "at.idle",
        [(), ()],
        workflow_ids=["m-1", "m-2"],
        attributes_list=[{"customer": 43}, None],
    )
    assert [r.id for r in many] == ["m-1", "m-2"]
    assert durable.start("at.parent", workflow_id="p-1").result(timeout=30) == "done"
    found = {r.id: r.attributes for r in durable.list_runs(limit=10)}
    assert found == {
        "one": {"customer": 42, "vip": True},
        "m-1": {"customer": 43},
        "m-2": {},
        "p-1": {},
        "leaf-1": {"customer": 7, "role": "child"},
    }
    # Starting an id that exists returns that run and keeps its attributes.
    durable.start("at.idle", workflow_id="one", attributes={"customer": 1})
    (again,) = durable.list_runs(attributes={"customer": 42})
    assert again.id == "one"


def test_bad_attributes_at_the_start_write_nothing(durable: Durable, database_url: str) -> None:
    @durable.workflow("at.idle")
    def idle(ctx: Any) -> None:
        ctx.wait_for_signal("never")

    with pytest.raises(InvalidAttributes, match="must be a str, int, float, bool or None"):
        durable.start("at.idle", workflow_id="bad-1", attributes={"k": [1, 2]})
    with pytest.raises(InvalidAttributes, match="must be 1 to 64"):
        durable.start_many(
            "at.idle", [(), ()], workflow_ids=["bad-2", "bad-3"], attributes_list=[{}, {"-x": 1}]
        )
    assert run_count(database_url) == 0


# -- set_attributes in a workflow ----------------------------------------------------------------


def test_set_attributes_merges_and_replays_without_writing_again(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @durable.workflow("at.stages")
    def stages(ctx: Any) -> str:
        ctx.set_attributes({"stage": "received", "amount": 10}, region="eu")
        ctx.wait_for_signal("go")  # the next activation replays the position above
        ctx.set_attributes(stage="charged", token=str(ctx.uuid4()))
        return "ok"

    run = durable.start("at.stages", workflow_id="st-1", attributes={"customer": 42})
    wait_until(
        lambda: durable.list_runs(attributes={"stage": "received"}), what="the first attributes"
    )
    durable.signal("st-1", "go")
    assert run.result(timeout=30) == "ok"
    (done,) = durable.list_runs(attributes={"customer": 42})
    token = done.attributes["token"]
    assert done.attributes == {
        "customer": 42,
        "stage": "charged",
        "amount": 10,
        "region": "eu",
        "token": token,
    }
    rows = query(
        database_url,
        "SELECT seq, kind, result FROM durable_steps WHERE workflow_id = 'st-1' ORDER BY seq",
    )
    assert [(r.seq, r.kind) for r in rows] == [(1, "attributes"), (2, "signal"), (3, "attributes")]
    assert rows[2].result == {"stage": "charged", "token": token}
    events = query(
        database_url,
        "SELECT seq FROM durable_history WHERE workflow_id = 'st-1' AND event = 'attributes set'",
    )
    assert sorted(e.seq for e in events) == [1, 3]  # each written once, across the replay
    shown = durable_cli_show(durable, "st-1")
    assert shown["attributes"] == done.attributes


def durable_cli_show(durable: Durable, wid: str) -> Any:
    global CURRENT
    CURRENT = durable
    try:
        return as_json(durable_cli(f"{__name__}:CURRENT", "show", wid, "--json"))
    finally:
        CURRENT = None


def test_set_attributes_past_the_limits_raises_in_the_workflow_and_writes_nothing(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @durable.workflow("at.greedy")
    def greedy(ctx: Any) -> str:
        try:
            ctx.set_attributes({f"k{i}": i for i in range(40)})
        except InvalidAttributes as exc:
            return str(exc)
        return "accepted"

    first = {f"s{i}": i for i in range(30)}
    run = durable.start("at.greedy", workflow_id="g-1", attributes=first)
    assert run.result(timeout=30) == (
        f"invalid attributes: run g-1 would hold more than {MAX_KEYS} keys or {MAX_BYTES} bytes"
    )
    (found,) = durable.list_runs()
    assert found.attributes == first
    rows = query(database_url, "SELECT count(*) AS n FROM durable_steps WHERE kind = 'attributes'")
    assert rows[0].n == 0


# -- finding runs --------------------------------------------------------------------------------


@pytest.fixture
def catalogue(durable: Durable) -> None:
    tagged(durable, "r-1", {"customer": 42, "amount": 50, "due": "2026-11-20T09:00:00+00:00"})
    tagged(durable, "r-2", {"customer": 42, "amount": 150, "due": "2026-12-05T09:00"})
    tagged(durable, "r-3", {"customer": 42, "amount": 250, "vip": True}, status="completed")
    tagged(durable, "r-4", {"customer": "42", "amount": "lots", "due": "soon"})
    tagged(durable, "r-5", {"customer": 7, "amount": 100.5, "due": "2026-12-01"})
    tagged(durable, "r-6", {})


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"customer": 42}, {"r-1", "r-2", "r-3"}),
        ({"customer": "42"}, {"r-4"}),
        ({"customer": 42, "vip": True}, {"r-3"}),
        (["customer=42", "amount>=150"], {"r-2", "r-3"}),
        (["amount>100", "amount<=250"], {"r-2", "r-3", "r-5"}),
        (["amount<100.5"], {"r-1"}),
        (["due<2026-12-01T00:00"], {"r-1"}),
        (["due>=2026-12-01"], {"r-2", "r-5"}),
        (["due>2026-12-05T09:30+01:00"], {"r-2"}),
        (["customer=42", "customer=42"], {"r-1", "r-2", "r-3"}),
        ({"missing": None}, set()),
    ],
)
def test_list_runs_filters_on_attributes(
    durable: Durable, catalogue: None, filters: Any, expected: set[str]
) -> None:
    assert ids(durable.list_runs(attributes=filters)) == expected


def test_attribute_filters_combine_with_status_and_name(durable: Durable, catalogue: None) -> None:
    found = durable.list_runs(status="running", attributes=["customer=42"])
    assert ids(found) == {"r-1", "r-2"}
    assert all(r.status == "running" and r.waiting is not None for r in found)
    assert ids(durable.list_runs(status="completed", attributes={"customer": 42})) == {"r-3"}
    assert durable.list_runs(name="other", attributes={"customer": 42}) == []
    assert len(durable.list_runs(attributes={"customer": 42}, limit=2)) == 2


def test_bad_listing_filters_are_refused(durable: Durable, catalogue: None) -> None:
    with pytest.raises(InvalidAttributes, match="two values"):
        durable.list_runs(attributes=["customer=42", "customer=7"])
    with pytest.raises(InvalidAttributes, match="a range needs a number"):
        durable.list_runs(attributes=["amount>=lots"])
    with pytest.raises(InvalidAttributes, match="str or AttributeFilter"):
        durable.list_runs(attributes=[42])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="status must be one of"):
        durable.list_runs(status="sleeping")
    with pytest.raises(ValueError, match="limit must be at least 1"):
        durable.list_runs(limit=0)


def test_list_command_filters_on_attr_and_shows_attributes(
    durable: Durable, catalogue: None, spec: str
) -> None:
    listed = as_json(
        durable_cli(spec, "list", "--attr", "customer=42", "--attr", "amount>=100", "--json")
    )
    assert {r["id"]: r["attributes"]["amount"] for r in listed} == {"r-2": 150, "r-3": 250}
    listed = as_json(
        durable_cli(spec, "list", "--attr", "customer=42", "--status", "running", "--json")
    )
    assert ids(listed) == {"r-1", "r-2"}
    table = durable_cli(spec, "list", "--attr", "vip=true")
    assert table.exit_code == 0, table.output
    assert "r-3" in table.stdout and "attributes" in table.stdout and "vip=true" in table.stdout
    assert "r-1" not in table.stdout


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ("customer", "is not KEY=VALUE"),
        ("amount>=lots", "a range needs a number or an ISO-8601 time"),
        ("9=1", "must be 1 to 64 characters"),
    ],
)
def test_list_command_refuses_a_bad_attr_in_one_line(
    durable: Durable, spec: str, value: str, cause: str
) -> None:
    line = one_line_error(durable_cli(spec, "list", "--attr", value))
    assert "--attr" in line and cause in line


def test_bulk_forms_select_by_attr(
    durable: Durable, catalogue: None, spec: str, database_url: str
) -> None:
    preview = as_json(durable_cli(spec, "cancel", "--attr", "customer=42", "--dry-run", "--json"))
    assert preview["matched"] == 2 and set(preview["sample"]) == {"r-1", "r-2"}
    where = bulk.RunFilter(attributes=["amount>=100"], status="running")
    assert bulk.preview(durable, "cancel", where).matched == 2  # r-2 and r-5
    assert not where.is_empty() and bulk.RunFilter(attributes=[]).is_empty()
    done = bulk.run(durable, "cancel", bulk.RunFilter(attributes={"customer": 7}))
    assert done.acted == 1
    flagged = query(database_url, "SELECT id FROM durable_workflows WHERE cancel_requested")
    assert [r.id for r in flagged] == ["r-5"]
    purged = as_json(durable_cli(spec, "purge", "--attr", "vip=true", "--dry-run", "--json"))
    assert (purged["matched"], purged["sample"]) == (1, ["r-3"])
    line = one_line_error(durable_cli(spec, "retry", "r-1", "--attr", "customer=42"))
    assert "--attr with ID" in line


def test_start_command_takes_attributes(durable: Durable, spec: str) -> None:
    @durable.workflow("at.idle")
    def idle(ctx: Any) -> None:
        ctx.wait_for_signal("never")

    started = durable_cli(
        spec, "start", "at.idle", "--id", "cli-1", "--attr", "customer=42", "--attr", "tier=gold"
    )
    assert started.exit_code == 0, started.output
    assert started.stdout.strip() == "cli-1"
    (found,) = durable.list_runs(attributes={"customer": 42})
    assert (found.id, found.attributes) == ("cli-1", {"customer": 42, "tier": "gold"})
    line = one_line_error(durable_cli(spec, "start", "at.idle", "--attr", "amount>=3"))
    assert "is not KEY=VALUE" in line
    line = one_line_error(durable_cli(spec, "start", "at.idle", "--kwargs", '{"attributes": 1}'))
    assert "cannot pass attributes as keywords" in line
    assert len(durable.list_runs()) == 1


def test_a_fork_starts_with_the_attributes_of_its_source(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    from durable import admin

    def double(x: int) -> int:
        return 2 * x

    @durable.workflow("at.forked")
    def forked(ctx: Any) -> int:
        ctx.set_attributes(stage="one")
        value = ctx.step(double, 2, local=True)
        ctx.set_attributes(stage="two", value=value)
        return int(value)

    run = durable.start("at.forked", workflow_id="fk-src", attributes={"customer": 9})
    assert run.result(timeout=30) == 4
    new_id, copied = admin.fork(durable, "fk-src", from_step=3, new_id="fk-new")
    assert copied == 2
    assert durable.run(new_id).result(timeout=30) == 4
    found = {r.id: r.attributes for r in durable.list_runs(attributes={"customer": 9})}
    assert found == {
        "fk-src": {"customer": 9, "stage": "two", "value": 4},
        "fk-new": {"customer": 9, "stage": "two", "value": 4},
    }
    events = query(
        database_url,
        "SELECT seq FROM durable_history WHERE workflow_id = 'fk-new' AND event = 'attributes set'",
    )
    assert [e.seq for e in events] == [3]  # position 1 was copied, not run again


def time_of(database_url: str, stored: str) -> Any:
    """What a time bound compares a run's attribute ``due`` = ``stored`` as (None: no time)."""
    from durable.store.admin import AS_TIME, TIME_WITH_OFFSET, TIME_WITHOUT_OFFSET

    sql = (
        f"SELECT {AS_TIME.format(k='k')} AS moment"
        " FROM (SELECT jsonb_build_object('due', CAST(:v AS text)) AS attributes) w"
    )
    params = {"k": "due", "v": stored, "attr_time_tz": TIME_WITH_OFFSET}
    return query(database_url, sql, **params, attr_time=TIME_WITHOUT_OFFSET)[0].moment


@pytest.mark.parametrize(
    ("stored", "read"),
    [
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T10:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01 10:00:30.25Z", datetime(2026, 12, 1, 10, 0, 30, 250000, tzinfo=UTC)),
        ("2026-12-01T10:00+0130", datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
        ("2024-02-29T00:00+00:00", datetime(2024, 2, 29, tzinfo=UTC)),
        ("2000-02-29", datetime(2000, 2, 29, tzinfo=UTC)),
        ("2026-02-29", None),
        ("1900-02-29", None),
        ("2026-04-31", None),
        ("0000-01-01", None),
        ("2026-01-01T24:00", None),
        ("2026-01-01T00:00+16:00", None),
        ("2026-1-1", None),
        ("soon", None),
    ],
)
def test_only_strings_holding_a_time_compare_as_times(
    database_url: str, stored: str, read: datetime | None
) -> None:
    assert time_of(database_url, stored) == read


date_like = st.from_regex(
    r"\A\d{4}-[01]\d-[0-3]\d([T ][0-2]\d:[0-6]\d(:[0-6]\d(\.\d{1,7})?)?)?"
    r"(Z|[+-][0-2]\d(:?[0-6]\d)?)?\Z"
)


@given(date_like)
def test_no_stored_string_makes_a_time_bound_fail(database_url: str, stored: str) -> None:
    """Whatever a run holds under the key, the comparison reads a time or nothing."""
    found = time_of(database_url, stored)
    assert found is None or found.tzinfo is not None
