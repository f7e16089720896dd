"""Blend rules and propensity into a score, a tier and a two-second reason. No I/O."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, replace
from datetime import datetime

from integration.lead import Lead
from workers.config import ScoringConfig
from workers.propensity import NEUTRAL, PROMPT_VERSION, PropensityResult, ages, timeless_inputs
from workers.rules import COMPONENTS, RulesResult

MAX_REASON_CHARS = 90
PROPENSITY = "propensity"


@dataclass(frozen=True)
class ScoreResult:
    score: int
    tier: str
    reason: str
    details: dict

    def fields(self) -> dict[str, str]:
        """The CRM-neutral output fields, as text (what CRMs hand back on read)."""
        return {
            "score": str(self.score),
            "tier": self.tier,
            "reason": self.reason,
            # As written: an admin reads a Japanese AI reason as Japanese, not as \u escapes.
            "details": json.dumps(self.details, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        }


def blend_weights(config: ScoringConfig) -> dict[str, float]:
    """Rules weights renormalised to sum to 1, with the propensity share carved proportionally."""
    share = config.blend.propensity_weight
    weights = {name: w * (1 - share) for name, w in config.weights.normalised().items()}
    weights[PROPENSITY] = share
    return weights


def effective_propensity(propensity: PropensityResult) -> float:
    """Shrink toward neutral by confidence: an unsure LLM cannot move the ranking much."""
    return NEUTRAL + propensity.confidence * (propensity.propensity - NEUTRAL)


def input_fingerprint(lead: Lead, config: ScoringConfig, now: datetime) -> str:
    """What the score depends on, as of `now`: a lead's dated moments count by how long ago they were."""
    payload = {"lead": timeless_inputs(lead), "ages": ages(lead, now), "config": config.digest,
               "prompt": PROMPT_VERSION}  # fmt: skip
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


# A cut backs up to a space at most this far. Further back, the text is Chinese, Japanese or Thai,
# written without spaces, or one very long word: cutting there would throw most of the room away.
MAX_WORD_CUT = 20
_ZWJ = "\u200d"


