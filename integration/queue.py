"""Hand-off from the web side to the queue: one transaction per delivery, whatever its size.

A delivery is acknowledged only after its events are on their accounts' intake streams,
with its counters, in one MULTI/EXEC, so an answered 2xx always means durably queued.
Deduplication by event id and coalescing into one pending entry per lead happen on the
queue side (`pending.drain`, run by each account's collector): done here they would cost
the web three times what accepting a delivery costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from redis import Redis
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue

from integration import metrics, pending
from integration.clock import shared_now
from integration.errors import QueueUnavailable
from integration.events import ERASE, IntakeRow, pack_intake

if TYPE_CHECKING:
    from integration.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A CRM event that is not scored, and why."""

    verdict: Literal["ignore", "unsupported", "malformed"]
    ref: str  # the CRM's own id for the event, for logs
    detail: str
    echo: bool = False  # leadscore's own write come back: one a write, counted and logged only at DEBUG


def settings_redis(settings: Settings) -> Redis:
    """A client of REDIS_URL's Redis; over TLS (rediss://) its certificate is verified unless
    REDIS_SSL_CERT_REQS is none, and a ?ssl_cert_reqs= in the URL wins."""
    url = settings.redis_url
    tls = {"ssl_cert_reqs": settings.redis_ssl_cert_reqs} if url.startswith("rediss://") else {}
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, **tls)


def durability_risks(redis: Redis) -> list[str]:
    """Redis settings under which events leadscore acknowledged can be lost, each with its fix. Read
    from INFO, which managed Redis services answer where they refuse CONFIG; where INFO is refused
    too, that is said instead."""
    try:
        info = redis.info("memory") | redis.info("persistence") | redis.info("server")
    except ResponseError as exc:
        return [f"its persistence and eviction settings are unknown (INFO refused: {exc})"]
    risks = []
    policy = info.get("maxmemory_policy", "noeviction") if info.get("maxmemory") else "noeviction"  # no limit
    if policy.startswith("allkeys-"):
        risks.append(f"maxmemory-policy is {policy}: when memory runs short Redis evicts queued events; "
                     "set it to noeviction")  # fmt: skip
    elif policy != "noeviction":
        risks.append(f"maxmemory-policy is {policy}: when memory runs short Redis evicts the marks that stop "
                     "repeated events and keep their order; set it to noeviction")  # fmt: skip
    if not info.get("aof_enabled"):
        risks.append("appendonly is off: a Redis restart loses the events acknowledged since its last "
                     "snapshot; set appendonly yes")  # fmt: skip
    if too_old := version_risk(str(info.get("redis_version", ""))):
        risks.append(too_old)
    return risks


def version_risk(version: str) -> str | None:
    """A Redis without LMOVE (before 6.2), where a worker parks no job it takes (`workers.worker`)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # not said, or not a number: nothing to tell
    if (major, minor) >= (6, 2):
        return None
    return (f"version {version} is older than 6.2: a worker killed just after taking a job off its queue "
            "loses the job; upgrade Redis")  # fmt: skip


def hand_off(queue: Queue, crm: str, triaged: list[IntakeRow | Skipped]) -> dict:
    """Log what is not scored, queue the rest; the summary every webhook answers with."""
    ignored = {"ignore": 0, "unsupported": 0, "malformed": 0}
    by_account: dict[str, list[IntakeRow]] = {}
    erasures: list[IntakeRow] = []
    for item in triaged:
        if isinstance(item, IntakeRow):
            by_account.setdefault(item.account_id, []).append(item)
            if item.kind == ERASE:
                erasures.append(item)
            continue
        # Echoes come of every write: a line each at INFO was most of the web's log.
        level = logging.DEBUG if item.echo else logging.INFO if item.verdict == "ignore" else logging.WARNING
        log.log(level, "%s event %s not scored: %s", crm, item.ref, item.detail, extra={"event_id": item.ref})
        ignored[item.verdict] += 1
    queued = len(triaged) - sum(ignored.values())
    counters = [
        ("events_received_total", len(triaged), {"crm": crm}),
        *(("events_ignored_total", n, {"crm": crm, "reason": reason}) for reason, n in ignored.items() if n),
        ("events_enqueued_total", queued, {"crm": crm}),
    ]
    summary = {
        "received": len(triaged),
        "queued": queued,
        "ignored": ignored["ignore"],
        "unsupported": ignored["unsupported"],
    }
    if not by_account:  # nothing to queue, so nothing to refuse when Redis is down
        metrics.incr_many(queue.connection, counters)
        return summary
    accepted_at = shared_now(queue.connection)
    kicked_at: dict[str, int] = {}  # account → position of the answer telling whether it has a collector
    try:
        with queue.connection.pipeline(transaction=True) as pipe:
            for account, rows in by_account.items():
                pending.add_intake(pipe, crm, account, pack_intake(rows, accepted_at), len(rows), accepted_at)
                kicked_at[account] = len(pipe)
                pipe.exists(pending.kick_key(crm, account))
            metrics.add_counters(pipe, counters)
            answers = pipe.execute()
    except RedisTimeoutError as exc:  # sent, unanswered: a Redis that stalled may still apply it
        log.error("redis did not answer for the delivery: %s", exc)
        raise QueueUnavailable(
            "the queue (Redis) did not answer in time, so the delivery may or may not have been taken; "
            "retry it: a repeated event is recognised and dropped"
        ) from exc
    except RedisError as exc:
        log.error("redis refused the delivery: %s", exc)
        raise QueueUnavailable("the queue (Redis) is unavailable, nothing was accepted; retry later") from exc
    for row in erasures:  # a record outside Redis, should Redis be lost before the erasure
        log.info("%s privacy deletion of %s:%s queued (event %s)", crm, row.account_id, row.lead_id,
                 row.event_id, extra={"event_id": row.event_id})  # fmt: skip
    for account, position in kicked_at.items():
        if not answers[position]:
            try:
                pending.kick(queue, crm, account)
            except RedisError as exc:  # the events are queued; the sweeper kicks the account later
                log.error("could not kick the collector of %s:%s: %s", crm, account, exc)
    return summary
