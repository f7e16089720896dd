"""What every CRM adapter offers the scoring job, and the write outcome and setup report they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from integration.errors import LeadGone, WriteRejected
from integration.lead import Lead


def same_account(one: str, other: str) -> bool:
    """Whether two account ids name one account: a Salesforce org id's 15 characters name it, in its
    15- or 18-character form; a HubSpot portal id is shorter, so whole."""
    return one[:15] == other[:15]


@dataclass(frozen=True)
class WriteResult:
    """One record's outcome in a batched write, in the CRM's own words."""

    lead_id: str
    ok: bool
    code: str = ""
    message: str = ""
    permanent: bool = False  # retrying the same write cannot succeed
    gone: bool = False  # the record was deleted or converted meanwhile


@dataclass
class SetupReport:
    """What `leadscore setup` created in the CRM, what was there already, and what it brought up to
    date (Salesforce fields given the help text reps see)."""

    created: list[str]
    existing: list[str]
    updated: list[str] = field(default_factory=list)


class CRMAdapter(Protocol):
    crm: str
    account_id: str  # the portal or org, as its leads (and the store) name it

    def read_leads(self, lead_ids: list[str]) -> dict[str, Lead]:
        """The leads that still exist, by the ids asked for; one or few API calls."""

    def write_many(self, writes: list[tuple[str, dict[str, str]]]) -> list[WriteResult]:
        """Write score fields to many leads in as few calls as the CRM allows."""

    def won_deal_leads(self, deal_ids: list[str]) -> dict[str, tuple[datetime | None, list[str]]]:
        """Of these deals (opportunities), the won ones, by the ids asked for: when each was won, where
        the CRM says, and the leads it is an outcome for."""

    def merged_into(self, lead_ids: list[str]) -> dict[str, str]:
        """Of these leads, read as gone, the ones merged into another: the lead that remains, by the
        id asked for (a CRM that names the merged ids on the one that remains answers none)."""


def write_one(adapter: CRMAdapter, record: str, lead_id: str, fields: dict[str, str]) -> None:
    """One lead's write, through the batched write; `record` names it in the error ("HubSpot contact")."""
    [result] = adapter.write_many([(lead_id, fields)])
    if result.ok:
        return
    if result.gone:
        raise LeadGone(f"{record} {lead_id} can no longer be written: {result.code}")
    raise WriteRejected(adapter.crm, result)
