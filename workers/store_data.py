"""What the store says, as tables: training rows for `train --from-store`, and the store's part
of the evaluation report (holdout vs scored conversion, rep feedback by tier)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import NamedTuple

import numpy as np
import pandas as pd
from sqlalchemy import and_, func, select

from workers.blend import rules_alone
from workers.config import Tiers
from workers.evaluation import POINTS, PROBABILITY, rate_difference
from workers.store import CLEARED, HISTORY_CUT, POSITIVE_OUTCOMES, Store, as_utc, feedback, outcomes, scores
from workers.tabular import ALWAYS_READ, Kind, TableError, normalise

LeadKey = tuple[str, str, str]


@dataclass
class LeadHistory:
    """One lead's scores in the order they were written, and when it first reached an outcome."""

    scores: list[dict]
    converted_at: datetime | None
    cut: bool = False  # `db prune` deleted some of its scores: its first kept score is not its first

    @property
    def first(self) -> dict:
        return self.scores[0]

    def last_before(self, moment: datetime) -> dict | None:
        """The newest score written before `moment`: what the lead looked like before it converted."""
        before = [row for row in self.scores if row["scored_at"] < moment]
        return before[-1] if before else None

    def last_within(self, window: timedelta) -> dict:
        """The newest score written within `window` of the first: what reps saw while it could convert."""
        end = self.first["scored_at"] + window
        return [row for row in self.scores if row["scored_at"] <= end][-1]


STREAM_ROWS = 10_000  # scores fetched at a time: a year's store does not fit in memory at once


def histories(
    store: Store, features: bool = True, details: bool = False, with_cut: bool = False
) -> Iterator[LeadHistory]:
    """Each lead's history, one lead at a time, streamed in the order of the (crm, account, lead, id)
    index, so memory holds one lead's scores, not the store's. Without `features` the inputs kept
    with each score, most of a row's size, are not read; nor, without `details`, its provenance.
    Leads some of whose scores `db prune` deleted are left out (`with_cut`: marked `cut` instead): their
    first kept score is a later one, showing what reps made of the lead, which would be learned in its
    place."""
    names = ["crm", "account_id", "lead_id", "score", "tier", "scorer", "model_version", "holdout",
             "scored_at", *(["features"] if features else []), *(["details"] if details else [])]  # fmt: skip
    kept = [scores.c[name] for name in names]
    with store.engine.connect() as connection:
        first_outcomes = connection.execute(
            select(outcomes.c.crm, outcomes.c.account_id, outcomes.c.lead_id, func.min(outcomes.c.reached_at))
            .where(outcomes.c.kind.in_(POSITIVE_OUTCOMES))
            .group_by(outcomes.c.crm, outcomes.c.account_id, outcomes.c.lead_id)
        ).all()
        converted = {(crm, account, lead): as_utc(moment) for crm, account, lead, moment in first_outcomes}
        marks = outcomes.alias("marks")  # a prune's HISTORY_CUT, joined on its unique key: no set in memory
        marked = and_(
            marks.c.crm == scores.c.crm, marks.c.account_id == scores.c.account_id,
            marks.c.lead_id == scores.c.lead_id, marks.c.kind == HISTORY_CUT,
        )  # fmt: skip
        query = select(*kept, marks.c.id.is_not(None).label("cut")).select_from(
            scores.outerjoin(marks, marked)
        )
        if not with_cut:
            query = query.where(marks.c.id.is_(None))
        rows = (
            connection.execution_options(stream_results=True, yield_per=STREAM_ROWS)
            .execute(query.order_by(scores.c.crm, scores.c.account_id, scores.c.lead_id, scores.c.id))
            .mappings()
        )
        for key, lead_rows in groupby(rows, key=lambda row: (row["crm"], row["account_id"], row["lead_id"])):
            lead_scores = [{**row, "scored_at": as_utc(row["scored_at"])} for row in lead_rows]
            cut = bool(lead_scores[0].pop("cut"))
            for row in lead_scores[1:]:
                del row["cut"]
            yield LeadHistory(lead_scores, converted.get(key), cut)


FIRST, LAST = "first", "last"  # which of a lead's scores stands for it in training and live evaluation


class Labelled(NamedTuple):
    row: dict  # the score that stands for the lead
    label: int
    days_to_convert: float | None  # from its first score, however late; None if it has not converted


