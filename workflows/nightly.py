"""The nightly sales report, fired at 03:00 Paris time by durable's beat: cron, replaced.

Before, a crontab line on one host ran a script at 3 am; when the host was down the report
was silently missing, when two hosts had the line it went out twice, and when the script
died halfway nobody knew which half had run. Here the schedule lives in PostgreSQL, any
number of ``durable beat`` processes share it (one leads), and each fire starts exactly one
run, whose id is the schedule's name and the fire time in UTC:
``nightly-report@2026-03-02T02:00:00Z``. A fire missed while every beat was down is started
once when one is back (catch-up ``once``). The run:

1. works out the day it reports on: the local day before its fire (read from its id), or
   the ``day`` it was given, to report a past day again;
2. gathers the shop's figures and the day's workflow runs (two steps, retried);
3. stores the report, one row per day (:mod:`tasks.reports`);
4. sleeps until 07:00 local time (a durable timer: no worker held, survives restarts) and
   delivers it.

Add the schedule once (it is idempotent)::

    python -m workflows.nightly

which is ``durable schedule add nightly-report --workflow reports.nightly --cron '0 3 * * *'
--timezone Europe/Paris --kwargs '{"timezone": "Europe/Paris"}' --catchup once``. Report a
past day again with ``durable start reports.nightly --app workflows.nightly --kwargs
'{"day": "2026-03-01"}'``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from config.celery_app import durable
from durable import Durable, RetryPolicy, WorkflowContext
from durable.scheduler import ScheduleInfo
from tasks.reports import collect_runs, collect_sales, deliver_report, store_report

SCHEDULE = "nightly-report"
REPORT = "nightly-sales"
CRON = "0 3 * * *"
TIMEZONE = "Europe/Paris"
DELIVER_AT = time(7, 0)
FIRE_ID_TIME = "%Y-%m-%dT%H:%M:%SZ"
# The database may be busy with the night's batch jobs: retry for about half an hour.
RETRY = RetryPolicy(max_attempts=5, initial_interval=60.0, backoff=2.0, max_interval=900.0)


def fire_time(workflow_id: str) -> datetime | None:
    """The fire time in a schedule's run id (``name@2026-03-02T02:00:00Z``), or None."""
    _, at, stamp = workflow_id.rpartition("@")
    try:
        return datetime.strptime(stamp, FIRE_ID_TIME).replace(tzinfo=UTC) if at else None
    except ValueError:
        return None


def report_day(moment: datetime, timezone: str) -> date:
    """The day a report made at ``moment`` covers: the day before, in ``timezone``."""
    return moment.astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)


def day_window(day: date, timezone: str) -> tuple[datetime, datetime]:
    """From midnight to midnight of ``day`` in ``timezone`` (23 or 25 hours on DST days)."""
    zone = ZoneInfo(timezone)
    start = datetime.combine(day, time(0), zone)
    end = datetime.combine(day + timedelta(days=1), time(0), zone)
    return start.astimezone(UTC), end.astimezone(UTC)


@durable.workflow("reports.nightly")
def nightly(
    ctx: WorkflowContext, timezone: str = TIMEZONE, day: str | None = None
) -> dict[str, Any]:
    """Report on one day of the shop; returns the report and who it went to."""
    # Both come from the run's id and start time: the same on every replay.
    fired = fire_time(ctx.workflow_id) or ctx.now()
    the_day = date.fromisoformat(day) if day else report_day(fired, timezone)
    start, end = day_window(the_day, timezone)
    window = [start.isoformat(), end.isoformat()]
    sales = ctx.step(collect_sales, *window, retry=RETRY)
    runs = ctx.step(collect_runs, *window, retry=RETRY)
    body = {"sales": sales, "workflows": runs}
    ctx.step(store_report, REPORT, the_day.isoformat(), timezone, window, body, ctx.workflow_id)
    ctx.set_event("status", "stored")
    deliver_at = datetime.combine(the_day + timedelta(days=1), DELIVER_AT, ZoneInfo(timezone))
    if deliver_at > ctx.now():
        ctx.sleep(deliver_at - ctx.now())
    recipients = ctx.step(deliver_report, REPORT, the_day.isoformat(), retry=RETRY)
    ctx.set_event("status", "delivered")
    return {"report": REPORT, "day": the_day.isoformat(), **body, "recipients": recipients}


def install_schedule(target: Durable = durable) -> ScheduleInfo:
    """Add (or update) the 03:00 Europe/Paris schedule of the report; returns it."""
    return target.schedules.add(
        SCHEDULE,
        "reports.nightly",
        cron=CRON,
        timezone=TIMEZONE,
        kwargs={"timezone": TIMEZONE},
        catchup="once",
    )


def main() -> None:
    """``python -m workflows.nightly``: install the schedule and say when it fires next."""
    info = install_schedule()
    when = info.next_fire_at.astimezone(ZoneInfo(TIMEZONE)) if info.next_fire_at else None
    print(f"schedule {info.name}: {info.cron} ({info.timezone}); next fire {when}")


if __name__ == "__main__":
    main()
