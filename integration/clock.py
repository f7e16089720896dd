"""The time every host agrees on: Redis's clock, read once a minute and run on by each host's monotonic clock.

A web host stamps when it accepted a delivery; a worker on another host compares that stamp with its
own "now" to linger, to sweep lost kicks and to measure freshness. Host clocks disagree (a VM resumed,
NTP not yet synced), and a web host an hour ahead would make a lone lead linger for an hour. So the
stamps and the comparisons both read Redis's clock, at the cost of one TIME call a minute per process.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from weakref import WeakKeyDictionary

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

REFRESH_S = 60.0

# connection pool → (Redis's time, this host's monotonic time when it was read); None: Redis was down
_readings: WeakKeyDictionary = WeakKeyDictionary()


def shared_now(redis: Redis) -> float:
    """Seconds since the epoch on Redis's clock. While Redis cannot be asked, this host's own clock."""
    pool = redis.connection_pool
    reading = _readings.get(pool)
    if reading is None or time.monotonic() - reading[1] >= REFRESH_S:
        reading = _read(redis)
        _readings[pool] = reading
    redis_time, read_at = reading
    if redis_time is None:
        return time.time()
    return redis_time + (time.monotonic() - read_at)


def shared_now_utc(redis: Redis) -> datetime:
    return datetime.fromtimestamp(shared_now(redis), UTC)


def _read(redis: Redis) -> tuple[float | None, float]:
    before = time.monotonic()
    try:
        seconds, microseconds = redis.time()
    except RedisError as exc:  # the caller's own Redis call will say so; until the next reading, our clock
        log.warning("could not read Redis's clock, using this host's for a minute: %s", exc)
        return None, before
    after = time.monotonic()
    return seconds + microseconds / 1e6, (before + after) / 2
