"""Rate limits' buckets in Redis: at most R starts per period per (limit, key), fleet-wide.

One key per bucket, under the configurable prefix ``P``: ``P:rate:<limit>:<key>``, a
string holding the bucket's theoretical arrival time (GCRA), in Redis's own clock, expiring
once it is in the past. PostgreSQL stays the truth of what runs: a step waits ``queued``
there, and when no start is free it waits on a durable timer (purpose ``admit``) until the
next one. Losing a bucket (a flush, a restart) lets the next start through at once: at most
one start, within one period, more than the rate allows; nothing stays queued.
"""

from __future__ import annotations

import os
from typing import Any

import redis

# GCRA without burst. KEYS[1] the bucket; ARGV[1] the interval between starts (seconds);
# ARGV[2] the starts wanted. Grants while the bucket's time is not ahead of now (at most one
# here, as each grant moves it one interval on) and returns {granted, seconds until the
# next start free}, the latter as a string (Lua numbers lose their fraction in replies).
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local granted = 0
while granted < want and tat <= now do
    tat = tat + interval
    granted = granted + 1
end
if granted > 0 then
    redis.call('SET', KEYS[1], string.format('%.6f', tat),
               'PX', math.ceil((tat - now) * 1000) + 1000)
end
return {granted, string.format('%.6f', tat - now)}
"""


class RateBuckets:
    """The buckets of rate limits, owned by this class with its key template and script."""

    def __init__(self, redis_url: str, prefix: str = "durable") -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self._client: redis.Redis | None = None
        self._pid = 0
        self._take: Any = None

    def key(self, name: str, key: str) -> str:
        """The Redis key of one bucket."""
        return f"{self.prefix}:rate:{name}:{key}"

    def take(self, name: str, key: str, interval: float, want: int) -> tuple[int, float]:
        """Take up to ``want`` starts; returns (granted, seconds until the next is free)."""
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.redis_url, socket_timeout=5, socket_connect_timeout=5
            )
            self._take = self._client.register_script(TAKE)
            self._pid = os.getpid()
        granted, wait = self._take(keys=[self.key(name, key)], args=[interval, want])
        return int(granted), float(wait)
