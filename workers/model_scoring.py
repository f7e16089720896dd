"""Score, tier and two-second reason from a trained model. No I/O.

The reason names the one or two features that pushed this lead's score most in the direction
it went (per-lead contributions), e.g. "Status: Will revert after reading the email; Rating:
High in Relevance" — at most 90 characters, like the rules' reasons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import pandas as pd

from workers.blend import ScoreResult, join_reason
from workers.config import ScoringConfig, Tiers, value_key
from workers.model import TrainedModel, score_of

FEATURE_LABELS = {
    "source": "Source",
    "source_detail": "Origin",
    "status": "Status",
    "stage": "Stage",
    "rating": "Rating",
    "title": "Role",
    "company_size": "Company size",
    "industry": "Industry",
    "recent_conversion": "Last form",
    "has_email": "Email",
    "has_phone": "Phone",
    "email_bad": "Bad email",
    "email_opted_out": "Email opt-out",
    "do_not_call": "Do not call",
    "conversions": "Form fills",
    "visits": "Visits",
    "page_views": "Page views",
    "llm_propensity": "AI",
}
DEFAULT_MODEL_TIERS = Tiers(A=80, B=50, C=20)  # on a calibrated probability x 100


def feature_label(name: str, labels: dict[str, str] | None = None) -> str:
    """How a reason names a feature: the mapping's label, leadscore's own, or the name spaced out."""
    return (labels or {}).get(name) or FEATURE_LABELS.get(name) or name.replace("_", " ").capitalize()


def value_labels(config: ScoringConfig | None) -> dict[str, dict[str, str]]:
    """The scoring config's readable labels for the values of the features the rules read, by
    feature: what the rules' reasons already call them ("In progress", "MQL", "Paid social")."""
    if config is None:
        return {}
    ss = config.source_stage

    def labels(table: dict) -> dict[str, str]:
        return {value: rule.label for value, rule in table.items()}

    stages = labels(ss.stages)  # a lead with no stage is read by its rating
    return {"source": labels(ss.sources), "status": labels(ss.statuses), "stage": stages, "rating": stages}


AI_FEATURE = "llm_propensity"
AI_LIKELY, AI_UNLIKELY = 0.6, 0.4


def _ai_phrase(value: object) -> str:
    """The LLM's propensity as a rep reads it: likely, unlikely or unsure to convert."""
    if not isinstance(value, int | float) or math.isnan(value):
        return "AI: no answer"
    return "AI: likely" if value >= AI_LIKELY else "AI: unlikely" if value <= AI_UNLIKELY else "AI: unsure"


