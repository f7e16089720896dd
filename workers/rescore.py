"""`leadscore rescore`: queue every open lead of an account, as its webhook events would come.

At go-live no lead has a score, and after the rules, the model or the holdout share change, only
leads that change again are rescored: list views would mix two rule sets. This pages every lead id
of the account from the CRM and makes the leads pending, a thousand a transaction, where the
account's collector batches them as it batches webhook events. A lead already waiting keeps its
event, so running it twice queues nothing twice; a lead whose inputs and rules have not changed
costs its share of one batched read, and no LLM call and no write (the worker's fingerprint check).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice

from redis import Redis
from rq import Queue

from integration import pending
from integration.clock import shared_now_utc
from integration.crm import same_account
from integration.events import FORCED, RESCORE, LeadEvent
from integration.hubspot.api import HubSpotCRM, shared_limiter
from integration.salesforce.api import SalesforceCRM
from integration.settings import Settings
from workers.progress import progress

CHUNK = 1000  # leads made pending a transaction


class AccountError(ValueError):
    """--account names a portal or org that the configured credentials do not reach."""


@dataclass
class Fed:
    """What a rescore has handed to the pipeline so far, for the account it reached."""

    crm: str
    account: str
    queued: int = 0  # leads made pending
    waiting: int = 0  # leads already pending, left with the event they wait with
    force: bool = False  # score each lead whatever the CRM shows for its inputs (`--force`)


def open_leads(settings: Settings, redis: Redis, crm: str, account: str | None) -> tuple[str, Iterator[str]]:
    """The account the credentials reach, and the ids of its leads that can be scored (Salesforce's
    converted Leads cannot be written). HubSpot's pages take slots of the portal's rate limit that
    the workers share, so a rescore and the scoring it starts stay under HubSpot's limit together."""
    if crm == "hubspot":
        portal = reached_account(settings, crm, account)
        adapter = HubSpotCRM(settings, portal_id=portal, limiter=shared_limiter(redis, settings, portal))
        return portal, adapter.contact_ids()
    org = reached_account(settings, crm, account)
    return org, SalesforceCRM(settings, org_id=org).open_lead_ids()


def reached_account(settings: Settings, crm: str, asked: str | None) -> str:
    """The account to file leads or outcomes under: the one the credentials reach, spelled as its
    webhooks spell it; `asked`, if given, must be it. Filed under another, they would be scored, held
    out and learned from as the wrong account's."""
    if crm == "hubspot":
        reached, what = HubSpotCRM(settings).token_portal(), "portal HUBSPOT_ACCESS_TOKEN belongs to"
    else:
        reached, what = SalesforceCRM(settings).reached_org(), "org the Salesforce credentials reach"
    if asked and not same_account(asked, reached):
        raise AccountError(
            f"--account {asked} is not the {what} ({reached}): leave --account out, or set the "
            f"credentials of {asked}"
        )
    return reached


def feed(queue: Queue, fed: Fed, lead_ids: Iterable[str]) -> Fed:
    """Make the leads pending, CHUNK a transaction, and kick the account's collector after each, so
    the workers score while the CRM is still being paged. `fed` counts only what Redis took."""
    now = shared_now_utc(queue.connection)
    ids = iter(progress(f"queueing {fed.crm}:{fed.account} leads")(lead_ids))
    while chunk := list(islice(ids, CHUNK)):
        # A lead waiting in a backfill batch is scored by it; forced, it is queued again all the same.
        batched = (
            [False] * len(chunk)
            if fed.force
            else pending.backfilling(queue.connection, fed.crm, fed.account, chunk)
        )
        events = [_event(fed, lead_id, now) for lead_id, done in zip(chunk, batched, strict=True) if not done]
        added = pending.requeue(queue, fed.crm, fed.account, events, merge=fed.force) if events else 0
        fed.queued += added
        fed.waiting += len(chunk) - added
    return fed


def _event(fed: Fed, lead_id: str, now: datetime) -> LeadEvent:
    return LeadEvent(
        crm=fed.crm,
        account_id=fed.account,
        lead_id=lead_id,
        event_ids=(f"{RESCORE}:{now:%Y-%m-%dT%H:%M:%SZ}",),
        kinds=(RESCORE, FORCED) if fed.force else (RESCORE,),
        occurred_at=now,
        accepted_at=now,
    )
