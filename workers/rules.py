"""Rules a sales team can read: seniority, role fit, reachability, source/stage prior.

Pure functions of a `Lead` and a `ScoringConfig`; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from integration.lead import Lead
from integration.text import narrow
from workers.config import KeywordRule, ScoringConfig, keyword_text

# A head count, grouped as any locale groups it: by commas anywhere ("1,200", India's "1,20,000"), or
# by a dot, a space or an apostrophe before each three digits ("1.200", "1 200", "1'200", "1’200");
# a decimal part ("250.0", "1,200.50") is read and dropped.
_NUMBER = re.compile(r"\d(?:\d|,(?=\d))*(?:[.' ’]\d{3}(?!\d))*(?:\.\d+)?")  # a comma between digits
_GROUPING = re.compile(r",|[.' ’](?=\d{3}(?!\d))")


@dataclass(frozen=True)
class Component:
    """One rules sub-score with the words a rep would use for it: `labels` holds, by component,
    seniority: "seniority"; role_fit: "function", "size", "industry"; reachability: "reach";
    source_stage: "source", "intent", "status", "stage" (those found). blend.py reads them by name."""

    score: float
    labels: dict[str, str] = field(default_factory=dict)
    # The score of each part this component averages, known or not (source_stage: source or intent,
    # status, stage), so a reason can say which part moved it.
    parts: dict[str, float] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)  # each part's weight in the component


@dataclass(frozen=True)
class RulesResult:
    seniority: Component
    role_fit: Component
    reachability: Component
    source_stage: Component

    def scores(self) -> dict[str, float]:
        return {name: round(getattr(self, name).score, 4) for name in COMPONENTS}


COMPONENTS = ("seniority", "role_fit", "reachability", "source_stage")


def _first_match(rules: tuple[KeywordRule, ...], text: str | None) -> KeywordRule | None:
    if not text:
        return None
    compared = keyword_text(text)
    return next((rule for rule in rules if rule.pattern.search(compared)), None)


def employee_count(size: str | None) -> int | None:
    """A representative head count from "400", "1,200", "100-500" or "1000+"."""
    if not size:
        return None
    numbers = [int(float(_GROUPING.sub("", n))) for n in _NUMBER.findall(narrow(size))]
    if not numbers:
        return None
    return numbers[0] if len(numbers) == 1 else (numbers[0] + numbers[1]) // 2


def seniority(lead: Lead, config: ScoringConfig) -> Component:
    level = _first_match(config.seniority.levels, lead.title)
    if level is None:
        return Component(config.seniority.unknown)
    return Component(level.score, {"seniority": level.label})


def role_fit(lead: Lead, config: ScoringConfig) -> Component:
    rf = config.role_fit
    labels: dict[str, str] = {}
    function = _first_match(rf.functions, lead.title)
    function_score = rf.unknown_function if function is None else function.score
    if function is not None:
        labels["function"] = function.label

    size_score = rf.unknown_size
    headcount = employee_count(lead.company_size)
    if headcount is not None:
        bands = [band for band in rf.company_sizes if band.min <= headcount]
        if bands:
            size_score = max(bands, key=lambda band: band.min).score
        labels["size"] = lead.company_size.replace(" ", "")

    industry = _first_match(rf.industries, lead.industry)
    industry_score = rf.unknown_industry if industry is None else industry.score
    if industry is not None:
        labels["industry"] = industry.label

    total = rf.function_weight + rf.size_weight + rf.industry_weight
    score = (
        rf.function_weight * function_score
        + rf.size_weight * size_score
        + rf.industry_weight * industry_score
    ) / total if total else 0.0  # fmt: skip
    return Component(score, labels)


def reachability(lead: Lead, config: ScoringConfig) -> Component:
    rc = config.reachability
    email_ok = lead.has_email and not lead.email_bad and not lead.email_opted_out
    engaged = (
        lead.visits >= rc.engaged_min_visits
        or lead.conversions >= rc.engaged_min_conversions
        or bool(lead.last_reply_at)
    )
    score = rc.email * email_ok + rc.phone * lead.has_phone + rc.engaged * engaged
    if not email_ok and not lead.has_phone:
        phrase = (
            "Opted out of email, no phone" if lead.email_opted_out
            else "Bounced email, no phone" if lead.email_bad
            else "No email or phone"
        )  # fmt: skip
    elif engaged:
        phrase = "Engaged and reachable"
    elif not lead.has_phone:
        phrase = "Email only, no phone"
    elif not email_ok:
        phrase = "Phone only, no usable email"
    elif lead.engagement_known:
        phrase = "Reachable, not engaged yet"
    else:  # the CRM cannot tell: a rep may well have spoken to them
        phrase = "Email and phone on file"
    return Component(min(score, 1.0), {"reach": phrase})


def source_stage(lead: Lead, config: ScoringConfig) -> Component:
    ss = config.source_stage
    total = ss.source_weight + ss.status_weight + ss.stage_weight
    labels: dict[str, str] = {}
    parts: dict[str, float] = {}
    shares: dict[str, float] = {}

    def part(key: str, found, unknown: float, weight: float) -> float:
        if found is not None:
            labels[key] = found.label
        parts[key] = unknown if found is None else found.score
        shares[key] = weight / total if total else 0.0
        return parts[key]

    source_score = part("source", ss.source(lead.source), ss.unknown_source, ss.source_weight)
    intent = _first_match(ss.intents, lead.recent_conversion)
    if intent is not None and intent.score >= source_score:
        del parts["source"], shares["source"]  # the intent is what counts
        source_score = part("intent", intent, ss.unknown_source, ss.source_weight)
    status_score = part("status", ss.status(lead.status), ss.unknown_status, ss.status_weight)
    # Where a lead has no lifecycle stage, its owner's rating is the stage-like signal.
    stage = ss.stage(lead.stage or lead.rating)
    stage_score = part("stage", stage, ss.unknown_stage, ss.stage_weight)
    score = (
        ss.source_weight * source_score + ss.status_weight * status_score
        + ss.stage_weight * stage_score
    ) / total if total else 0.0  # fmt: skip
    return Component(score, labels, parts, shares)


def evaluate_rules(lead: Lead, config: ScoringConfig) -> RulesResult:
    return RulesResult(
        seniority=seniority(lead, config),
        role_fit=role_fit(lead, config),
        reachability=reachability(lead, config),
        source_stage=source_stage(lead, config),
    )
