"""The time every host agrees on: Redis's clock, read once a minute and run on by this host's own timer.

A web host stamps when it accepted a delivery; a worker on another host compares that stamp with its
own "now" to linger, to sweep lost kicks and to measure freshness. Host clocks disagree (a VM resumed,
NTP not yet synced), and a web host an hour ahead would make a lone lead linger for an hour. So the
stamps and the comparisons both read Redis's clock, at the cost of one TIME call a minute per process
(a forked job that needs the time reads it once). Erasure marks need Redis's time exactly, so
`redis_now` asks it every time.
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
RETRY_S = 1.0  # while no reading was ever had: this host's clock meanwhile, Redis asked again soon
# Runs on through a suspend (a VM paused, a laptop asleep), where the monotonic clock stops.
_timer = getattr(time, "CLOCK_BOOTTIME", None)


def _elapsed() -> float:
    return time.clock_gettime(_timer) if _timer is not None else time.monotonic()


class _Reading:
    __slots__ = ("redis_time", "read_at", "tried_at")

    def __init__(self, redis_time: float | None, read_at: float):
        self.redis_time, self.read_at, self.tried_at = redis_time, read_at, read_at


# connection pool → the last reading of Redis's clock through it
_readings: WeakKeyDictionary = WeakKeyDictionary()


def redis_now(redis: Redis) -> float:
    """Redis's clock this instant, asked of Redis."""
    seconds, microseconds = redis.time()
    return seconds + microseconds / 1e6


def shared_now(redis: Redis) -> float:
    """Seconds since the epoch on Redis's clock. Between readings it runs on from the last good one,
    a failed refresh included; only a process that never reached Redis uses its own clock."""
    pool = redis.connection_pool
    reading = _readings.get(pool)
    now = _elapsed()
    due = REFRESH_S if reading is not None and reading.redis_time is not None else RETRY_S
    if reading is None or now - reading.tried_at >= due:
        reading = _refresh(redis, reading, now)
        _readings[pool] = reading
    if reading.redis_time is None:
        return time.time()
    return reading.redis_time + (_elapsed() - reading.read_at)


def shared_now_utc(redis: Redis) -> datetime:
    return datetime.fromtimestamp(shared_now(redis), UTC)


def _refresh(redis: Redis, last: _Reading | None, now: float) -> _Reading:
    try:
        at = redis_now(redis)
    except RedisError as exc:  # the caller's own Redis call will say so
        if last is None or last.redis_time is None:
            if last is None:  # said once, not at every retry
                log.warning("could not read Redis's clock, using this host's until it answers: %s", exc)
            last = last or _Reading(None, now)
        last.tried_at = now
        return last
    return _Reading(at, (now + _elapsed()) / 2)
