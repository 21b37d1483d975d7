"""How ``durable show`` prints a run.

A header, its steps and their attempts, its timers, signals, events and attributes, and the
timeline of its history. Values a payload codec encoded are opened first (:class:`Opener`) when the
command was given the codec (``--app``) or the keys (``--key``); otherwise they show as
``<encrypted>`` (or ``<encoded: NAME>``), never as ciphertext. An error whose message was
encoded keeps its type: ``myapp.CardDeclined: <encrypted>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from durable.cli._common import SafeTable, compact, make_table, status_text, when
from durable.codec import Compression, is_sealed, open_, placeholder
from durable.serialization import mask_error, open_error


class Opener:
    """Opens encoded values with whichever of the given codecs can; counts the others.

    Compression needs no key, so a value that is only compressed is always opened.

    Args:
        codecs: The codecs to try, in order (the app's, one built from ``--key``).
    """

    def __init__(self, codecs: Sequence[Any] = ()) -> None:
        self.codecs = [*codecs, Compression()]
        self.hidden = 0
        """How many values no codec could open."""

    def open(self, value: Any) -> Any:
        """``value`` decoded, ``<encrypted>`` if no codec opens it, or as it is if not encoded."""
        if not is_sealed(value):
            return value
        for codec in self.codecs:
            try:
                data = open_(value, codec)
                return value if data is None else json.loads(data)
            except Exception:  # a wrong key, a codec not configured here: try the next one
                continue
        self.hidden += 1
        return placeholder(value)

    def open_error(self, error: str | None) -> str | None:
        """``error`` with its encoded message opened, or shown as ``<encrypted>``."""
        if not error:
            return error
        for codec in self.codecs:
            try:
                return open_error(error, codec)
            except Exception:  # a wrong key, a codec not configured here: try the next one
                continue
        self.hidden += 1
        return mask_error(error)

    def _step(self, step: dict[str, Any]) -> dict[str, Any]:
        attempts = [{**a, "error": self.open_error(a["error"])} for a in step["attempt_history"]]
        return {
            **step,
            **{k: self.open(step[k]) for k in ("args", "kwargs", "result")},
            "error": self.open_error(step["error"]),
            "attempt_history": attempts,
        }

    def _history(self, event: dict[str, Any]) -> dict[str, Any]:
        detail = event["detail"]
        if not isinstance(detail, dict) or not isinstance(detail.get("error"), str):
            return event
        return {**event, "detail": {**detail, "error": self.open_error(detail["error"])}}

    def reveal(self, run: dict[str, Any]) -> dict[str, Any]:
        """``run`` (as ``admin.describe_run`` gives it) with its encoded values opened."""
        shown = {**run, **{k: self.open(run[k]) for k in ("args", "kwargs", "result")}}
        shown["error"] = self.open_error(run["error"])
        shown["steps"] = [self._step(s) for s in run["steps"]]
        shown["history"] = [self._history(h) for h in run["history"]]
        shown["signals"] = [{**s, "payload": self.open(s["payload"])} for s in run["signals"]]
        shown["events"] = {key: self.open(value) for key, value in run["events"].items()}
        return shown


def duration(seconds: float | None) -> str:
    """A duration for people: ``850ms``, ``3.2s``, ``2m05s``, ``1h02m``, ``3d04h``."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _detail(detail: Any) -> str:
    if not isinstance(detail, dict):
        return compact(detail)
    parts = [f"{k}={compact(v, 60)}" for k, v in detail.items() if v is not None]
    return " ".join(parts)


def _header(run: dict[str, Any], hidden: int) -> Table:
    header = SafeTable.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column(overflow="fold")
    header.add_row("workflow", Text(run["id"]))
    header.add_row("name", Text(run["name"]))
    header.add_row("status", status_text(run["status"]))
    if run.get("paused") and run["status"] == "running":
        header.add_row("", Text("paused: durable unpause lets it go on", style="yellow"))
    if run.get("cancel_requested") and run["status"] == "running":
        header.add_row("", Text("cancellation requested", style="magenta"))
    if run.get("start_at") and run["status"] == "running":
        header.add_row("", Text(f"waiting for its start at {when(run['start_at'])}", style="cyan"))
    limit = run.get("limit")
    if limit and limit.get("queued") and run["status"] == "running":
        place = f"queued #{limit['position']} for limit {limit['limit']}[{limit['key']}]"
        header.add_row("", Text(f"{place}, priority {limit['priority']}", style="cyan"))
    elif limit:
        header.add_row("limit", Text(f"{limit['limit']}[{limit['key']}]"))
    if run.get("parent_id"):
        header.add_row("parent", Text(run["parent_id"]))
    header.add_row("created", when(run["created_at"]))
    header.add_row("finished", when(run["finished_at"]))
    header.add_row("args", Text(compact(run["args"])))
    header.add_row("kwargs", Text(compact(run["kwargs"])))
    if run["error"]:
        header.add_row("error", Text(run["error"], style="red"))
    else:
        header.add_row("result", Text(compact(run["result"])))
    if hidden:
        note = f"{hidden} value(s) could not be decoded: pass --key KEY or the app's --app"
        header.add_row("encoded", Text(note, style="yellow"))
    return header


def _status(step: dict[str, Any]) -> Text:
    """A step's status; for a step under a limit, its limit and key (and queue position)."""
    text = status_text(step["status"])
    limit = step.get("limit")
    if limit:
        place = f" #{limit['position']}" if limit.get("position") is not None else ""
        text.append(f"{place} {limit['limit']}[{limit['key']}]")
    return text


def _steps(run: dict[str, Any]) -> Table:
    columns = ("#", "kind", "name", "status", "attempts", "took", "completed", "result / error")
    table = make_table(*columns, title="steps")
    for s in run["steps"]:
        outcome = Text(s["error"], style="red") if s["error"] else Text(compact(s["result"]))
        table.add_row(
            str(s["seq"]),
            s["kind"],
            Text(s["name"]),
            _status(s),
            str(s["attempts"]),
            duration(s.get("duration")),
            when(s["completed_at"]),
            outcome,
        )
    return table


def _attempts(run: dict[str, Any]) -> Table | None:
    """Every attempt of the steps that needed more than one, or whose attempt failed."""
    shown = [
        (s["seq"], a)
        for s in run["steps"]
        if len(s.get("attempt_history") or []) > 1 or s["status"] == "failed"
        for a in s.get("attempt_history") or []
    ]
    if not shown:
        return None
    table = make_table("#", "attempt", "worker", "started", "took", "outcome", "error")
    table.title = "attempts"
    for seq, a in shown:
        table.add_row(
            str(seq),
            "" if a["attempt"] is None else str(a["attempt"]),
            Text(a["worker"] or ""),
            when(a["started_at"]),
            duration(a["duration"]),
            status_text(a["outcome"]),
            Text(a["error"] or "", style="red"),
        )
    return table


def _extras(run: dict[str, Any]) -> list[Table]:
    tables = []
    if run["timers"]:
        table = make_table("id", "#", "purpose", "fire at", "fired at", "late", title="timers")
        for t in run["timers"]:
            table.add_row(
                str(t["id"]),
                str(t["seq"]),
                t["purpose"],
                when(t["fire_at"]),
                when(t["fired_at"]) or "pending",
                duration(t["lateness"]),
            )
        tables.append(table)
    if run.get("signals"):
        table = make_table("id", "name", "payload", "sent", "taken by #", title="signals")
        for s in run["signals"]:
            taken = "" if s["consumed_seq"] is None else str(s["consumed_seq"])
            table.add_row(
                str(s["id"]),
                Text(s["name"]),
                Text(compact(s["payload"])),
                when(s["sent_at"]),
                taken,
            )
        tables.append(table)
    if run["events"]:
        table = make_table("key", "value", title="events")
        for key, value in run["events"].items():
            table.add_row(Text(key), Text(compact(value)))
        tables.append(table)
    if run.get("attributes"):
        table = make_table("key", "value", title="attributes")
        for key, value in run["attributes"].items():
            table.add_row(Text(key), Text(json.dumps(value, ensure_ascii=False)))
        tables.append(table)
    return tables


def render_run(run: dict[str, Any], out: Console, hidden: int = 0) -> None:
    """Print a run: header, steps (and attempts), timers, signals, events, attributes, timeline.

    ``hidden`` is how many encoded values could not be decoded (a note in the header).
    """
    out.print(_header(run, hidden))
    out.print(_steps(run))
    attempts = _attempts(run)
    if attempts is not None:
        out.print(attempts)
    for table in _extras(run):
        out.print(table)
    timeline = make_table("at", "#", "event", "detail", title="timeline")
    for h in run["history"]:
        seq = "" if h["seq"] is None else str(h["seq"])
        timeline.add_row(when(h["at"]), seq, Text(h["event"]), Text(_detail(h["detail"])))
    out.print(timeline)
