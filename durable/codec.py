"""Payload codecs: encryption and compression of everything durable stores and sends.

A codec turns the JSON text of a value into bytes and back. ``Durable(app, codec=...)``
applies it to workflow arguments and results, step arguments and results, signal payloads
and event values, and to the messages of errors (whose type stays readable: see
``durable.serialization.seal_error`` and the ``encode_errors`` setting); not to names, ids
or step options. An encoded value is stored as a small JSON envelope
``{"$durable": "<codec names>", "data": "<base64>"}``, so PostgreSQL and Redis only ever hold
ciphertext, and a reader without the key sees that the value is encoded instead of garbage.

Example::

    from durable.codec import Compression, Fernet

    durable = Durable(app, codec=Compression(min_size=4096) | Fernet(keys=[new_key, old_key]))

Key rotation: the first key encrypts, every key decrypts; add the new key first, and drop the
old one once nothing written with it is still needed (``durable purge``).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

from durable.errors import CodecUnavailable, ConfigurationError

ENVELOPE = "$durable"


class Codec(Protocol):
    """Turns encoded JSON bytes into stored bytes and back."""

    name: str

    def encode(self, data: bytes) -> bytes | None:
        """The stored form of ``data``, or None to store it as plain JSON."""

    def decode(self, data: bytes) -> bytes:
        """The original bytes of a stored form."""


class Pipeline:
    """Codecs applied in order on the way in, in reverse on the way out (``a | b``).

    The envelope records which of them applied (a compression may decline a small value).
    """

    def __init__(self, *codecs: Any) -> None:
        self.codecs: list[Any] = []
        for codec in codecs:
            self.codecs.extend(codec.codecs if isinstance(codec, Pipeline) else [codec])
        self.name = "+".join(c.name for c in self.codecs)

    def __or__(self, other: Any) -> Pipeline:
        return Pipeline(self, other)


class _Base:
    name = ""

    def __or__(self, other: Any) -> Pipeline:
        return Pipeline(self, other)


class Compression(_Base):
    """zlib compression of values of at least ``min_size`` bytes."""

    name = "zlib"

    def __init__(self, min_size: int = 1024, level: int = 6) -> None:
        self.min_size = min_size
        self.level = level

    def encode(self, data: bytes) -> bytes | None:
        """Compressed bytes, or None for a value under ``min_size``."""
        return zlib.compress(data, self.level) if len(data) >= self.min_size else None

    def decode(self, data: bytes) -> bytes:
        """The decompressed bytes."""
        return zlib.decompress(data)


class Fernet(_Base):
    """Authenticated encryption (Fernet, from ``cryptography``) with a list of keys.

    The first key encrypts; all keys are tried to decrypt, so keys can be rotated.
    Generate a key with ``python -m durable.codec``.
    """

    name = "fernet"

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        try:
            from cryptography.fernet import Fernet as _Fernet
            from cryptography.fernet import MultiFernet
        except ImportError:  # pragma: no cover - depends on the optional extra
            raise ConfigurationError(
                "the Fernet codec needs the cryptography package: "
                "pip install 'celery-durable[crypto]'"
            ) from None
        if not keys:
            raise ConfigurationError("the Fernet codec needs at least one key")
        try:
            self._fernet = MultiFernet([_Fernet(k) for k in keys])
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"invalid Fernet key: {exc}") from None

    def encode(self, data: bytes) -> bytes | None:
        """The encrypted token."""
        return self._fernet.encrypt(data)

    def decode(self, data: bytes) -> bytes:
        """The decrypted bytes; a token no key opens is a :class:`PayloadError`."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(data)
        except InvalidToken:
            raise CodecUnavailable("it is encrypted and no configured key decrypts it") from None


def codec_from_settings(settings: Any) -> Pipeline | None:
    """The codec the settings ask for (``compress_min_bytes``, ``encryption_keys``), or None."""
    members: list[Any] = []
    if settings.compress_min_bytes:
        members.append(Compression(min_size=settings.compress_min_bytes))
    if settings.encryption_keys:
        keys = [k.strip() for k in str(settings.encryption_keys).split(",") if k.strip()]
        members.append(Fernet(keys))
    return Pipeline(*members) if members else None


def _members(codec: Any) -> list[Any]:
    return list(codec.codecs) if isinstance(codec, Pipeline) else [codec]


def seal(text: str, codec: Any) -> str:
    """The stored JSON text of a value's JSON ``text`` under ``codec`` (None: unchanged)."""
    if codec is None:
        return text
    data, applied = text.encode("utf-8"), []
    for member in _members(codec):
        encoded = member.encode(data)
        if encoded is not None:
            data = encoded
            applied.append(member.name)
    if not applied:
        return text
    payload = base64.b64encode(data).decode("ascii")
    return '{"%s":"%s","data":"%s"}' % (ENVELOPE, "+".join(applied), payload)  # noqa: UP031


def is_sealed(value: Any) -> bool:
    """Whether a stored value (as read back from JSON) is an encoded envelope."""
    return isinstance(value, dict) and len(value) == 2 and ENVELOPE in value and "data" in value


def open_(value: Any, codec: Any) -> bytes | None:
    """The JSON bytes inside an envelope, or None when ``value`` is not one."""
    if not is_sealed(value):
        return None
    names = str(value[ENVELOPE]).split("+")
    if codec is None:
        raise CodecUnavailable(f"it is encoded ({'+'.join(names)}) and no codec is set")
    by_name = {m.name: m for m in _members(codec)}
    data = base64.b64decode(value["data"])
    for name in reversed(names):
        member = by_name.get(name)
        if member is None:
            raise CodecUnavailable(f"it is encoded with {name!r}, which is not configured")
        data = member.decode(data)
    return data


def placeholder(value: dict[str, Any]) -> str:
    """``<encrypted>``, or ``<encoded: NAME>``: what an envelope no codec opens shows as."""
    names = str(value[ENVELOPE])
    return "<encrypted>" if "fernet" in names.split("+") else f"<encoded: {names}>"


if __name__ == "__main__":  # pragma: no cover
    from cryptography.fernet import Fernet as _KeyMaker

    print(_KeyMaker.generate_key().decode())
