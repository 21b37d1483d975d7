"""No test names a server: every test reaches PostgreSQL, Redis and RabbitMQ through the
fixtures that find or start them (``tests/conftest.py``, :mod:`durable.dev.services`), so the
suite runs the same where nothing listens on the default ports."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PG, REDIS, AMQP = DEFAULT_PORTS = (5432, 6379, 5672)
PORTS = "|".join(str(port) for port in DEFAULT_PORTS)
# A URL, or a loopback host, followed by one of those ports.
FIXED_SERVER = re.compile(
    rf"(?:://[^\s'\"]*|\blocalhost|\b127\.0\.0\.1|\[::1\]|\bhost=[^\s,)]+[^\n]*port=)"
    rf":?(?:{PORTS})\b"
)


def fixed_servers(text: str) -> list[str]:
    """The lines of ``text`` that name a server on a default port."""
    return [line.strip() for line in text.splitlines() if FIXED_SERVER.search(line)]


def test_the_pattern_finds_what_it_must() -> None:
    named = [
        f"PG = 'postgresql+psycopg://postgres@127.0.0.1:{PG}/postgres'",
        f'redis.Redis.from_url("redis://localhost:{REDIS}/5")',
        f"AMQP = 'amqp://guest:guest@127.0.0.1:{AMQP}//'",
        f"address = '127.0.0.1:{REDIS}'",
        f"psycopg.connect(host=h, port={PG})",
    ]
    allowed = [
        "UNREACHABLE = 'postgresql://nobody:secret@127.0.0.1:1/x'",
        "sock.bind(('127.0.0.1', 0))",
        "url = services.redis_url",
    ]
    assert fixed_servers("\n".join(named)) == named
    assert fixed_servers("\n".join(allowed)) == []


def test_no_test_names_a_server_on_a_default_port() -> None:
    found = {
        str(path.relative_to(TESTS)): lines
        for path in sorted(TESTS.rglob("*"))
        if path.is_file() and path.suffix in {".py", ".cfg", ".ini", ".toml", ".json", ".txt"}
        for lines in [fixed_servers(path.read_text(encoding="utf-8", errors="replace"))]
        if lines
    }
    assert found == {}, "use the services fixtures instead of a fixed server: " + repr(found)
