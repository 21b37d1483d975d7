r"""Searchable attributes: what a run is tagged with, and the filters that find runs by them.

A run's attributes are JSON scalars (``str``, ``int``, ``float``, ``bool``, ``None``) under
keys. They are set by ``durable.start(..., attributes={...})`` and merged by
``ctx.set_attributes(...)``, stored in the run's ``attributes`` column (``jsonb``, with a
GIN index) and read by ``durable list --attr`` and ``Durable.list_runs(attributes=...)``.
They are stored as given, never through the payload codec: they are meant to be searched,
so keep secrets out of them.

Rules, checked before anything is written (:class:`~durable.errors.InvalidAttributes`, a
``ValueError`` too, names what was refused):

- a key is 1 to :data:`MAX_KEY_LENGTH` characters: a letter or ``_``, then letters, digits,
  ``_``, ``.``, ``:`` or ``-`` (so that ``--attr key>=value`` parses one way);
- a value is a JSON scalar; a string is at most :data:`MAX_STRING_LENGTH` characters; a
  float is finite;
- a run holds at most :data:`MAX_KEYS` keys in at most :data:`MAX_BYTES` bytes of JSON.

A filter (:func:`parse_filter`) is ``KEY=VALUE`` (equality) or ``KEY>=VALUE``, ``KEY>VALUE``,
``KEY<=VALUE``, ``KEY<VALUE`` (a range; two of them bound both sides). An equality's value
is read as JSON when it is a JSON scalar (``42``, ``1.5``, ``true``, ``null``, ``"42"``)
and as a string otherwise (``customer=acme``). A range's value is a number or an ISO-8601
time (``2026-12-01``, ``2026-12-01T10:00``, ``2026-12-01T10:00:00+01:00``; without an offset
it is UTC): a number matches the runs whose value under the key is a number, a time those
whose value is a string holding a time. Example::

    parse_filter("customer=42")      # AttributeFilter("customer", "=", 42)
    parse_filter("amount>=100")      # AttributeFilter("amount", ">=", 100)
    parse_filter("due<2026-12-01")   # AttributeFilter("due", "<", datetime(2026, 12, 1, ...))
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from durable.errors import InvalidAttributes

MAX_KEYS = 64
"""Most attribute keys one run holds."""

MAX_KEY_LENGTH = 64
"""Longest attribute key, in characters."""

MAX_STRING_LENGTH = 1024
"""Longest string value, in characters."""

MAX_BYTES = 16 * 1024
"""Largest size of a run's attributes as JSON text, in bytes."""

OPERATORS = ("=", ">=", ">", "<=", "<")
"""The comparisons a filter may use: equality, and the four bounds of a range."""

Scalar = str | int | float | bool | None

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]*")
_FILTER = re.compile(r"(?P<key>[^=<>]*)(?P<op>>=|<=|=|>|<)(?P<value>.*)", re.DOTALL)


def check_key(key: Any) -> str:
    """``key`` if it is a valid attribute key; else :class:`InvalidAttributes`."""
    if not isinstance(key, str):
        raise InvalidAttributes(f"key {key!r} must be a string, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise InvalidAttributes(
            f"key {key[:80]!r} must be 1 to {MAX_KEY_LENGTH} characters: a letter or _, then "
            "letters, digits, _ . : or -"
        )
    return key


