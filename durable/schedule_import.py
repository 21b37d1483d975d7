"""Importing existing schedules: Celery ``beat_schedule`` entries and crontab lines.

``durable beat`` (at start), ``durable schedule import-crontab`` and
:meth:`durable.scheduler.Schedules.import_beat_schedule` /
:meth:`~durable.scheduler.Schedules.import_crontab` turn what a team runs today into
schedules: a ``beat_schedule`` entry becomes a schedule of the ``durable.task`` workflow (its
task runs as one durable step); a crontab line that runs ``durable start NAME``, ``celery
call TASK`` or a bare workflow or task name becomes a schedule of that workflow. Anything
else is reported, one line each, and nothing is written for it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from celery.schedules import crontab, schedule

from durable.builtin_workflows import RETRY_OPTION, TASK_WORKFLOW
from durable.cadence import NICKNAMES, Cadence, time_zone
from durable.errors import DurableError, InvalidSchedule
from durable.retry import RetryPolicy
from durable.store.schedules import Definition

if TYPE_CHECKING:
    from durable.core import Core


class Schedules(Protocol):
    """What an import needs of :class:`durable.scheduler.Schedules`, which calls it."""

    durable: Core | None

    def define(
        self,
        name: str,
        workflow: str,
        cron: str | None,
        every: timedelta | float | None,
        args: Iterable[Any],
        kwargs: Mapping[str, Any] | None,
        timezone: str,
        catchup: str,
        overlap: str,
        origin: str,
    ) -> Definition:
        """Validate a definition without writing it."""

    def save(self, definition: Definition) -> str:
        """Write a validated definition; returns ``added``, ``updated`` or ``unchanged``."""

    def prune(self, origin: str, keep: list[str]) -> list[str]:
        """Remove the schedules of ``origin`` whose names are not in ``keep``."""

    def check_not_taken(self, name: str) -> None:
        """Raise ``InvalidSchedule`` if ``name`` exists and did not come from a crontab."""


@dataclass
class ImportReport:
    """What an import did: names added, updated, unchanged and removed, and its problems."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line for each entry or crontab line that could not be imported."""


def import_beat_schedule(
    schedules: Schedules,
    beat_schedule: Mapping[str, Any],
    *,
    timezone: str | None = None,
    prune: bool = True,
) -> ImportReport:
    """See :meth:`durable.scheduler.Schedules.import_beat_schedule`."""
    if timezone is None:
        conf = schedules.durable.app.conf if schedules.durable is not None else {}
        timezone = str(conf.get("timezone") or "UTC")
    report = ImportReport()
    for name, entry in beat_schedule.items():
        try:
            definition = beat_entry(schedules, name, entry, timezone)
            getattr(report, schedules.save(definition)).append(name)
        except DurableError as exc:
            report.problems.append(f"beat_schedule entry {name!r}: {_reason(exc)}")
    if prune:
        report.removed = schedules.prune("beat_schedule", list(beat_schedule))
    return report


def import_crontab(
    schedules: Schedules,
    text: str,
    *,
    timezone: str = "UTC",
    catchup: str = "skip",
    overlap: str = "skip",
) -> ImportReport:
    """See :meth:`durable.scheduler.Schedules.import_crontab`."""
    report, seen = ImportReport(), Counter[str]()
    for number, line in enumerate(text.splitlines(), 1):
        try:
            mapped = crontab_line(schedules, line, timezone)
            if isinstance(mapped, str):
                timezone = mapped
            if not isinstance(mapped, tuple):
                continue
            expr, workflow, args, kwargs = mapped
            base = str(args[0]) if workflow == TASK_WORKFLOW else workflow
            seen[base] += 1
            name = base if seen[base] == 1 else f"{base}-{seen[base]}"
            definition = schedules.define(
                name, workflow, expr, None, args, kwargs, timezone, catchup, overlap, "crontab"
            )
            schedules.check_not_taken(name)
            getattr(report, schedules.save(definition)).append(name)
        except DurableError as exc:
            report.problems.append(f"line {number}: {_reason(exc)}: {line.strip()}")
    return report


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InvalidSchedule):
        return exc.reason
    return str(exc).strip("'\"") or type(exc).__name__


def beat_entry(schedules: Schedules, name: str, entry: Mapping[str, Any], tz: str) -> Definition:
    """A ``beat_schedule`` entry as a definition of the ``durable.task`` workflow."""
    if not isinstance(entry, Mapping) or "task" not in entry or "schedule" not in entry:
        raise InvalidSchedule(name, "an entry needs a 'task' and a 'schedule'")
    spec, cron, every = entry["schedule"], None, None
    if isinstance(spec, crontab):
        cron = celery_crontab_expression(spec, name)
    elif isinstance(spec, schedule):
        every = getattr(spec, "run_every", None)
    elif isinstance(spec, timedelta | int | float):
        every = spec
    else:
        raise InvalidSchedule(name, f"a {type(spec).__name__} schedule cannot be imported")
    call = [entry["task"], list(entry.get("args") or ()), dict(entry.get("kwargs") or {})]
    if entry.get("options"):
        call.append(call_options(name, entry["options"]))
    return schedules.define(
        name, TASK_WORKFLOW, cron, every, call, None, tz, "skip", "skip", "beat_schedule"
    )


