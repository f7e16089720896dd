"""RQ job functions (module-level, importable by dotted path) and their shared context."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from rq import get_current_job

from integration.errors import LeadGone
from integration.events import LeadEvent
from integration.hubspot.api import HubSpotCRM
from integration.salesforce.api import SalesforceCRM, WriteRejected
from integration.settings import Settings, get_settings
from workers.blend import score_lead as blend_score
from workers.config import ScoringConfig, load_config
from workers.propensity import PropensityReasoner
from workers.rules import evaluate_rules
from workers.writer import fields_to_write

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    config: ScoringConfig
    reasoner: PropensityReasoner

    def crm_for(self, event: LeadEvent) -> HubSpotCRM | SalesforceCRM:
        if event.crm == "hubspot":
            return _hubspot(event.account_id)
        return salesforce_for(event.account_id)


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    """Built once per process; `leadscore worker` builds it before forking work horses."""
    settings = get_settings()
    settings.require_a_crm()
    return WorkerContext(
        settings=settings,
        config=load_config(settings.scoring_config_path),
        reasoner=PropensityReasoner(settings),
    )


@lru_cache(maxsize=64)
def _hubspot(portal_id: str) -> HubSpotCRM:
    return HubSpotCRM(context().settings, portal_id=portal_id)


def salesforce_for(org_id: str) -> SalesforceCRM:
    """One client per org, keyed on the 15-character id that 15- and 18-character forms share."""
    return _salesforce(org_id[:15])


@lru_cache(maxsize=64)
def _salesforce(org_id: str) -> SalesforceCRM:
    return SalesforceCRM(context().settings, org_id=org_id)


def score_lead(event: dict) -> dict:
    """Read the lead, score it, write the score back unless it is unchanged."""
    lead_event = LeadEvent.model_validate(event)
    ctx = context()
    crm = ctx.crm_for(lead_event)
    try:
        lead = crm.read_lead(lead_event.lead_id)
    except LeadGone as exc:
        log.info("not scored: %s", exc)
        return {"lead": lead_event.lead_key, "outcome": "lead_gone"}

    propensity = ctx.reasoner.assess(lead)
    result = blend_score(lead, evaluate_rules(lead, ctx.config), propensity, ctx.config)
    fields = fields_to_write(result, lead.current_output)
    outcome = "unchanged"
    if fields is not None:
        try:
            crm.write_scores(lead.lead_id, fields)
        except LeadGone as exc:
            log.info("not written: %s", exc)
            return {"lead": lead_event.lead_key, "outcome": "lead_gone"}
        except WriteRejected as exc:
            job = get_current_job()
            if exc.permanent and job is not None:
                job.retries_left = 0  # the same write would be refused again: dead-letter it now
            raise
        outcome = "written"
    log.info(
        "scored %s: %s %s (%s) %s",
        lead_event.lead_key, result.score, result.tier, outcome, result.reason,
    )  # fmt: skip
    return {
        "lead": lead_event.lead_key,
        "outcome": outcome,
        "score": result.score,
        "tier": result.tier,
        "reason": result.reason,
        "fallback": propensity.fallback,
    }
