r"""Rules for workflow ids and names, checked before anything is written; text made safe to show.

A workflow id, a signal name or an event key travels in messages, task ids, log lines,
Flower and terminals, and is a key of PostgreSQL's indexes. So each must be:

- a ``str`` (not a number, a list or bytes);
- 1 to :data:`MAX_LENGTH` characters long (an index entry has a size limit, and an id is
  repeated in every message, task id and log line of its run);
- free of control characters, format characters (zero-width characters, bidirectional
  overrides such as U+202E), surrogates and line or paragraph separators, i.e. any character
  of the Unicode categories ``Cc``, ``Cf``, ``Cs``, ``Zl`` or ``Zp``: a newline in an id
  forges log lines, ESC drives terminals, a bidi override shows another id than the real one.

Letters of any script, digits, punctuation, symbols and spaces are allowed.
:class:`~durable.errors.InvalidIdentifier` (a ``ValueError`` too) names what was refused.

Example::

    check_id("order-o-1")             # returns "order-o-1"
    check_id("order\n-o-1")           # InvalidIdentifier: workflow id ... control character
"""

from __future__ import annotations

import unicodedata
from typing import Any

from durable.errors import InvalidIdentifier

MAX_LENGTH = 200
"""Longest workflow id, signal name or event key, in characters."""

_REFUSED = {"Cc", "Cf", "Cs", "Zl", "Zp"}
# Shown escaped by the CLI: controls, separators, surrogates and the bidirectional marks and
# overrides. Other format characters (zero-width joiners in emoji, Persian's ZWNJ) are shown.
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in {"Cc", "Cs", "Zl", "Zp"} or ord(char) in _BIDI


def check_id(value: Any, what: str = "workflow id") -> str:
    """``value`` if it is a valid id or name; else :class:`InvalidIdentifier`.

    Args:
        value: The id or name to check.
        what: What it is, for the message (``workflow id``, ``signal name``...).
    """
    if not isinstance(value, str):
        raise InvalidIdentifier(what, value, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidIdentifier(what, value, "must not be empty")
    if len(value) > MAX_LENGTH:
        raise InvalidIdentifier(what, value, f"is {len(value)} characters, over {MAX_LENGTH}")
    for char in value:
        if unicodedata.category(char) in _REFUSED:
            kind = unicodedata.name(char, f"U+{ord(char):04X}").lower()
            raise InvalidIdentifier(what, value, f"holds the control character {kind}")
    return value


def escape(text: str) -> str:
    r"""``text`` with control, separator and bidirectional characters written as escapes.

    ``"a\nb\x1b[2J"`` becomes ``"a\\nb\\x1b[2J"``: what a terminal would have obeyed is
    shown as text instead.
    """
    if not any(_unsafe(char) for char in text):
        return text
    return "".join(_escaped(char) if _unsafe(char) else char for char in text)


def escape_json(text: str) -> str:
    r"""JSON text with the unsafe characters JSON leaves raw written as ``\uXXXX``."""
    return "".join(
        f"\\u{ord(char):04x}" if char != "\n" and _unsafe(char) else char for char in text
    )


def _escaped(char: str) -> str:
    shown = repr(char)[1:-1]
    if shown != char:
        return shown
    return f"\\u{ord(char):04x}"