def _check_value(key: str, value: Any) -> Scalar:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAttributes(f"value of {key!r} must be a finite number, not {value}")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            raise InvalidAttributes(
                f"value of {key!r} is {len(value)} characters, over {MAX_STRING_LENGTH}"
            )
        if "\x00" in value:
            raise InvalidAttributes(f"value of {key!r} holds a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidAttributes(f"value of {key!r} is not valid UTF-8 text") from None
        return value
    raise InvalidAttributes(
        f"value of {key!r} must be a str, int, float, bool or None, not {type(value).__name__}"
    )


def check(attributes: Any) -> dict[str, Scalar]:
    """``attributes`` checked against the rules above, as a new dict.

    Raises:
        InvalidAttributes: a key or value breaks a rule, or there are too many or too much.
    """
    if not isinstance(attributes, Mapping):
        raise InvalidAttributes(f"attributes must be a mapping, not {type(attributes).__name__}")
    checked = {check_key(k): _check_value(k, v) for k, v in attributes.items()}
    if len(checked) > MAX_KEYS:
        raise InvalidAttributes(f"{len(checked)} keys is over the limit of {MAX_KEYS}")
    size = len(to_json(checked).encode("utf-8"))
    if size > MAX_BYTES:
        raise InvalidAttributes(f"{size} bytes of JSON is over the limit of {MAX_BYTES}")
    return checked


def to_json(attributes: Mapping[str, Scalar]) -> str:
    """Checked attributes as the JSON text the store is given."""
    return json.dumps(dict(attributes), separators=(",", ":"), ensure_ascii=False)


# -- filters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeFilter:
    """One condition on a run's attributes: ``key op value``.

    With ``op`` ``=`` the value is any JSON scalar (the runs whose value under ``key`` is
    equal, type included); with a range operator it is a number or a timezone-aware time.
    """

    key: str
    op: str
    value: Scalar | datetime

    def __post_init__(self) -> None:
        check_key(self.key)
        if self.op not in OPERATORS:
            raise InvalidAttributes(f"operator {self.op!r} is not one of {' '.join(OPERATORS)}")
        if self.op == "=":
            _check_value(self.key, self.value)
        elif isinstance(self.value, datetime):
            if self.value.tzinfo is None:
                raise InvalidAttributes(f"the time bound of {self.key!r} must be timezone-aware")
        elif not isinstance(self.value, int | float) or isinstance(self.value, bool):
            raise InvalidAttributes(f"the bound of {self.key!r} must be a number or a time")
        elif not math.isfinite(self.value):
            raise InvalidAttributes(f"the bound of {self.key!r} must be a finite number")

    @property
    def is_range(self) -> bool:
        """Whether this is a bound of a range (not served by the GIN index)."""
        return self.op != "="

    def __str__(self) -> str:
        """The filter as :func:`parse_filter` reads it back."""
        if isinstance(self.value, datetime):
            return f"{self.key}{self.op}{self.value.isoformat()}"
        return f"{self.key}{self.op}{json.dumps(self.value, ensure_ascii=False)}"


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _equality_value(text: str) -> Scalar:
    try:
        value = json.loads(text, parse_constant=_not_json)  # NaN, Infinity: text
    except ValueError:
        return text
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return text  # JSON, but not a scalar: compared as the text given


def _range_value(key: str, op: str, text: str) -> float | int | datetime:
    stripped = text.strip()
    try:
        number = json.loads(stripped)
    except ValueError:
        number = None
    if isinstance(number, int | float) and not isinstance(number, bool):
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidAttributes(f"{key}{op}{text}: the bound must be a finite number")
        return number
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise InvalidAttributes(
            f"{key}{op}{text[:40]}: a range needs a number or an ISO-8601 time (2026-12-01T10:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_filter(text: str) -> AttributeFilter:
    """``KEY=VALUE``, ``KEY>=VALUE``, ``KEY>VALUE``, ``KEY<=VALUE`` or ``KEY<VALUE``.

    Raises:
        InvalidAttributes: the text is none of these, the key breaks the rules, or a range's
            value is neither a number nor an ISO-8601 time.
    """
    found = _FILTER.fullmatch(text)
    if found is None:
        raise InvalidAttributes(
            f"{text[:60]!r} is not KEY=VALUE, KEY>=VALUE, KEY>VALUE, KEY<=VALUE or KEY<VALUE"
        )
    key, op, raw = found["key"].strip(), found["op"], found["value"]
    check_key(key)
    if op == "=":
        value: Scalar | datetime = _check_value(key, _equality_value(raw))
    else:
        value = _range_value(key, op, raw)
    return AttributeFilter(key, op, value)


def filters_from(
    attributes: Mapping[str, Any] | Iterable[AttributeFilter | str] | None,
) -> list[AttributeFilter]:
    """What a caller passed as ``attributes=`` to a listing, as filters.

    A mapping means equality on each key; otherwise each item is an
    :class:`AttributeFilter` or its text (``"amount>=100"``).
    """
    if attributes is None:
        return []
    if isinstance(attributes, Mapping):
        return [AttributeFilter(k, "=", v) for k, v in check(attributes).items()]
    out = []
    for item in attributes:
        if isinstance(item, AttributeFilter):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_filter(item))
        else:
            raise InvalidAttributes(
                f"an attribute filter must be a str or AttributeFilter, not {type(item).__name__}"
            )
    return out