def _shown(value: object, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not set"
    if kind == "boolean":
        return "yes" if value else "no"
    if kind == "numeric":
        number = float(value)
        return f"{number:,.0f}" if number.is_integer() or abs(number) >= 100 else f"{number:.1f}"
    return str(value)


NO_DRIVER = "No field stands out"
NEGLIGIBLE = 0.0005  # contributions to the log-odds that leadscore_details rounds to 0
NEW_TO_MODEL = " (new to model)"


def model_reason(
    contributions: dict[str, float],
    values: dict[str, object],
    kinds: dict[str, str],
    labels: dict[str, str] | None = None,
    unseen: frozenset[str] = frozenset(),
    readable_values: dict[str, dict[str, str]] | None = None,
) -> str:
    """The strongest one or two drivers in the direction the contributions took the score from the
    model's starting point, in at most 90 characters; never a driver that pushed the other way. A
    value the scoring config labels (`readable_values`, from `value_labels`) is named by its label
    alone, as the rules' reasons name it ("In progress", "MQL"); others as "Feature: value". The
    LLM's propensity reads "AI: likely", "AI: unlikely" or "AI: unsure". A value training never saw
    (`unseen` names its features) says so: the model scored it as unknown, not for what it says."""
    readable_values = readable_values or {}
    sign = 1.0 if sum(contributions.values()) >= 0 else -1.0
    ranked = sorted((n for n in contributions if sign * contributions[n] >= NEGLIGIBLE),
                    key=lambda n: sign * contributions[n], reverse=True)  # fmt: skip
    named: dict[str, list[str]] = {}  # phrase or shown value -> the drivers showing it, strongest first
    alone: set[str] = set()  # phrases that need no feature name
    for n in ranked[:3]:
        value = values.get(n)
        label = readable_values.get(n, {}).get(value_key(value)) if isinstance(value, str) else None
        shown = _ai_phrase(value) if n == AI_FEATURE else label or _shown(value, kinds[n])
        shown += NEW_TO_MODEL if n in unseen else ""
        if shown not in named and len(named) == 2:
            break
        named.setdefault(shown, []).append(feature_label(n, labels))
        if n == AI_FEATURE or label:
            alone.add(shown)
    # Two drivers with one value (Last activity and Last notable activity, say) read as one phrase.
    phrases = [
        shown if shown in alone else f"{' & '.join(names[:2])}: {shown}" for shown, names in named.items()
    ]
    if not phrases:
        return NO_DRIVER
    return join_reason(phrases[0], phrases[1] if len(phrases) > 1 else "")


def tiers_of(model: TrainedModel) -> Tiers:
    return Tiers(**model.meta["tiers"]) if "tiers" in model.meta else DEFAULT_MODEL_TIERS


def score_frame(
    model: TrainedModel,
    frame: pd.DataFrame,
    shown: pd.DataFrame | None = None,
    threads: int = 1,
    unseen: dict[str, pd.Series] | None = None,
    config: ScoringConfig | None = None,
) -> list[ScoreResult]:
    """Score every row of a feature frame (feature name → value) with the model; the reasons show
    `shown`'s values (the same features, categories spelled as the CRM or file spells them).
    `threads` for the per-lead contributions: one in a worker (workers scale by processes), every
    core (0) for a file. `unseen`: `model.unseen(frame)`, when the caller has it already. `config`:
    the scoring config, whose labels name the values of source, status, stage and rating."""
    probabilities, contributions = model.explain(frame, threads)
    tiers = tiers_of(model)
    names = list(model.kinds)
    values = (frame if shown is None else shown).reindex(columns=names).to_dict("records")
    contribution_rows = contributions[names].to_numpy()
    unseen = model.unseen(frame) if unseen is None else unseen
    masks = {name: mask.to_numpy() for name, mask in unseen.items()}
    readable_values = value_labels(config)
    results = []
    for i, (p, row, contribution) in enumerate(zip(probabilities, values, contribution_rows, strict=True)):
        row_contrib = dict(zip(names, contribution.tolist(), strict=True))
        new = frozenset(name for name, mask in masks.items() if mask[i])
        score = int(score_of(p))
        ranked = sorted(row_contrib.items(), key=lambda item: abs(item[1]), reverse=True)
        results.append(
            ScoreResult(
                score=score,
                tier=tiers.tier_for(score),
                reason=model_reason(
                    row_contrib, row, model.kinds, model.meta.get("labels"), new, readable_values
                ),
                details={
                    "scorer": "model",
                    "model": model.version,
                    "probability": round(float(p), 4),
                    "contributions": {name: round(c, 3) for name, c in ranked if round(c, 3)},
                },
            )
        )
    return results


def capped_by_status(
    model: TrainedModel, results: list[ScoreResult], statuses: Iterable[str | None], config: ScoringConfig
) -> list[ScoreResult]:
    """A lead status the scoring config caps (a lead a rep marked unqualified) caps the model's score
    too: a rep's judgement is respected, not overridden. The cap was written on the rules' tiers (25,
    say, keeps a lead in D), so the model's score stays at or below it and in no higher tier than the
    cap allows there: D under the model's tiers as well. Where it binds, the reason is the status, and
    the details keep the model's own score (`capped_from`)."""
    tiers = tiers_of(model)
    out = []
    for result, status in zip(results, statuses, strict=True):
        rule = config.source_stage.status(status)
        if rule is not None and rule.cap is not None:
            ceiling = min(rule.cap, tiers.top_of(config.tiers.tier_for(rule.cap)))
            result = replace(result, details={**result.details, "cap": ceiling})
            if result.score > ceiling:
                details = {**result.details, "capped_from": result.score}
                result = replace(result, score=ceiling, tier=tiers.tier_for(ceiling), reason=rule.label,
                                 details=details)  # fmt: skip
        out.append(result)
    return out