def _regional_indicator(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _splits_a_character(text: str, at: int) -> bool:
    """Whether cutting before text[at] parts what a reader sees as one character: an accent typed
    after its letter, an emoji's skin tone or style, the halves of a joined emoji (👩‍💻), a flag's
    two letters (🇯🇵) or a region's tags (🏴 of Scotland)."""
    after = text[at]
    if _regional_indicator(after):  # flags pair them from the left: an odd one before is a half
        first = at
        while first > 0 and _regional_indicator(text[first - 1]):
            first -= 1
        return (at - first) % 2 == 1
    return (
        unicodedata.category(after).startswith("M")
        or after == _ZWJ
        or text[at - 1] == _ZWJ
        or "\ufe00" <= after <= "\ufe0f"
        or "\U0001f3fb" <= after <= "\U0001f3ff"
        or ord(after) in _TAGS
    )


def clip_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    end = limit - 1
    space = text.rfind(" ", 0, end + 1)
    if space > 0 and end - space <= MAX_WORD_CUT:
        end = space
    while end > 0 and _splits_a_character(text, end):
        end -= 1
    return text[:end].rstrip(" ,;:-") + "…"


MAX_TITLE_IN_REASON = 34
NO_TITLE = "No job title"


def _where(lead: Lead, rules: RulesResult) -> str:
    """The company, as the rules see it: "100-500-person SaaS", or its name where no industry matched."""
    labels = rules.role_fit.labels
    size, industry = labels.get("size"), labels.get("industry")
    where = industry or (lead.company or "").strip()
    if size:
        people = f"{size} person" if size.endswith("+") else f"{size}-person"  # HubSpot's "1000+"
        where = f"{people} {where or 'company'}"
    return where


def _title(lead: Lead) -> str:
    """The title on one line; none where it has no letter or digit ("-", "." or "@" from an import)."""
    title = " ".join((lead.title or "").split())
    return title if any(char.isalnum() for char in title) else ""


def _who(lead: Lead, rules: RulesResult) -> str:
    """Who the lead is, e.g. 'VP of Sales at 100-500-person SaaS'; seniority when the title is long."""
    labels = {**rules.seniority.labels, **rules.role_fit.labels}
    title = _title(lead)
    if not title:
        who = NO_TITLE
    else:
        who = title if len(title) <= MAX_TITLE_IN_REASON else labels.get("seniority") or "Contact"
    if who == "Staff" and labels.get("function"):
        who = f"{labels['function'].capitalize()} staff"
    where = _where(lead, rules)
    return f"{who} at {where}" if where else who


def _seniority(lead: Lead, rules: RulesResult, pushed_up: bool = False) -> str:
    """Seniority on its own, where role fit pushed the other way: the level the rules gave the title
    ("Staff-level title"; the title itself where it pushed the score up and fits), "No job title",
    or a title the rules could not rank."""
    title, level = _title(lead), rules.seniority.labels.get("seniority")
    if not title:
        return NO_TITLE
    if level is None:
        return "Seniority unknown"
    if (pushed_up and len(title) <= MAX_TITLE_IN_REASON) or title.lower() == level.lower():
        return title
    return f"{level} title" if level.lower().endswith("level") else f"{level}-level title"


def _role_fit(lead: Lead, rules: RulesResult, short: bool = False) -> str:
    """Role fit on its own, where seniority pushed the other way: the function the title names and
    the company, e.g. "Sales role at 50-100-person SaaS" ("HR role", short)."""
    function, where = rules.role_fit.labels.get("function"), _where(lead, rules)
    role = f"{function[0].upper()}{function[1:]} role" if function else ""
    if short and role:
        return role
    if role and where:
        return f"{role} at {where}"
    return role or where or "Unknown role and company"


def _phrases(
    lead: Lead, rules: RulesResult, capped: bool, contributions: dict[str, float]
) -> tuple[dict[str, str], dict[str, str]]:
    """A phrase for each rules driver that could explain this lead's score, and a short one for
    where the AI's reason comes first. Seniority and role fit share "who the lead is" unless they
    pushed opposite ways; then each says only its own part."""
    source_stage = rules.source_stage.labels["status"] if capped else _source_stage_phrase(lead, rules)
    reach = rules.reachability.labels["reach"]
    if contributions["seniority"] * contributions["role_fit"] < 0:
        seniority = _seniority(lead, rules, pushed_up=contributions["seniority"] > 0)
        role_fit = _role_fit(lead, rules)
    else:
        seniority = role_fit = _who(lead, rules)
    phrases = {
        "source_stage": source_stage, "seniority": seniority, "role_fit": role_fit, "reachability": reach
    }  # fmt: skip
    short = {
        **phrases,
        "seniority": _seniority(lead, rules),
        "role_fit": _role_fit(lead, rules, short=True),
    }
    return phrases, short


MIN_PULL_TO_NAME = 0.03  # a second part that moved the source/stage sub-score less is not named
UNKNOWN_PARTS = {"source": "Unknown source", "status": "No status yet", "stage": "No stage yet"}


def _source_stage_phrase(lead: Lead, rules: RulesResult) -> str:
    """Which of source (or intent), status and stage moved the sub-score furthest from neutral in
    the way it went, and a second that clearly moved it the same way: "Working, Rated hot". A part
    the rules do not list is named by the lead's own value, or as missing."""
    component = rules.source_stage
    pulls = {
        key: round(share * (component.parts[key] - NEUTRAL), 6) for key, share in component.shares.items()
    }
    direction = component.score - NEUTRAL
    ranked = sorted(pulls, key=lambda key: abs(pulls[key]), reverse=True)
    named = [key for key in ranked if pulls[key] * direction > 0] or ranked[:1]
    first, *others = named
    second = next((key for key in others if abs(pulls[key]) >= MIN_PULL_TO_NAME), None)
    own = {"source": lead.source, "status": lead.status, "stage": lead.stage or lead.rating}
    phrases = [
        component.labels.get(key) or own.get(key) or UNKNOWN_PARTS[key] for key in (first, second) if key
    ]
    return ", ".join(phrases)


def _status_cap(lead: Lead, config: ScoringConfig) -> int | None:
    status = config.source_stage.status(lead.status)
    return None if status is None else status.cap


def _ranked(contributions: dict[str, float], names, direction: float) -> list[str]:
    """The drivers that pushed the score the way `direction` goes, strongest first."""
    pushed = [name for name in names if contributions[name] * direction > 0]
    return sorted(pushed, key=lambda name: abs(contributions[name]), reverse=True)


def explain(
    contributions: dict[str, float],
    phrases: dict[str, str],
    ai_reason: str = "",
    capped: bool = False,
    short: dict[str, str] | None = None,
    ai_moved_tier: bool = False,
) -> str:
    """Name the one or two drivers that moved the score most in the way it went from neutral
    (composite − 0.5), in at most 90 characters; never one that pushed the other way, unless none
    pushed the way it went (then the strongest alone).

    The drivers are the rules a rep can check; a status that caps the score comes first. When the
    AI moved the score most, against what the rules say, and the score went its way, the AI decided
    it: its own reason comes first (second, after a capping status), and a rules driver that pushed
    the AI's way takes the room left, in its `short` phrase. When the rules won against such an AI,
    both sides are named: the rules' strongest driver, short, then the AI's doubt, so a tier A lead
    never reads as the AI's "not a buyer" alone, nor one the AI pulled down as the rules' praise alone.
    When the AI agreed with the rules but moved the score most and into another tier
    (`ai_moved_tier`), it comes second, after the rules' strongest driver: the tier is its doing.
    """
    short = short or phrases
    ai = contributions.get(PROPENSITY, 0.0)
    rules_direction = sum(contributions[name] for name in phrases)
    direction = sum(contributions.values())  # composite − 0.5
    ai_most = bool(ai_reason) and abs(ai) > max(abs(contributions[name]) for name in phrases)
    ai_against = ai_most and ai * rules_direction < 0
    ai_phrase = "AI: " + ai_reason.replace(";", ",")  # one driver, not several
    if ai_against and ai * direction > 0 and not capped:
        agreeing = _ranked(contributions, phrases, ai)
        return join_reason(ai_phrase, short[agreeing[0]] if agreeing else "")
    ranked = _ranked(contributions, phrases, direction)
    if not ranked:
        ranked = sorted(phrases, key=lambda name: abs(contributions[name]), reverse=True)[:1]
    if capped:
        ranked = ["source_stage", *(name for name in ranked if name != "source_stage")]
    if ai_against:
        return join_reason(phrases[ranked[0]] if capped else short[ranked[0]], ai_phrase)
    first = phrases[ranked[0]]
    if ai_most and ai_moved_tier and ai * direction > 0:
        fits = len(first) + 2 + len(readable(ai_phrase)) <= MAX_REASON_CHARS  # else the short form
        return join_reason(first if fits else short[ranked[0]], ai_phrase)
    second = next((phrases[name] for name in ranked[1:] if phrases[name] != first), "")
    return join_reason(first, second)


MIN_SECOND_DRIVER_CHARS = 20  # less room than this, and the second driver is left out


def join_reason(first: str, second: str = "") -> str:
    """One or two drivers in at most 90 characters; the second only where it fits readably. Both
    may hold what a prospect typed (a title, a company, the LLM's reading of their notes), so each is
    made `readable`, and the reason never starts as a spreadsheet formula would (=, +, -, @): reps
    export list views to Excel."""
    first, second = readable(first).lstrip("=+-@ "), readable(second)
    if not first:  # all formula characters
        first, second = second.lstrip("=+-@ "), ""
    first = clip_text(first, MAX_REASON_CHARS)
    room = MAX_REASON_CHARS - len(first) - 2
    if not second or room < MIN_SECOND_DRIVER_CHARS:
        return first
    return f"{first}; {clip_text(second, room)}"


# Format characters a word needs: the zero-width non-joiner and joiner (Persian "داده‌ها", 👩‍💻).
_JOINERS = frozenset("\u200c\u200d")
# Invisible, and where they stood no space was: a soft hyphen, zero-width spaces, a byte-order mark,
# and tags, which spell a region after 🏴 (Scotland's flag) and, anywhere else, hidden text.
_UNSEEN = frozenset("\u00ad\u200b\u2060\ufeff")
_TAGS = range(0xE0020, 0xE0080)
_REGION_FLAG = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")


def _as_read(char: str) -> str:
    if unicodedata.category(char)[0] != "C" or char in _JOINERS:
        return char
    return "" if char in _UNSEEN or ord(char) in _TAGS else " "


def readable(text: str) -> str:
    """The text with control and format characters (line breaks, bidi overrides) made spaces and runs
    of spaces made one: a reason is one line that reads left to right. The joiners a word or an
    emoji is spelt with, and a region's flag, are kept; invisible breaks and tags are dropped."""
    parts, start = [], 0
    for flag in _REGION_FLAG.finditer(text):
        parts += ["".join(map(_as_read, text[start : flag.start()])), flag.group()]
        start = flag.end()
    parts.append("".join(map(_as_read, text[start:])))
    return " ".join("".join(parts).split())


# The wording of reasons. A lead whose shown score carries another version is written again at its
# next event or rescore (the LLM answering from its cache, by fingerprint), so reworded reasons reach
# every lead, not only those whose inputs change. Bump it with any change to what reasons say.
REASON_VERSION = "reasons-4"


def with_provenance(
    result: ScoreResult,
    propensity: PropensityResult | None,
    fingerprint: str,
    config: ScoringConfig,
    told_ages: dict[str, str] | None = None,
) -> ScoreResult:
    """A score, of the rules+LLM blend or of a model, with what every written score carries: the score
    and tier shown (so an edit of them in the CRM is seen), the fingerprint the skip check compares
    (`input_fingerprint`, computed once per lead by the caller), how long ago the lead's dated moments
    were as it counted them (`ages`, which the store's inputs lack), the versions and the rules file's
    own hash, and the LLM's part (none for a model that does not ask it)."""
    details = {
        **result.details,
        "score": result.score,
        "tier": result.tier,
        "fingerprint": fingerprint,
        "ages": told_ages or {},
        "config_version": config.version,
        "config_digest": config.file_digest,
        "prompt_version": PROMPT_VERSION,
        "reason_version": REASON_VERSION,
        "fallback": bool(propensity is not None and propensity.fallback),
    }
    if propensity is not None:
        details["propensity"] = propensity_details(propensity)
    return replace(result, details=details)


def propensity_details(propensity: PropensityResult) -> dict:
    """The LLM's part of a score's provenance, as `leadscore_details` and the store keep it."""
    return {
        "value": propensity.propensity,
        "confidence": propensity.confidence,
        "source": propensity.source,
        "model": propensity.model or None,
        "reason": propensity.reason,
        "evidence": list(propensity.evidence),
        **({"error": propensity.error} if propensity.error else {}),
        **({"previous": True} if propensity.previous else {}),  # the last answer, standing in
    }


def blend_score(
    lead: Lead, rules: RulesResult, propensity: PropensityResult, config: ScoringConfig
) -> ScoreResult:
    """The rules+LLM score, tier and reason; what every written score carries besides is added by
    `with_provenance`, as for a model's."""
    weights = blend_weights(config)
    values = {**rules.scores(), PROPENSITY: effective_propensity(propensity)}
    composite = sum(weights[name] * values[name] for name in weights)
    cap = _status_cap(lead, config)
    score = _points(composite, cap)
    contributions = {name: weights[name] * (values[name] - NEUTRAL) for name in weights}
    if propensity.fallback:
        contributions.pop(PROPENSITY)
    details = {
        "composite": round(composite, 4),
        "cap": cap,
        "sub_scores": {name: round(values[name], 4) for name in (*COMPONENTS, PROPENSITY)},
        "weights": {name: round(w, 4) for name, w in weights.items()},
        "model": propensity.model or None,
    }
    phrases, short = _phrases(lead, rules, cap is not None, contributions)
    tier = config.tiers.tier_for(score)
    without_ai = _points(composite - contributions.get(PROPENSITY, 0.0), cap)
    moved_tier = config.tiers.tier_for(without_ai) != tier
    reason = explain(contributions, phrases, propensity.reason, cap is not None, short, moved_tier)
    return ScoreResult(score=score, tier=tier, reason=reason, details=details)


def _points(composite: float, cap: int | None) -> int:
    """A composite in 0-1 as the 0-100 score, held under its status's cap."""
    return max(0, min(100 if cap is None else cap, round(composite * 100)))


def rules_alone(details: dict) -> int | None:
    """The score a rules+LLM blend would have been without the LLM's part, as when the LLM is down,
    from what its details keep; None where they keep no blend (a model's score). The kept figures
    are rounded to four places, so a score whose composite sat within 0.0001 of a half point can
    come out a point off."""
    try:
        weight, value = details["weights"][PROPENSITY], details["sub_scores"][PROPENSITY]
        return _points(details["composite"] - weight * (value - NEUTRAL), details.get("cap"))
    except (KeyError, TypeError):
        return None
