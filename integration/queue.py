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

SEEN_TTL_S = 7 * 24 * 3600  # HubSpot retries for up to three days


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


def _seen_key(event: LeadEvent, event_id: str) -> str:
    return f"leadscore:seen:{event.crm}:{event.account_id}:{event_id}"


def enqueue_scoring(queue: Queue, events: list[LeadEvent]) -> EnqueueReport:
    """Record the leads of events not seen before as pending, and kick their accounts' collectors."""
    report = EnqueueReport()
    if not events:
        return report
    connection: Redis = queue.connection
    try:
        seen_flags = connection.mget([_seen_key(e, e.event_ids[0]) for e in events])
        fresh = [e for e, seen in zip(events, seen_flags, strict=True) if seen is None]
        report.duplicates = len(events) - len(fresh)
        accepted_at = datetime.now(UTC)
        to_score = [e.model_copy(update={"accepted_at": accepted_at}) for e in coalesce(fresh)]
        if not to_score:
            return report
        with connection.pipeline(transaction=True) as pipe:
            pending.record(pipe, to_score, accepted_at.timestamp())
            for event in fresh:
                for event_id in event.event_ids:
                    pipe.set(_seen_key(event, event_id), 1, ex=SEEN_TTL_S)
            pipe.execute()
        report.leads = [e.lead_key for e in to_score]
        for crm, account in dict.fromkeys((e.crm, e.account_id) for e in to_score):
            pending.kick(queue, crm, account)
    except RedisError as exc:
        log.error("redis refused the delivery: %s", exc)
        if report.leads:  # recorded durably; only the kick failed, and the sweeper repairs that
            return report
        raise QueueUnavailable("the queue (Redis) is unavailable, nothing was accepted; retry later") from exc
    return report


def hand_off(queue: Queue, crm: str, triaged: list[Triaged]) -> dict:
    """Log what is not scored, enqueue the rest; the summary every webhook answers with."""
    redis = queue.connection
    metrics.incr(redis, "events_received_total", len(triaged), crm=crm)
    for item in triaged:
        if item.verdict != "score":
            level = logging.INFO if item.verdict == "ignore" else logging.WARNING
            log.log(
                level, "%s event %s not scored: %s", crm, item.ref, item.detail, extra={"event_id": item.ref}
            )
            metrics.incr(redis, "events_ignored_total", crm=crm, reason=item.verdict)
    to_score = [t.lead_event for t in triaged if t.verdict == "score"]
    report = enqueue_scoring(queue, to_score)
    metrics.incr(redis, "events_deduplicated_total", report.duplicates, crm=crm)
    metrics.incr(redis, "events_enqueued_total", len(to_score) - report.duplicates, crm=crm)
    return {
        "received": len(triaged),
        "enqueued": len(report.leads),
        "duplicates": report.duplicates,
        "ignored": sum(t.verdict == "ignore" for t in triaged),
        "unsupported": sum(t.verdict == "unsupported" for t in triaged),
        "leads": report.leads,
    }
