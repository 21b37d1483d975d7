"""JSON encoding of everything durable stores or sends, with a size limit.

Arguments, results and payloads are JSON so that nothing read back can run code. Tuples come
back as lists, as they do through Celery's JSON serializer.

Object keys are written in the order PostgreSQL's ``jsonb`` keeps them (shorter keys first,
then by their UTF-8 bytes), so a value reads back with its keys in the same order whichever
way it comes: from a ``jsonb`` column, from a codec's envelope, or straight from the text
just written (a local step's result, a step's outcome replayed in memory). A workflow that
iterates over a dict result therefore takes the same path on every replay.

Errors are one line, ``"<module.Type>: <message>"`` (:func:`describe_exception`). With a codec,
the message is encoded and the type stays readable (:func:`seal_error`):
``"myapp.CardDeclined: {"$durable":"fernet","data":"..."}"``; :func:`open_error` gives the
message back to a process with the key, :func:`mask_error` shows ``<encrypted>`` in its place.
"""

from __future__ import annotations

import json
import re
from typing import Any

from durable.codec import ENVELOPE, is_sealed, open_, placeholder, seal
from durable.errors import PayloadError

# A NUL character as JSON writes it: "\u0000" after an even number of backslashes (an odd
# number would make it the text "\u0000" after a literal backslash). PostgreSQL's jsonb
# refuses it, and a value refused there would fail at the commit, not at the call.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# An error's encoded message: the envelope ``seal`` writes, at the end of the error's text
# (a child's error reaches its parent's step with a prefix, ``failed: ``).
_SEALED_MESSAGE = re.compile(
    r'\{"' + re.escape(ENVELOPE) + r'":"[^"]+","data":"[A-Za-z0-9+/=]*"\}\Z'
)


def _jsonb_key(key: str) -> tuple[int, bytes]:
    raw = key.encode("utf-8", errors="surrogatepass")
    return len(raw), raw


def _key_text(key: Any) -> str:
    """A dict key as ``json.dumps`` writes it."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return json.dumps(key)
    if isinstance(key, int | float):
        return json.dumps(key, allow_nan=False)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def in_jsonb_order(value: Any) -> Any:
    """``value`` with every dict's keys (as JSON writes them) in ``jsonb``'s order."""
    if isinstance(value, dict):
        items = {_key_text(k): in_jsonb_order(v) for k, v in value.items()}
        return {k: items[k] for k in sorted(items, key=_jsonb_key)}
    if isinstance(value, list | tuple):
        return [in_jsonb_order(v) for v in value]
    return value


def dumps(value: Any, what: str, limit: int) -> str:
    """``value`` as plain JSON text, or :class:`PayloadError` naming ``what``."""
    try:
        ordered = in_jsonb_order(value)
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(what, f"not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise PayloadError(what, "nested too deeply to store") from None
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise PayloadError(what, f"{size} bytes is over the limit of {limit} bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(what, "contains text that is not valid UTF-8") from None
    if "\\u0000" in text and _NUL.search(text):
        raise PayloadError(what, "contains a NUL character (\\x00), which PostgreSQL cannot store")
    return text


def encode(value: Any, what: str, limit: int, codec: Any = None) -> str:
    """``value`` as the JSON text to store or send: checked, then encoded by ``codec``."""
    return seal(dumps(value, what, limit), codec)


def decode(value: Any, codec: Any = None) -> Any:
    """A stored value as read back from PostgreSQL, opened if ``codec`` encoded it."""
    data = open_(value, codec)
    return value if data is None else json.loads(data)


def describe_exception(exc: BaseException) -> str:
    """One line naming an exception's type and message, as stored in ``error`` columns."""
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # PostgreSQL's text cannot hold NUL: written as text, the error can always be stored.
    message = message.replace("\x00", "\\x00")
    return f"{name}: {message}" if message else name


def seal_error(error: str, codec: Any) -> str:
    """``error`` (from :func:`describe_exception`) with its message encoded by ``codec``.

    The type before ``": "`` stays readable; an error without a message, or one the codec
    declines to encode (a short one, under compression only), is returned as it is.
    """
    name, sep, message = error.partition(": ")
    if codec is None or not sep or not message:
        return error
    text = json.dumps(message, ensure_ascii=False)
    sealed = seal(text, codec)
    return error if sealed == text else f"{name}: {sealed}"


def _sealed_message(error: str) -> tuple[str, dict[str, Any]] | None:
    """The text before an encoded message and its envelope, or None if it has none."""
    found = _SEALED_MESSAGE.search(error)
    if found is None:
        return None
    envelope = json.loads(found.group(0))
    return (error[: found.start()], envelope) if is_sealed(envelope) else None


def open_error(error: str, codec: Any) -> str:
    """``error`` with its encoded message opened by ``codec``; unchanged if not encoded.

    Raises:
        CodecUnavailable: the message is encoded and ``codec`` cannot open it.
    """
    sealed = _sealed_message(error)
    if sealed is None:
        return error
    data = open_(sealed[1], codec)
    return sealed[0] + str(json.loads(data or b'""'))


def mask_error(error: str) -> str:
    """``error`` with an encoded message shown as ``<encrypted>`` (or ``<encoded: NAME>``)."""
    sealed = _sealed_message(error)
    return error if sealed is None else sealed[0] + placeholder(sealed[1])


def readable_error(error: str, codec: Any) -> str:
    """``error`` opened by ``codec`` where it can be, else with its message masked."""
    try:
        return open_error(error, codec)
    except Exception:  # a wrong key, a codec not configured here: never guessed at
        return mask_error(error)