def labelled_scores(
    store: Store, min_age_days: float, snapshot: str = FIRST, features: bool = True, details: bool = False
) -> Iterator[Labelled]:
    """One score a lead, with its outcome, by one rule for both outcomes. Only leads first scored at
    least `min_age_days` ago count: younger ones have not had the time to show either outcome, and
    keeping their conversions but not their non-conversions would inflate every rate. Leads that had
    converted before their first score teach nothing. A lead is converted if it converted within
    `min_age_days` of its first score, the horizon every counted lead has been watched for: counting
    later conversions would give a lead scored a year ago a year to convert and one scored last month
    a month, so newer channels would look worse. At 0 there is no horizon: any conversion so far.

    With `FIRST`, each is represented by its first score: what it looked like when reps chose whom to
    call. Later scores show what reps made of it (a lost lead closed out as unqualified, a converting
    one moved on to a deal), which a model would learn in place of the lead. With `LAST`, the snapshot
    the former release took: its last score before it converted or before its first `min_age_days`
    ended, whichever came first (labelled by the horizon all the same)."""
    window = timedelta(days=min_age_days)
    cutoff = datetime.now(UTC) - window
    for history in histories(store, features, details):
        first_scored, converted = history.first["scored_at"], history.converted_at
        if first_scored > cutoff or (converted is not None and converted <= first_scored):
            continue
        if converted is None:
            days, label = None, 0
        else:
            days = (converted - first_scored) / timedelta(days=1)
            label = int(min_age_days <= 0 or converted <= first_scored + window)
        if snapshot == FIRST:
            row = history.first
        elif converted is not None and converted <= first_scored + window:
            row = history.last_before(converted)
        else:
            row = history.last_within(window)
        yield Labelled(row, label, days)


def time_to_convert(days: list[float], positives: int) -> dict:
    """Of the counted leads that converted, however late: how many did so after the horizon (so count
    as not converted), and the median and 80th percentile of the days from first score to
    conversion, for a team choosing --min-age-days. Only leads first scored that long ago count, so
    conversions slower than the youngest of them are not seen yet."""
    median, p80 = np.percentile(days, [50, 80]).round(1).tolist() if days else (None, None)
    return {"conversions": len(days), "after_horizon": len(days) - positives, "median_days": median,
            "p80_days": p80}  # fmt: skip


def said_of_time_to_convert(timing: dict, min_age_days: float) -> str:
    """`time_to_convert` in words, as `train` prints it and the evaluation report gives it."""
    if not timing["conversions"]:
        return "no conversions yet"
    if min_age_days > 0:
        counted = (
            f"{timing['after_horizon']} of them over {min_age_days:g} days after their first score, "
            "counted as not converted"
        )
    else:
        counted = "every one counted, however late (--min-age-days 0: no fixed horizon)"
    return (
        f"{timing['conversions']} conversions, {counted}; first score to conversion: median "
        f"{timing['median_days']:g} days, 80th percentile {timing['p80_days']:g} days"
    )


LiveScorer = tuple[np.ndarray, np.ndarray, list[str], str]  # labels, score / 100, tiers, scale
WITHOUT_LLM = "without the LLM"


class _Judged(NamedTuple):
    label: int
    score: int
    tier: str
    alone: int | None  # the score without the LLM's part (see `rules_alone`)
    answered: bool  # the LLM's answer is in the score


