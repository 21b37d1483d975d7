"""Schedules: next-fire maths across time zones, catch-up planning, the Python API and the
imports from Celery's beat_schedule and from crontabs, against real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.schedules import BaseSchedule, crontab, schedule

from durable import Durable
from durable.cadence import Cadence, fire_id, plan_fires
from durable.errors import InvalidSchedule, ScheduleNotFound, UnknownWorkflow
from durable.scheduler import Schedules
from durable.store import engine as store_engine
from tests.conftest import query


def clean_schedules(database_url: str) -> None:
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def fires(cadence: Cadence, after: datetime, count: int) -> list[datetime]:
    out = []
    for _ in range(count):
        after = cadence.next_after(after)  # type: ignore[assignment]
        out.append(after)
    return out


# -- next fires -----------------------------------------------------------------------------


def test_cron_fires_in_its_time_zone() -> None:
    paris = Cadence.parse("0 3 * * *", None, "Europe/Paris")
    assert fires(paris, utc(2026, 1, 10, 12), 2) == [utc(2026, 1, 11, 2), utc(2026, 1, 12, 2)]
    assert fires(paris, utc(2026, 7, 10, 12), 1) == [utc(2026, 7, 11, 1)]  # summer time


def test_daily_job_runs_once_on_both_daylight_saving_days() -> None:
    berlin = Cadence.parse("30 2 * * *", None, "Europe/Berlin")
    # 2025-03-30: 02:30 does not exist; it runs when the clock jumps (03:00 CEST, 01:00 UTC).
    spring = fires(berlin, utc(2025, 3, 29, 12), 3)
    assert spring == [utc(2025, 3, 30, 1), utc(2025, 3, 31, 0, 30), utc(2025, 4, 1, 0, 30)]
    # 2025-10-26: 02:30 happens twice; it runs at the first one only.
    autumn = fires(berlin, utc(2025, 10, 25, 12), 3)
    assert autumn == [utc(2025, 10, 26, 0, 30), utc(2025, 10, 27, 1, 30), utc(2025, 10, 28, 1, 30)]
    # Asked from inside the repeated hour, the next fire is the next day's, not in the past.
    assert berlin.next_after(utc(2025, 10, 26, 1, 15)) == utc(2025, 10, 27, 1, 30)


def test_hourly_job_follows_real_hours_across_daylight_saving() -> None:
    berlin = Cadence.parse("0 * * * *", None, "Europe/Berlin")
    autumn = fires(berlin, utc(2025, 10, 25, 23, 30), 4)
    # 02:00 CEST and 02:00 CET are both fired: they are an hour apart.
    assert autumn == [utc(2025, 10, 26, h) for h in range(4)]
    spring = fires(berlin, utc(2025, 3, 29, 23, 30), 3)
    assert spring == [utc(2025, 3, 30, h) for h in range(3)]


def test_interval_fires_on_its_multiples_since_the_epoch() -> None:
    every = Cadence.parse(None, 60, "UTC")
    assert fires(every, utc(2026, 1, 1, 12, 0, 30), 2) == [
        utc(2026, 1, 1, 12, 1),
        utc(2026, 1, 1, 12, 2),
    ]
    assert every.next_after(utc(2026, 1, 1, 12, 1)) == utc(2026, 1, 1, 12, 2)  # strictly after
    assert Cadence.parse(None, timedelta(hours=1), "UTC").every == 3600


def test_nicknames_and_seconds_field() -> None:
    assert Cadence.parse("@daily", None).cron == "0 0 * * *"
    every_ten = Cadence.parse("*/10 * * * * *", None)  # seconds first
    assert fires(every_ten, utc(2026, 1, 1), 2) == [
        utc(2026, 1, 1, 0, 0, 10),
        utc(2026, 1, 1, 0, 0, 20),
    ]


@pytest.mark.parametrize(
    ("cron", "every", "tz", "message"),
    [
        (
            "61 * * * *",
            None,
            "UTC",
            "schedule 'n': invalid cron expression '61 * * * *': bad minute",
        ),
        (
            "0 3 * *",
            None,
            "UTC",
            "schedule 'n': invalid cron expression '0 3 * *': wrong number of fields",
        ),
        ("0 3 * * *", None, "Mars/Olympus", "schedule 'n': unknown time zone 'Mars/Olympus'"),
        (
            None,
            0.5,
            "UTC",
            "schedule 'n': the interval must be a whole number of seconds, at least 1, not 0.5",
        ),
        (None, None, "UTC", "schedule 'n': give either a cron expression or an interval (every)"),
        (
            "* * * * *",
            5,
            "UTC",
            "schedule 'n': give either a cron expression or an interval (every)",
        ),
    ],
)
def test_invalid_definitions_get_one_line_errors(
    cron: str | None, every: float | None, tz: str, message: str
) -> None:
    with pytest.raises(InvalidSchedule) as caught:
        Cadence.parse(cron, every, tz, name="n")
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_fire_ids_are_the_schedule_and_the_fire_time_in_utc() -> None:
    at = datetime(2026, 1, 1, 4, 0, tzinfo=Cadence.parse("0 4 * * *", None, "Europe/Paris").zone)
    assert fire_id("nightly", at) == "nightly@2026-01-01T03:00:00Z"


# -- catch-up planning ----------------------------------------------------------------------

HOURLY = Cadence.parse(None, 3600, "UTC")
NOW = utc(2026, 1, 1, 12, 0, 20)
DOWN_SINCE = utc(2026, 1, 1, 7)  # the next fire when every beat went down: 6 fires missed


@pytest.mark.parametrize(
    ("catchup", "limit", "expected"),
    [
        ("skip", 100, []),
        ("once", 100, [12]),
        ("all", 100, [7, 8, 9, 10, 11, 12]),
        ("all", 2, [11, 12]),
    ],
)
def test_catch_up_after_downtime(catchup: str, limit: int, expected: list[int]) -> None:
    grace = timedelta(seconds=10)  # 12:00 was due 20 s ago: missed too
    plan = plan_fires(HOURLY, DOWN_SINCE, NOW, catchup, grace, limit)
    assert plan.fires == [utc(2026, 1, 1, h) for h in expected]
    assert plan.next_fire_at == utc(2026, 1, 1, 13)
    assert (plan.missed_since is None) == (len(expected) == 6)


def test_fires_within_the_grace_are_on_time_whatever_the_policy() -> None:
    every_ten = Cadence.parse(None, 10, "UTC")
    first = utc(2026, 1, 1, 11, 59, 20)  # a failover left four fires late, the oldest by 60 s
    now = utc(2026, 1, 1, 12, 0, 20)
    plan = plan_fires(every_ten, first, now, "skip", timedelta(seconds=30), 100)
    assert plan.fires == [
        utc(2026, 1, 1, 11, 59, 50),
        utc(2026, 1, 1, 12, 0, 0),
        utc(2026, 1, 1, 12, 0, 10),
        utc(2026, 1, 1, 12, 0, 20),
    ]
    assert plan.missed_since == first
    assert (
        plan_fires(every_ten, now, now - timedelta(seconds=1), "skip", timedelta(0), 1).fires == []
    )


# -- the Python API -------------------------------------------------------------------------


@pytest.fixture
def schedules(durable: Durable, database_url: str) -> Iterator[Schedules]:
    clean_schedules(database_url)

    @durable.workflow("reports.nightly")
    def nightly(ctx: Any, region: str = "eu") -> str:
        return region

    yield Schedules(durable)
    clean_schedules(database_url)


def indexed(schedules: Schedules) -> dict[str, float]:
    assert schedules.index is not None
    return schedules.index.scores()


def test_add_stores_the_schedule_and_indexes_its_next_fire(schedules: Schedules) -> None:
    before = datetime.now(UTC)
    info = schedules.add(
        "nightly", "reports.nightly", cron="0 3 * * *", timezone="Europe/Paris", args=["us"]
    )
    assert (info.workflow, info.args, info.cron) == ("reports.nightly", ["us"], "0 3 * * *")
    assert info.timezone == "Europe/Paris"
    assert (info.catchup, info.overlap, info.paused, info.origin) == ("skip", "skip", False, "api")
    assert info.next_fire_at is not None and info.next_fire_at > before
    assert (
        info.next_fire_at.astimezone(Cadence.parse("* * * * *", None, "Europe/Paris").zone).hour
        == 3
    )
    assert indexed(schedules) == {"nightly": info.next_fire_at.timestamp()}
    again = schedules.add(
        "nightly", "reports.nightly", cron="0 3 * * *", timezone="Europe/Paris", args=["us"]
    )
    assert again == info  # an identical definition changes nothing


def test_add_rejects_bad_input_and_writes_nothing(schedules: Schedules, database_url: str) -> None:
    with pytest.raises(InvalidSchedule, match="invalid cron expression"):
        schedules.add("x", "reports.nightly", cron="every day")
    with pytest.raises(InvalidSchedule, match="unknown time zone"):
        schedules.add("x", "reports.nightly", cron="0 3 * * *", timezone="Paris")
    with pytest.raises(InvalidSchedule, match="catch-up must be skip, once or all"):
        schedules.add("x", "reports.nightly", every=60, catchup="later")
    with pytest.raises(InvalidSchedule, match="not JSON-serialisable"):
        schedules.add("x", "reports.nightly", every=60, args=[object()])
    with pytest.raises(UnknownWorkflow):
        schedules.add("x", "reports.weekly", every=60)
    assert query(database_url, "SELECT name FROM durable_schedules") == []
    assert indexed(schedules) == {}


def test_redefining_keeps_a_pause(schedules: Schedules) -> None:
    schedules.add("tick", "reports.nightly", every=60)
    paused = schedules.pause("tick")
    assert paused.paused and indexed(schedules) == {}
    changed = schedules.add("tick", "reports.nightly", every=120, overlap="allow")
    assert changed.paused and changed.every == timedelta(seconds=120)
    assert indexed(schedules) == {}
    resumed = schedules.resume("tick")
    assert not resumed.paused
    assert resumed.next_fire_at is not None
    assert resumed.next_fire_at.timestamp() % 120 == 0
    assert indexed(schedules) == {"tick": resumed.next_fire_at.timestamp()}


def test_remove_and_missing_names(schedules: Schedules) -> None:
    schedules.add("tick", "reports.nightly", every=60)
    schedules.remove("tick")
    assert schedules.list() == [] and indexed(schedules) == {}
    for action in (schedules.remove, schedules.pause, schedules.resume, schedules.trigger):
        with pytest.raises(ScheduleNotFound, match="no schedule named 'tick'"):
            action("tick")


def test_trigger_starts_a_run_now_and_list_shows_it(schedules: Schedules, durable: Durable) -> None:
    schedules.add("nightly", "reports.nightly", cron="0 3 * * *", kwargs={"region": "apac"})
    run = schedules.trigger("nightly")
    name, _, at = run.id.partition("@")
    assert name == "nightly"
    assert abs(datetime.fromisoformat(at).timestamp() - datetime.now(UTC).timestamp()) < 5
    (info,) = schedules.list()
    assert (info.last_run_id, info.last_status) == (run.id, "running")
    assert info.last_fire_at is not None and fire_id("nightly", info.last_fire_at) == run.id
    assert schedules.trigger("nightly").id in (run.id, fire_id("nightly", datetime.now(UTC)))


def test_store_only_schedules_write_postgres_and_leave_the_index_to_the_beat(
    schedules: Schedules, database_url: str
) -> None:
    store_only = Schedules(database_url=database_url)
    info = store_only.add("tick", "any.workflow", every=5)  # no app: the name is not checked
    assert info.workflow == "any.workflow"
    assert indexed(schedules) == {}
    with pytest.raises(Exception, match="needs the app"):
        store_only.trigger("tick")


# -- imports --------------------------------------------------------------------------------


class FullMoon(BaseSchedule):
    """A custom Celery schedule: nothing durable can read as cron or interval."""


def test_beat_schedule_entries_become_durable_task_schedules(
    schedules: Schedules, durable: Durable
) -> None:
    durable.app.conf.timezone = "America/New_York"
    entries = {
        "cleanup": {"task": "shop.cleanup", "schedule": crontab(minute=0, hour=4), "args": (7,)},
        "ping": {"task": "shop.ping", "schedule": 30.0, "options": {"queue": "ops"}},
        "sync": {"task": "shop.sync", "schedule": schedule(timedelta(minutes=5))},
        "moon": {"task": "shop.howl", "schedule": FullMoon()},
        "both-days": {"task": "x", "schedule": crontab(day_of_month=1, day_of_week=1)},
    }
    report = schedules.import_beat_schedule(entries)
    assert sorted(report.added) == ["cleanup", "ping", "sync"]
    assert report.problems == [
        "beat_schedule entry 'moon': a FullMoon schedule cannot be imported",
        "beat_schedule entry 'both-days': a crontab restricting both day_of_month and "
        "day_of_week has no cron equivalent",
    ]
    by_name = {s.name: s for s in schedules.list()}
    cleanup, ping = by_name["cleanup"], by_name["ping"]
    assert (cleanup.workflow, cleanup.cron) == ("durable.task", "0 4 * * *")
    assert cleanup.args == ["shop.cleanup", [7], {}]
    assert (cleanup.timezone, cleanup.origin) == ("America/New_York", "beat_schedule")
    assert ping.args == ["shop.ping", [], {}, {"queue": "ops"}]
    assert ping.every == timedelta(seconds=30)
    again = schedules.import_beat_schedule(entries)
    assert sorted(again.unchanged) == ["cleanup", "ping", "sync"]
    # An entry gone from the config is removed; other schedules are not touched.
    schedules.add("mine", "reports.nightly", every=60)
    gone = schedules.import_beat_schedule({"ping": entries["ping"]})
    assert sorted(gone.removed) == ["cleanup", "sync"]
    assert sorted(s.name for s in schedules.list()) == ["mine", "ping"]


CRONTAB = """\
# m h dom mon dow command
MAILTO=ops@example.com
0 3 * * * durable start reports.nightly --args '["eu"]' >> /var/log/nightly.log 2>&1
CRON_TZ=Asia/Tokyo
30 6 * * 1-5 /usr/local/bin/durable --app shop start reports.nightly --kwargs '{"region": "jp"}'
*/5 * * * * celery -A shop call shop.sync --args '[1]' --queue ops
@hourly reports.nightly
0 4 * * * /opt/run_ai_pipeline.sh
@reboot durable start reports.nightly
61 * * * * durable start reports.nightly
0 1 * * * durable start reports.nightly | mail ops
0 2 * * * durable start reports.weekly
"""


def test_import_crontab_maps_workflows_and_tasks_and_reports_the_rest(
    schedules: Schedules,
) -> None:
    report = schedules.import_crontab(CRONTAB)
    assert report.added == [
        "reports.nightly",
        "reports.nightly-2",
        "shop.sync",
        "reports.nightly-3",
    ]
    assert report.problems[:4] == [
        "line 8: the command names no workflow or task (use durable start NAME or celery call "
        "TASK): 0 4 * * * /opt/run_ai_pipeline.sh",
        "line 9: @reboot has no time to schedule: @reboot durable start reports.nightly",
        "line 10: invalid cron expression '61 * * * *': bad minute: "
        "61 * * * * durable start reports.nightly",
        "line 11: a shell pipeline cannot be mapped: "
        "0 1 * * * durable start reports.nightly | mail ops",
    ]
    assert len(report.problems) == 5
    assert report.problems[4].startswith("line 12: unknown workflow 'reports.weekly' (registered:")
    assert report.problems[4].endswith("): 0 2 * * * durable start reports.weekly")
    got = {s.name: s for s in schedules.list()}
    assert (got["reports.nightly"].cron, got["reports.nightly"].args) == ("0 3 * * *", ["eu"])
    assert got["reports.nightly"].timezone == "UTC"
    tokyo = got["reports.nightly-2"]
    assert (tokyo.timezone, tokyo.kwargs, tokyo.origin) == (
        "Asia/Tokyo",
        {"region": "jp"},
        "crontab",
    )
    sync = got["shop.sync"]
    assert (sync.workflow, sync.args) == ("durable.task", ["shop.sync", [1], {}, {"queue": "ops"}])
    assert got["reports.nightly-3"].cron == "0 * * * *"
    assert sorted(schedules.import_crontab(CRONTAB).unchanged) == sorted(got)


def test_import_crontab_never_overwrites_a_schedule_of_another_origin(
    schedules: Schedules,
) -> None:
    schedules.add("reports.nightly", "reports.nightly", every=60)
    report = schedules.import_crontab("0 3 * * * durable start reports.nightly\n")
    assert report.added == []
    assert report.problems == [
        "line 1: a schedule of that name exists and is not from a crontab: "
        "0 3 * * * durable start reports.nightly"
    ]