def call_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """An entry's ``options`` as stored JSON: moments as ISO-8601, durations as seconds.

    ``expires``, ``countdown`` and ``eta`` are honoured by ``durable.task`` from the fire
    time; a :class:`~durable.retry.RetryPolicy` under ``durable_retry`` becomes its dict.
    """
    found = dict(options)
    for key in ("expires", "countdown", "eta"):
        value = found.get(key)
        if isinstance(value, timedelta):
            found[key] = value.total_seconds()
        elif isinstance(value, datetime):
            found[key] = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
        elif value is not None and (key == "eta" or not isinstance(value, int | float)):
            raise InvalidSchedule(name, f"options: {key} must be seconds or a datetime")
    policy = found.get(RETRY_OPTION)
    if isinstance(policy, RetryPolicy):
        found[RETRY_OPTION] = policy.to_dict()
    elif policy is not None:
        try:
            RetryPolicy.from_dict(policy)
        except (TypeError, ValueError, KeyError, ImportError) as exc:
            raise InvalidSchedule(
                name, f"options: {RETRY_OPTION} is not a policy ({exc})"
            ) from None
    return found


def celery_crontab_expression(spec: Any, name: str = "") -> str:
    """The cron expression of a Celery ``crontab`` (minute hour day month weekday)."""
    parts = []
    for attr in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week"):
        value = getattr(spec, f"_orig_{attr}")
        if not isinstance(value, str | int):
            value = ",".join(str(v) for v in sorted(value))
        parts.append(str(value).replace(" ", ""))
    if parts[2] != "*" and parts[4] != "*":
        # Celery runs on days matching both; cron on days matching either.
        raise InvalidSchedule(
            name, "a crontab restricting both day_of_month and day_of_week has no cron equivalent"
        )
    return " ".join(parts)


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_REDIRECT = re.compile(r"^(\d?>>?|&>|\d?>&\d|<)")


def crontab_line(
    schedules: Schedules, line: str, timezone: str
) -> str | tuple[str, str, list[Any], dict[str, Any]] | None:
    """Read one crontab line: None (nothing to do), a time zone (``CRON_TZ=``) or a schedule.

    A schedule is (cron expression, workflow, args, kwargs). Raises :class:`InvalidSchedule`
    with the reason the line cannot be mapped.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    assignment = _ASSIGNMENT.match(text)
    if assignment:
        if assignment.group(1) not in ("CRON_TZ", "TZ"):
            return None
        return time_zone(assignment.group(2).strip().strip("'\""), "").key
    if text.startswith("@"):
        nickname, _, command = text.partition(" ")
        if nickname.lower() not in NICKNAMES:
            raise InvalidSchedule("", f"{nickname} has no time to schedule")
        expr = NICKNAMES[nickname.lower()]
    else:
        parts = text.split(None, 5)
        if len(parts) < 6:
            raise InvalidSchedule("", "not a crontab line (five time fields, then a command)")
        expr, command = " ".join(parts[:5]), parts[5]
    Cadence.parse(expr, None, timezone)
    return (expr, *crontab_command(schedules, command.strip()))


def crontab_command(schedules: Schedules, command: str) -> tuple[str, list[Any], dict[str, Any]]:
    """The (workflow, args, kwargs) a crontab command runs; raises :class:`InvalidSchedule`."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise InvalidSchedule("", f"cannot read the command ({exc})") from None
    words = _drop_redirects(words)
    if any(w in ("|", "||", "&&", ";", "&") for w in words) or "%" in command:
        raise InvalidSchedule("", "a shell pipeline cannot be mapped")
    program = os.path.basename(words[0]) if words else ""
    if program == "durable" and "start" in words:
        # A fixed --id would give every fire one run: the fire's own id replaces it.
        ignored = {"--id", "--app", "-A", "--database-url"}
        name, args, kwargs, _ = _call(words[words.index("start") + 1 :], ignored)
        return name, args, kwargs
    if program == "celery" and "call" in words:
        ignored = {"--eta", "--countdown", "--expires", "--serializer", "--app", "-A"}
        task, args, kwargs, queue = _call(words[words.index("call") + 1 :], ignored)
        return TASK_WORKFLOW, [task, args, kwargs, *([{"queue": queue}] if queue else [])], {}
    durable = schedules.durable
    if durable is not None and len(words) == 1:
        if words[0] in durable.registry:
            return words[0], [], {}
        if words[0] in durable.app.tasks:
            return TASK_WORKFLOW, [words[0], [], {}], {}
    raise InvalidSchedule(
        "", "the command names no workflow or task (use durable start NAME or celery call TASK)"
    )


def _drop_redirects(words: list[str]) -> list[str]:
    kept: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif _REDIRECT.match(word):
            skip_next = word in (">", ">>", "<", "&>", "1>", "2>", "1>>", "2>>")
        else:
            kept.append(word)
    return kept


def _call(words: list[str], ignored: set[str]) -> tuple[str, list[Any], dict[str, Any], str]:
    """Read ``NAME [--args JSON] [--kwargs JSON] [--queue Q]``, skipping ``ignored`` options."""
    found: dict[str, str] = {"--args": "[]", "--kwargs": "{}", "--queue": ""}
    short = {"-a": "--args", "-k": "--kwargs", "-Q": "--queue"}
    name = None
    pairs = iter(words)
    for word in pairs:
        key, eq, value = word.partition("=")
        key = short.get(key, key)
        if key in found or key in ignored:
            found[key] = value if eq else next(pairs, "")
        elif word.startswith("-"):
            raise InvalidSchedule("", f"option {key} cannot be mapped")
        elif name is None:
            name = word
        else:
            raise InvalidSchedule("", f"unexpected argument {word!r}")
    if not name:
        raise InvalidSchedule("", "no workflow or task name")
    try:
        args, kwargs = json.loads(found["--args"]), json.loads(found["--kwargs"])
    except ValueError as exc:
        raise InvalidSchedule("", f"arguments are not valid JSON ({exc})") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidSchedule("", "--args must be a JSON array and --kwargs a JSON object")
    return name, args, kwargs, found["--queue"]
