"""The worker's shared context and the scoring core both job paths use.

`workers.batch` holds the jobs the pipeline runs (collect, score_batch);
`score_lead` here scores one lead with one read and one write — the unbatched
path, kept for single-lead reruns and as the benchmark's naive baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache

from redis import Redis

from integration import metrics
from integration.errors import LeadGone
from integration.events import LeadEvent
from integration.hubspot.api import HubSpotCRM
from integration.lead import Lead
from integration.queue import redis_from_url
from integration.ratelimit import RateLimiter
from integration.salesforce.api import SalesforceCRM
from integration.settings import Settings, get_settings
from workers.blend import ScoreResult, input_fingerprint
from workers.blend import score_lead as blend_score
from workers.config import ScoringConfig, load_config
from workers.propensity import PropensityReasoner, PropensityResult
from workers.rules import evaluate_rules
from workers.writer import fields_to_write

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One lead's scoring outcome before it is written."""

    lead: Lead
    result: ScoreResult | None  # None: inputs unchanged since the last score, nothing to do
    propensity: PropensityResult | None
    fields: dict[str, str] | None  # what to write; None when the CRM already shows it


@dataclass
class WorkerContext:
    settings: Settings
    config: ScoringConfig
    reasoner: PropensityReasoner

    tally: dict | None = None  # while set, counters are summed here and written once

    @cached_property
    def redis(self) -> Redis:
        return redis_from_url(self.settings.redis_url)

    def telemetry(self, name: str, amount: float = 1, **labels: str) -> None:
        if self.tally is None:
            metrics.incr(self.redis, name, amount, **labels)
            return
        key = (name, tuple(sorted(labels.items())))
        self.tally[key] = self.tally.get(key, 0) + amount

    @contextmanager
    def tallied(self):
        """Count in memory for a batch, then write every counter in one round trip."""
        self.tally = {}
        try:
            yield
        finally:
            tally, self.tally = self.tally, None
            metrics.incr_many(self.redis, [(name, n, dict(labels)) for (name, labels), n in tally.items()])

    def crm(self, crm: str, account: str) -> HubSpotCRM | SalesforceCRM:
        return _hubspot(account) if crm == "hubspot" else salesforce_for(account)

    def crm_for(self, event: LeadEvent) -> HubSpotCRM | SalesforceCRM:
        return self.crm(event.crm, event.account_id)

    def score(self, leads: list[Lead]) -> list[Scored]:
        """Rules, LLM (cached, concurrent) and blend for many leads; skips leads whose inputs
        have not changed since a score that was not a fallback."""
        fingerprints = [input_fingerprint(lead, self.config) for lead in leads]
        fresh = [i for i, lead in enumerate(leads) if not _already_scored(lead, fingerprints[i])]
        answers = self.reasoner.assess_many(
            [leads[i] for i in fresh], [fingerprints[i] for i in fresh], self.redis
        )
        by_index = dict(zip(fresh, answers, strict=True))
        scored = []
        for i, lead in enumerate(leads):
            propensity = by_index.get(i)
            if propensity is None:
                self.telemetry("leads_skipped_unchanged_total", crm=lead.crm)
                scored.append(Scored(lead, None, None, None))
                continue
            self._count_llm(propensity)
            result = blend_score(lead, evaluate_rules(lead, self.config), propensity, self.config)
            scored.append(Scored(lead, result, propensity, fields_to_write(result, lead.current_output)))
            self.telemetry("leads_scored_total", crm=lead.crm)
        return scored

    def _count_llm(self, propensity: PropensityResult) -> None:
        if propensity.extra.get("cached"):
            self.telemetry("llm_cache_hits_total")
        elif propensity.fallback:
            self.telemetry("llm_calls_total", outcome="fallback")
            reason = (propensity.error or "unknown").split(":")[0]
            self.telemetry("llm_fallbacks_total", reason=reason)
        else:
            self.telemetry("llm_calls_total", outcome="ok")


def _already_scored(lead: Lead, fingerprint: str) -> bool:
    """The CRM already holds a score for exactly these inputs, and it was not a fallback."""
    try:
        details = json.loads(lead.current_output.get("details") or "{}")
    except json.JSONDecodeError:
        return False
    shown = all(lead.current_output.get(key) for key in ("score", "tier", "reason"))
    return shown and details.get("fingerprint") == fingerprint and details.get("fallback") is False


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    """Built once per process; `leadscore worker` builds it before forking work horses."""
    settings = get_settings()
    settings.require_a_crm()
    return WorkerContext(
        settings=settings, config=scoring_config(settings), reasoner=PropensityReasoner(settings)
    )


def scoring_config(settings: Settings) -> ScoringConfig:
    """The config scores are made with; its digest (part of every fingerprint) covers the LLM
    model too, so changing the model neither reuses cached answers nor skips leads."""
    config = load_config(settings.scoring_config_path)
    digest = hashlib.sha256(f"{config.digest}:{settings.llm_model}".encode()).hexdigest()[:16]
    return config.model_copy(update={"digest": digest})


@lru_cache(maxsize=64)
def _hubspot(portal_id: str) -> HubSpotCRM:
    ctx = context()
    limiter = RateLimiter(ctx.redis, f"hubspot:{portal_id}", ctx.settings.hubspot_calls_per_10s)
    return HubSpotCRM(ctx.settings, portal_id=portal_id, limiter=limiter, telemetry=ctx.telemetry)


def salesforce_for(org_id: str) -> SalesforceCRM:
    """One client per org, keyed on the 15-character id that 15- and 18-character forms share."""
    return _salesforce(org_id[:15])


@lru_cache(maxsize=64)
def _salesforce(org_id: str) -> SalesforceCRM:
    ctx = context()
    return SalesforceCRM(ctx.settings, org_id=org_id, telemetry=ctx.telemetry)


def outcome(lead_key: str, name: str, scored: Scored | None = None) -> dict:
    if scored is None or scored.result is None:
        return {"lead": lead_key, "outcome": name}
    return {
        "lead": lead_key,
        "outcome": name,
        "score": scored.result.score,
        "tier": scored.result.tier,
        "reason": scored.result.reason,
        "fallback": scored.propensity.fallback,
    }


def score_lead(event: dict) -> dict:
    """One lead, unbatched: read it, score it, write the score back unless it is unchanged."""
    lead_event = LeadEvent.model_validate(event)
    ctx = context()
    crm = ctx.crm_for(lead_event)
    try:
        lead = crm.read_lead(lead_event.lead_id)
    except LeadGone as exc:
        log.info("not scored: %s", exc)
        return outcome(lead_event.lead_key, "lead_gone")
    [scored] = ctx.score([lead])
    if scored.fields is None:
        return outcome(lead_event.lead_key, "unchanged", scored)
    try:
        crm.write_scores(lead.lead_id, scored.fields)
    except LeadGone as exc:
        log.info("not written: %s", exc)
        return outcome(lead_event.lead_key, "lead_gone")
    return outcome(lead_event.lead_key, "written", scored)