def live_scorers(
    store: Store, min_age_days: float, tiers: Tiers, snapshot: str = FIRST
) -> tuple[dict[str, LiveScorer], dict[str, int], dict]:
    """The scores the workers wrote (holdout leads' included: kept, though not shown), against the
    outcomes, per scorer and version (the trained model's, or the LLM's). Beside each rules+LLM
    scorer whose LLM answered for some of its leads, the same leads' scores without the LLM's part
    (tiered by `tiers`, today's): what the LLM adds to the rules, measured on one set of leads; and,
    by scorer, how many of its leads' scores keep no blend to take it from, which leaves it out; and
    the leads' `time_to_convert`."""
    grouped: dict[str, list[_Judged]] = {}
    scales: dict[str, str] = {}
    days, positives = [], 0
    for row, label, days_to_convert in labelled_scores(
        store, min_age_days, snapshot, features=False, details=True
    ):
        if days_to_convert is not None:
            days.append(days_to_convert)
        positives += label
        version, details = row["model_version"], row["details"] or {}
        is_model = row["scorer"] == "model"
        name = f"live {version}" if is_model else " ".join(filter(None, ("live", row["scorer"], version)))
        judged = _Judged(
            label, row["score"], row["tier"], rules_alone(details), details.get("fallback") is False
        )
        grouped.setdefault(name, []).append(judged)
        scales[name] = PROBABILITY if is_model else POINTS
    scorers: dict[str, LiveScorer] = {}
    unpaired: dict[str, int] = {}
    for name, rows in sorted(grouped.items()):
        labels = np.array([row.label for row in rows])
        scores = np.array([row.score for row in rows], dtype=float) / 100
        scorers[name] = (labels, scores, [row.tier for row in rows], scales[name])
        alone = [row.alone for row in rows]
        if scales[name] != POINTS or not any(row.answered for row in rows):
            continue
        if None in alone:
            unpaired[name] = alone.count(None)
            continue
        tiered = [tiers.tier_for(score) for score in alone]
        scorers[f"{name} {WITHOUT_LLM}"] = (labels, np.array(alone, dtype=float) / 100, tiered, POINTS)
    return scorers, unpaired, time_to_convert(days, positives)


class TrainingRows(NamedTuple):
    frame: pd.DataFrame
    labels: np.ndarray
    kinds: dict[str, Kind]
    window: dict
    unread: list[str]  # inputs kept with earlier scores that no worker reads now: not learned from
    leads: list[str]  # each row's lead id, as the CRM and its exports spell it
    empty: list[str] = []  # the mapping's [custom] features no kept score has a value for: left out


def training_rows(
    store: Store, min_age_days: float, custom: dict[str, Kind] | None = None, snapshot: str = FIRST
) -> TrainingRows:
    """One row a lead (see `labelled_scores`), normalised as live leads are. The features are what a
    worker reads for every lead (the lead fields, the LLM's propensity) and `custom`, the mapping's
    [custom] kinds, whose CRM properties the model records. Other inputs a score kept (a former
    mapping's custom fields) are left out: live leads would always lack them."""
    rows, y, times, leads, days = [], [], [], [], []
    for row, label, days_to_convert in labelled_scores(store, min_age_days, snapshot):
        rows.append(row["features"])
        y.append(label)
        times.append(row["scored_at"])
        leads.append(row["lead_id"])
        if days_to_convert is not None:
            days.append(days_to_convert)
    if not rows:
        raise TableError(
            "the store has no labelled leads yet: a lead counts, converted or not, once it was first scored "
            f"over {min_age_days:g} days ago (lower --min-age-days, or run `leadscore outcomes sync`)"
        )
    labels = np.array(y)
    timing = time_to_convert(days, int(labels.sum()))
    if labels.min() == labels.max():
        later = f" ({said_of_time_to_convert(timing, min_age_days)})" if timing["after_horizon"] else ""
        raise TableError(
            f"every labelled lead in the store has outcome {labels[0]}{later}: a model needs both"
        )
    raw = pd.DataFrame(rows)
    empty = [name for name in custom or {} if name not in raw or raw[name].isna().all()]
    kinds = {
        **{name: kind for name, kind in ALWAYS_READ.items() if name in raw},
        **{name: kind for name, kind in (custom or {}).items() if name not in empty},
    }
    frame = pd.DataFrame(
        {
            name: [normalise(v, kind) for v in raw[name]] if name in raw else np.nan
            for name, kind in kinds.items()
        }
    )
    window = {
        "from": min(times).isoformat(timespec="seconds"),
        "to": max(times).isoformat(timespec="seconds"),
        "min_age_days": min_age_days,
        "snapshot": snapshot,
        "time_to_convert": timing,
    }
    unread = sorted(set(raw.columns) - set(kinds) - set(empty))
    return TrainingRows(frame, labels, kinds, window, unread, leads, empty)


