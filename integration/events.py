"""The one event model every CRM adapter normalises into."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from integration.lead import lead_key

CRM = Literal["hubspot", "salesforce"]
# A deal (HubSpot) or opportunity (Salesforce) whose stage changed is queued under a key of its own,
# since its id is no lead's: the worker reads whether it is won, an outcome for its leads.
DEAL_KEY_PREFIX = "deal:"
# The kind of a lead queued by `leadscore rescore` rather than by a CRM event: it has no webhook whose
# latency its score could be measured from.
RESCORE = "rescore"
# With RESCORE, from `leadscore rescore --force`: the lead is scored whatever the CRM shows for its
# inputs, and written where the score, tier or reason shown differ (a bad deploy wrote wrong ones).
FORCED = "forced"
# The kind of a lead the CRM deleted for privacy (HubSpot's GDPR delete): its data is erased, not scored.
ERASE = "erase"
MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31, the last instant a datetime holds: the bound on a CRM's time


def deal_key(deal_id: str) -> str:
    return f"{DEAL_KEY_PREFIX}{deal_id}"


def deal_of(key: str) -> str | None:
    """The deal or opportunity id a queued key stands for, or None for a lead."""
    return key.removeprefix(DEAL_KEY_PREFIX) if key.startswith(DEAL_KEY_PREFIX) else None


class LeadEvent(BaseModel):
    """A lead that needs (re)scoring, and the CRM events that said so."""

    model_config = ConfigDict(frozen=True)

    crm: CRM
    account_id: str = Field(description="HubSpot portal id or Salesforce org id")
    lead_id: str
    event_ids: tuple[str, ...]
    kinds: tuple[str, ...] = Field(description="normalised kinds, e.g. creation, property_change")
    changed_fields: tuple[str, ...] = ()
    occurred_at: datetime
    accepted_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="when leadscore took the delivery in: the collector sets it from the intake "
        "(unpack_intake); the default, now, only serves events built by hand (benchmarks, tests)",
    )
    rescores: int = Field(0, ge=0, description="times scored again because the LLM had failed on the lead")
    throttled_rescores: int = Field(0, ge=0, description="times scored again because the LLM asked to wait")
    handoff: int | None = Field(
        None, description="the number of the hand-off that put it in a batch (pending.take_batch)"
    )

    @property
    def lead_key(self) -> str:
        return lead_key(self.crm, self.account_id, self.lead_id)

    def merged_with(self, other: LeadEvent) -> LeadEvent:
        """One event for the same lead standing for both; newest occurrence wins."""
        if other.lead_key != self.lead_key:
            raise ValueError(f"cannot merge events of {self.lead_key} and {other.lead_key}")
        return self.model_copy(
            update={
                "event_ids": _union(self.event_ids, other.event_ids),
                "kinds": _union(self.kinds, other.kinds),
                "changed_fields": _union(self.changed_fields, other.changed_fields),
                "occurred_at": max(self.occurred_at, other.occurred_at),
            }
        )


def coalesce(events: list[LeadEvent]) -> list[LeadEvent]:
    """One event per lead, in order of each lead's first appearance."""
    by_lead: dict[str, LeadEvent] = {}
    for event in events:
        known = by_lead.get(event.lead_key)
        by_lead[event.lead_key] = event if known is None else known.merged_with(event)
    return list(by_lead.values())


def _union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(first + second))


def dump_events(events: list[LeadEvent]) -> list[str]:
    """Each event's JSON, as queued jobs and the pending store carry them."""
    return [e.model_dump_json() for e in events]


def parse_events(raw: list[str] | list[bytes]) -> list[LeadEvent]:
    return [LeadEvent.model_validate_json(r) for r in raw]


class IntakeRow(NamedTuple):
    """One event to score, as the web queues it: a LeadEvent with nothing repeated or derived.

    A delivery's rows travel as one compact JSON entry (`pack_intake`); the collector turns
    them back into LeadEvents (`unpack_intake`). Building a pydantic model per event would
    cost the web more than everything else it does for a delivery.
    """

    account_id: str
    lead_id: str
    event_id: str
    kind: str
    changed_fields: tuple[str, ...]
    occurred_at_ms: int


def pack_intake(rows: list[IntakeRow], accepted_at: float) -> str:
    return json.dumps([accepted_at, rows], separators=(",", ":"))


def unpack_intake(crm: CRM, raw: str | bytes) -> list[LeadEvent]:
    accepted_at, rows = json.loads(raw)
    accepted = datetime.fromtimestamp(accepted_at, tz=UTC)
    return [
        LeadEvent(
            crm=crm,
            account_id=row.account_id,
            lead_id=row.lead_id,
            event_ids=(row.event_id,),
            kinds=(row.kind,),
            changed_fields=tuple(row.changed_fields),
            occurred_at=datetime.fromtimestamp(row.occurred_at_ms / 1000, tz=UTC),
            accepted_at=accepted,
        )
        for row in map(IntakeRow._make, rows)
    ]
