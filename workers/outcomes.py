"""`leadscore outcomes sync`: backfill outcomes from the CRM APIs into the score store.

Webhooks bring outcomes as they happen (the worker reads the lead's stage with every score);
this catches up on what happened while leadscore was not listening, or before it existed.
Outcomes are kept once per lead and kind, so running it again only adds what is new.
"""

from __future__ import annotations

from integration.hubspot.api import HubSpotCRM
from integration.salesforce.api import SalesforceCRM
from integration.settings import Settings
from workers.progress import progress
from workers.store import LeadFact, Store, scores


def _accounts_in_store(store: Store, crm: str) -> list[str]:
    from sqlalchemy import select

    with store.engine.connect() as connection:
        return sorted(
            connection.execute(select(scores.c.account_id).where(scores.c.crm == crm).distinct()).scalars()
        )


def _the_account(crm: str, candidates: list[str]) -> list[str]:
    """The one account the configured credentials reach; several would be a guess."""
    if len(candidates) > 1:
        raise SyncError(
            f"{crm}: the store and settings name several accounts ({', '.join(candidates)}) but the "
            f"credentials reach one: say which with --crm {crm} --account ID"
        )
    return candidates


class SyncError(ValueError):
    """`outcomes sync` cannot tell which account to file outcomes under."""


def sync(settings: Settings, crm: str | None = None, accounts: list[str] | None = None) -> dict[str, dict]:
    """Read every lead at an outcome from each configured CRM and keep the new outcomes, filed
    under the account the credentials reach (`accounts`, given with `crm`, or the one known)."""
    if accounts and crm is None:
        raise SyncError(
            "--account needs --crm: a HubSpot portal id and a Salesforce org id are not interchangeable"
        )
    store = Store(settings.database_url).require_schema()
    report: dict[str, dict] = {}
    if crm in (None, "hubspot") and settings.hubspot_configured:
        for portal in accounts or _the_account("hubspot", _accounts_in_store(store, "hubspot")):
            reading = progress(f"reading hubspot:{portal} contacts at an outcome")  # Salesforce: one query
            found = list(reading(HubSpotCRM(settings, portal_id=portal).contacts_at_outcome()))
            facts = [LeadFact("hubspot", portal, contact, kind, at) for contact, kind, at in found]
            report[f"hubspot:{portal}"] = {
                "leads": len(found),
                "new_outcomes": store.record_outcomes(facts, "sync"),
            }
    if crm in (None, "salesforce") and settings.salesforce_configured:
        known = sorted(settings.allowed_org_ids) or _accounts_in_store(store, "salesforce")
        for org in accounts or _the_account("salesforce", known):
            org = org[:15]
            converted = SalesforceCRM(settings, org_id=org).converted_leads()
            facts = [LeadFact("salesforce", org, lead_id, kind) for lead_id, kind in converted]
            report[f"salesforce:{org}"] = {
                "leads": len(converted), "new_outcomes": store.record_outcomes(facts, "sync"),
            }  # fmt: skip
    return report