def store_summary(store: Store, min_age_days: float = 0.0) -> dict:
    """Conversion of leads reps saw a score for beside the holdout's (membership and outcomes
    counted from each lead's first score on) and the difference, and rep feedback by the tier shown.

    Only leads that could have landed in either group are compared: in each account, those first
    scored while the holdout ran (from its first lead to its last), so switching HOLDOUT_SHARE on
    after leadscore had run (or off) leaves the other leads, older or newer than any held out, out
    of the comparison; they are counted as `outside_holdout`. Of those, only leads first scored at
    least `min_age_days` ago: the newest have had no time to convert, and counting them would shrink
    the difference; they are counted as `waiting`. Nor are leads that had converted before their
    first score (a customer scored when leadscore was switched on): no score could change them; they
    are counted as `converted_before`.

    Feedback: the latest on each lead for each score shown, so a changed mind counts once."""
    groups = {
        name: {"leads": 0, "converted": 0, "waiting": 0, "converted_before": 0, "outside_holdout": 0}
        for name in ("scored", "holdout")
    }
    totals = {"scores": 0, "leads": 0, "converted": 0, "history_cut": 0}
    mature = datetime.now(UTC) - timedelta(days=min_age_days)
    ran = _holdout_runs(histories(store, features=False))  # a first pass: the runs bound the second
    held_out = set()
    for history in histories(store, features=False, with_cut=True):
        first_score = history.first
        converted = history.converted_at is not None and history.converted_at > first_score["scored_at"]
        totals["scores"] += len(history.scores)
        totals["leads"] += 1
        totals["converted"] += converted and not history.cut
        if history.scores[-1]["holdout"]:
            held_out.add((first_score["crm"], first_score["account_id"], first_score["lead_id"]))
        if history.cut:  # counted, but compared from a first score it no longer has: not compared
            totals["history_cut"] += 1
            continue
        group = groups["holdout" if first_score["holdout"] else "scored"]
        start, end = ran.get((first_score["crm"], first_score["account_id"]), (None, None))
        if start is None or not start <= first_score["scored_at"] <= end:
            group["outside_holdout"] += 1
        elif history.converted_at is not None and not converted:
            group["converted_before"] += 1
        elif first_score["scored_at"] > mature:
            group["waiting"] += 1
        else:
            group["leads"] += 1
            group["converted"] += converted
    for group in groups.values():
        group["rate"] = round(group["converted"] / group["leads"], 4) if group["leads"] else None
    scored, held = groups["scored"], groups["holdout"]
    return {
        **totals,
        "min_age_days": min_age_days,
        "holdout": groups,
        "shown_minus_holdout": rate_difference(
            scored["converted"], scored["leads"], held["converted"], held["leads"]
        ),
        "feedback": _feedback_by_tier(store, held_out),
    }


def _holdout_runs(every: Iterator[LeadHistory]) -> dict[tuple[str, str], tuple[datetime, datetime]]:
    """Per account (crm, account id), when its first and its last held-out lead were first scored."""
    runs: dict[tuple[str, str], tuple[datetime, datetime]] = {}
    for history in every:
        first_score = history.first
        if first_score["holdout"]:
            account, moment = (first_score["crm"], first_score["account_id"]), first_score["scored_at"]
            start, end = runs.get(account, (moment, moment))
            runs[account] = (min(start, moment), max(end, moment))
    return runs


def _feedback_by_tier(store: Store, held_out: set[LeadKey]) -> dict[str, dict[str, int]]:
    """Counts of each feedback value by the tier the rep saw. Feedback given where no tier showed is
    told apart: on a lead held out (its latest score), or on one not scored yet."""
    with store.engine.connect() as connection:
        said = connection.execute(
            select(feedback.c.crm, feedback.c.account_id, feedback.c.lead_id, feedback.c.fingerprint,
                   feedback.c.score, feedback.c.tier, feedback.c.value).order_by(feedback.c.id)
        ).all()  # fmt: skip
    # The latest on each score the rep saw, as they saw it: the same inputs can show another score (a
    # fallback then the LLM's, a lead moved into the holdout), and a clear there takes nothing back here.
    latest = {(*row[:3], row.score, row.tier): (tuple(row[:3]), row.tier, row.value) for row in said}
    by_tier: dict[str, dict[str, int]] = {}
    for lead, tier, value in latest.values():
        if value == CLEARED:
            continue
        shown = tier or ("(held out)" if lead in held_out else "(not scored yet)")
        counts = by_tier.setdefault(shown, {})
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(by_tier.items()))
