"""Hand-off from the web side to the queue: deduplicate, coalesce, record atomically.

A delivery is acknowledged only after its pending leads and its "seen" marks are
in Redis in one MULTI/EXEC, so an answered 2xx always means durably queued and a
redelivery after a failure is never mistaken for a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from integration import metrics, pending
from integration.errors import QueueUnavailable
from integration.events import LeadEvent, coalesce

log = logging.getLogger(__name__)

SEEN_DAYS = 4  # HubSpot retries for up to three days


@dataclass(frozen=True)
class Triaged:
    """What one CRM event comes to: a lead to score, or the reason it is not scored."""

    verdict: Literal["score", "ignore", "unsupported"]
    ref: str  # the CRM's own id for the event, for logs
    detail: str = ""
    lead_event: LeadEvent | None = None


@dataclass
class EnqueueReport:
    leads: list[str] = field(default_factory=list)
    duplicates: int = 0


def redis_from_url(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def _seen_keys(crm: str, account: str, day: int) -> list[str]:
    """One set of seen event ids per account and UTC day; a redelivery is looked up over SEEN_DAYS."""
    return [f"leadscore:seen:{crm}:{account}:{d}" for d in range(day, day - SEEN_DAYS, -1)]


def enqueue_scoring(queue: Queue, events: list[LeadEvent], batch_size: int = 100) -> EnqueueReport:
    """Record the leads of events not seen before as pending, and get them batched.

    A handful of Redis commands a delivery, whatever its size: one SMISMEMBER per day
    looked back, then one transaction with one HSET, two ZADDs and one SADD per account.
    """
    report = EnqueueReport()
    if not events:
        return report
    connection: Redis = queue.connection
    now = datetime.now(UTC)
    day = int(now.timestamp() // 86400)
    accounts = list(dict.fromkeys((e.crm, e.account_id) for e in events))
    try:
        seen: set[tuple[str, str, str]] = set()
        with connection.pipeline(transaction=False) as pipe:
            for crm, account in accounts:
                ids = [e.event_ids[0] for e in events if (e.crm, e.account_id) == (crm, account)]
                for key in _seen_keys(crm, account, day):
                    pipe.smismember(key, ids)
            answers = iter(pipe.execute())
            for crm, account in accounts:
                ids = [e.event_ids[0] for e in events if (e.crm, e.account_id) == (crm, account)]
                hits = [any(flags) for flags in zip(*(next(answers) for _ in range(SEEN_DAYS)), strict=True)]
                seen |= {(crm, account, i) for i, hit in zip(ids, hits, strict=True) if hit}
        fresh = [e for e in events if (e.crm, e.account_id, e.event_ids[0]) not in seen]
        report.duplicates = len(events) - len(fresh)
        to_score = [e.model_copy(update={"accepted_at": now}) for e in coalesce(fresh)]
        if not to_score:
            return report
        with connection.pipeline(transaction=True) as pipe:
            pending.record(pipe, to_score, now.timestamp())
            for crm, account in accounts:
                ids = [i for e in fresh if (e.crm, e.account_id) == (crm, account) for i in e.event_ids]
                if ids:
                    key = _seen_keys(crm, account, day)[0]
                    pipe.sadd(key, *ids)
                    pipe.expire(key, SEEN_DAYS * 86400)
            for crm, account in accounts:
                pipe.zcard(pending.since_key(crm, account))
            counts = pipe.execute()[-len(accounts) :]
        report.leads = [e.lead_key for e in to_score]
        for (crm, account), count in zip(accounts, counts, strict=True):
            size = pending.batch_size(crm, batch_size)
            while count >= size and pending.take_batch(queue, crm, account, size) is not None:
                count -= size  # full batches go straight to the workers; no linger for them
            if count:
                pending.kick(queue, crm, account)
    except RedisError as exc:
        log.error("redis refused the delivery: %s", exc)
        if report.leads:  # recorded durably; only the batching failed, and the sweeper repairs that
            return report
        raise QueueUnavailable("the queue (Redis) is unavailable, nothing was accepted; retry later") from exc
    return report


def hand_off(queue: Queue, crm: str, triaged: list[Triaged], batch_size: int = 100) -> dict:
    """Log what is not scored, enqueue the rest; the summary every webhook answers with."""
    ignored: dict[str, int] = {}
    for item in triaged:
        if item.verdict != "score":
            level = logging.INFO if item.verdict == "ignore" else logging.WARNING
            log.log(
                level, "%s event %s not scored: %s", crm, item.ref, item.detail, extra={"event_id": item.ref}
            )
            ignored[item.verdict] = ignored.get(item.verdict, 0) + 1
    to_score = [t.lead_event for t in triaged if t.verdict == "score"]
    report = enqueue_scoring(queue, to_score, batch_size)
    metrics.incr_many(
        queue.connection,
        [
            ("events_received_total", len(triaged), {"crm": crm}),
            ("events_deduplicated_total", report.duplicates, {"crm": crm}),
            ("events_enqueued_total", len(to_score) - report.duplicates, {"crm": crm}),
            *(("events_ignored_total", n, {"crm": crm, "reason": reason}) for reason, n in ignored.items()),
        ],
    )
    return {
        "received": len(triaged),
        "enqueued": len(report.leads),
        "duplicates": report.duplicates,
        "ignored": sum(t.verdict == "ignore" for t in triaged),
        "unsupported": sum(t.verdict == "unsupported" for t in triaged),
        "leads": report.leads,
    }
