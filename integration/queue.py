"""Hand-off from the web side to RQ: deduplicate, coalesce, enqueue atomically.

A delivery is acknowledged only after its jobs and its "seen" marks are in
Redis in one MULTI/EXEC, so an answered 2xx always means durably queued and a
redelivery after a failure is never mistaken for a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry

from integration.errors import QueueUnavailable
from integration.events import LeadEvent, coalesce

log = logging.getLogger(__name__)

SCORE_JOB = "workers.jobs.score_lead"
SEEN_TTL_S = 7 * 24 * 3600  # HubSpot retries for up to three days
JOB_RETRY = Retry(max=5, interval=[5, 30, 120, 600, 1800])
JOB_TIMEOUT_S = 120


@dataclass(frozen=True)
class Triaged:
    """What one CRM event comes to: a lead to score, or the reason it is not scored."""

    verdict: Literal["score", "ignore", "unsupported"]
    ref: str  # the CRM's own id for the event, for logs
    detail: str = ""
    lead_event: LeadEvent | None = None


@dataclass
class EnqueueReport:
    job_ids: list[str] = field(default_factory=list)
    duplicates: int = 0


def redis_from_url(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def _seen_key(event: LeadEvent, event_id: str) -> str:
    return f"leadscore:seen:{event.crm}:{event.account_id}:{event_id}"


def enqueue_scoring(queue: Queue, events: list[LeadEvent]) -> EnqueueReport:
    """Enqueue one scoring job per lead for the events not seen before."""
    report = EnqueueReport()
    if not events:
        return report
    connection: Redis = queue.connection
    try:
        seen_flags = connection.mget([_seen_key(e, e.event_ids[0]) for e in events])
        fresh = [e for e, seen in zip(events, seen_flags, strict=True) if seen is None]
        report.duplicates = len(events) - len(fresh)
        to_score = coalesce(fresh)
        if not to_score:
            return report
        with connection.pipeline(transaction=True) as pipe:
            jobs = queue.enqueue_many(
                [
                    Queue.prepare_data(
                        SCORE_JOB,
                        kwargs={"event": event.model_dump(mode="json")},
                        description=f"score {event.lead_key}",
                        timeout=JOB_TIMEOUT_S,
                        retry=JOB_RETRY,
                    )
                    for event in to_score
                ],
                pipeline=pipe,
            )
            for event in fresh:
                for event_id in event.event_ids:
                    pipe.set(_seen_key(event, event_id), 1, ex=SEEN_TTL_S)
            pipe.execute()
    except RedisError as exc:
        log.error("redis refused the delivery: %s", exc)
        raise QueueUnavailable("the queue (Redis) is unavailable, nothing was accepted; retry later") from exc
    report.job_ids = [job.id for job in jobs]
    return report


def hand_off(queue: Queue, crm: str, triaged: list[Triaged]) -> dict:
    """Log what is not scored, enqueue the rest; the summary every webhook answers with."""
    for item in triaged:
        if item.verdict != "score":
            level = logging.INFO if item.verdict == "ignore" else logging.WARNING
            log.log(level, "%s event %s not scored: %s", crm, item.ref, item.detail)
    report = enqueue_scoring(queue, [t.lead_event for t in triaged if t.verdict == "score"])
    return {
        "received": len(triaged),
        "enqueued": len(report.job_ids),
        "duplicates": report.duplicates,
        "ignored": sum(t.verdict == "ignore" for t in triaged),
        "unsupported": sum(t.verdict == "unsupported" for t in triaged),
        "jobs": report.job_ids,
    }
