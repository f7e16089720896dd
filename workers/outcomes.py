"""`leadscore outcomes sync`: backfill outcomes from the CRM APIs into the score store.

Webhooks bring outcomes as they happen (the worker reads the lead's stage with every score);
this catches up on what happened while leadscore was not listening. An outcome teaches something
only about a lead scored before it, so only leads changed since the day before an account's first
kept score are read: a CRM with years of customers costs the API calls of the months leadscore has
run. Outcomes are kept once per lead and kind, so running it again only adds what is new.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from redis import Redis
from sqlalchemy import func, select

from integration.clock import redis_now
from integration.crm import same_account
from integration.errors import CRMError, CRMUnavailable
from integration.hubspot.api import HubSpotCRM, shared_limiter
from integration.queue import settings_redis
from integration.salesforce.api import SalesforceCRM
from integration.settings import Settings
from workers.jobs import erase, erased_since
from workers.progress import progress
from workers.rescore import reached_account
from workers.store import LeadFact, Store, as_utc, scores

log = logging.getLogger(__name__)

CLOCK_MARGIN = timedelta(days=1)  # the CRM's clock against leadscore's; the day costs a few more reads
NOT_SCORED = {"since": None, "leads": 0, "new_outcomes": 0}  # an account with no kept score: not read


def _accounts_in_store(store: Store, crm: str) -> list[str]:
    with store.engine.connect() as connection:
        return sorted(
            connection.execute(select(scores.c.account_id).where(scores.c.crm == crm).distinct()).scalars()
        )


def _changed_since(store: Store, crm: str, account: str) -> datetime | None:
    """When a lead of this account could first have reached an outcome worth keeping: the day
    before its first kept score; None before any score."""
    with store.engine.connect() as connection:
        first = connection.execute(
            select(func.min(scores.c.scored_at)).where(scores.c.crm == crm, scores.c.account_id == account)
        ).scalar()
    return as_utc(first) - CLOCK_MARGIN if first else None


def _the_account(crm: str, candidates: list[str]) -> list[str]:
    """The one account the configured credentials reach; several would be a guess."""
    if len(candidates) > 1:
        raise SyncError(
            f"{crm}: the store and settings name several accounts ({', '.join(candidates)}) but the "
            f"credentials reach one: say which with --crm {crm} --account ID"
        )
    return candidates


def _require_reached(settings: Settings, crm: str, candidate: str, asked: str | None) -> None:
    """The account outcomes will be filed under must be the one the credentials reach: `--account`
    as given, or the one the store's scores name, which credentials since changed may not reach.
    A token that may not say which (no `oauth` scope) is taken at the store's word, as before."""
    if asked:
        reached_account(settings, crm, asked)  # refuses another, naming --account
        return
    try:
        reached = reached_account(settings, crm, None)
    except CRMUnavailable:
        raise
    except CRMError as exc:
        log.warning("%s: could not check which account the credentials reach (%s); filing under %s, the "
                    "account the store's scores name", crm, exc, candidate)  # fmt: skip
        return
    if not same_account(reached, candidate):
        raise SyncError(
            f"{crm}: the store's scores are of account {candidate}, but the credentials reach {reached}: "
            f"what they read would be filed under the wrong account; set the credentials of {candidate}"
        )


def _keep(store: Store, redis: Redis, facts: list[LeadFact], read_at: float) -> int:
    """Keep the outcomes read, then erase again those of leads erased since the reading began
    (`workers.jobs.erase`); how many outcomes were new."""
    new = store.record_outcomes(facts, "sync")
    if facts:
        crm, account = facts[0].crm, facts[0].account_id
        erased = erased_since(redis, crm, account, sorted({fact.lead_id for fact in facts}), read_at)
        if erased:
            erase(store, redis, crm, account, sorted(erased), mark_erased=False)
    return new


class SyncError(ValueError):
    """`outcomes sync` cannot tell which account to file outcomes under."""


def sync(settings: Settings, crm: str | None = None, account: str | None = None) -> dict[str, dict]:
    """Read each configured CRM's leads at an outcome, changed since the day before the account's
    first kept score, and keep the new outcomes, filed under the account the credentials reach
    (`account`, given with `crm`, or the one the store knows; checked against the credentials either
    way). An account with no score yet is not read."""
    if account and crm is None:
        raise SyncError(
            "--account needs --crm: a HubSpot portal id and a Salesforce org id are not interchangeable"
        )
    store = Store(settings.database_url).require_schema()
    redis = settings_redis(settings)
    report: dict[str, dict] = {}
    if crm in (None, "hubspot") and settings.hubspot_configured:
        for portal in [account] if account else _the_account("hubspot", _accounts_in_store(store, "hubspot")):
            if (since := _changed_since(store, "hubspot", portal)) is None:
                report[f"hubspot:{portal}"] = NOT_SCORED
                continue
            _require_reached(settings, "hubspot", portal, account)  # before anything is read and filed
            read_at = redis_now(redis)
            reading = progress(f"reading hubspot:{portal} contacts at an outcome")  # Salesforce: one query
            adapter = HubSpotCRM(settings, portal_id=portal, limiter=shared_limiter(redis, settings, portal))
            found = list(reading(adapter.contacts_at_outcome(since)))
            facts = [LeadFact("hubspot", portal, contact, kind, at) for contact, kind, at in found]
            report[f"hubspot:{portal}"] = {
                "since": since, "leads": len(found), "new_outcomes": _keep(store, redis, facts, read_at),
            }  # fmt: skip
    if crm in (None, "salesforce") and settings.salesforce_configured:
        known = sorted(settings.allowed_org_ids) or _accounts_in_store(store, "salesforce")
        for org in [account] if account else _the_account("salesforce", known):
            org = org[:15]
            if (since := _changed_since(store, "salesforce", org)) is None:
                report[f"salesforce:{org}"] = NOT_SCORED
                continue
            _require_reached(settings, "salesforce", org, account)
            read_at = redis_now(redis)
            converted = SalesforceCRM(settings, org_id=org).converted_leads(since)
            facts = [LeadFact("salesforce", org, lead_id, kind) for lead_id, kind in converted]
            report[f"salesforce:{org}"] = {
                "since": since, "leads": len(converted), "new_outcomes": _keep(store, redis, facts, read_at),
            }  # fmt: skip
    return report
