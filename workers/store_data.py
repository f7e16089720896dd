"""What the store says, as tables: training rows for `train --from-store`, and the store's part
of the evaluation report (holdout vs scored conversion, rep feedback by tier)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from workers.store import POSITIVE_OUTCOMES, Store, feedback, outcomes, scores
from workers.tabular import LEAD_FIELD_KINDS, LLM_FEATURE, Kind, TableError

LEAD = (scores.c.crm, scores.c.account_id, scores.c.lead_id)


def _latest_scores(connection):
    newest = select(func.max(scores.c.id).label("id")).group_by(*LEAD).subquery()
    return connection.execute(select(scores).join(newest, scores.c.id == newest.c.id)).mappings().all()


def _converted(connection) -> set[tuple[str, str, str]]:
    rows = connection.execute(
        select(outcomes.c.crm, outcomes.c.account_id, outcomes.c.lead_id).where(
            outcomes.c.kind.in_(POSITIVE_OUTCOMES)
        )
    )
    return {tuple(row) for row in rows}


def _kind_of(name: str, values: pd.Series) -> Kind:
    if name in LEAD_FIELD_KINDS:
        return LEAD_FIELD_KINDS[name]
    if name == LLM_FEATURE:
        return "numeric"
    present = values.dropna()
    numeric = pd.to_numeric(present, errors="coerce")
    return "numeric" if len(present) and numeric.notna().all() else "categorical"


def training_rows(
    store: Store, min_age_days: float
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Kind], dict]:
    """Each lead's newest scored inputs, labelled 1 when it reached an outcome, 0 when it has not
    after `min_age_days` (younger leads without an outcome are left out: too early to tell)."""
    cutoff = datetime.now(UTC) - timedelta(days=min_age_days)
    with store.engine.connect() as connection:
        latest = _latest_scores(connection)
        converted = _converted(connection)
    rows, y, times = [], [], []
    for row in latest:
        key = (row["crm"], row["account_id"], row["lead_id"])
        scored_at = row["scored_at"] if row["scored_at"].tzinfo else row["scored_at"].replace(tzinfo=UTC)
        if key in converted:
            y.append(1)
        elif scored_at <= cutoff:
            y.append(0)
        else:
            continue
        rows.append(row["features"])
        times.append(scored_at)
    if not rows:
        raise TableError(
            f"the store has no labelled leads yet: none converted and none scored over {min_age_days:g} days "
            "ago (lower --min-age-days, or run `leadscore outcomes sync`)"
        )
    labels = np.array(y)
    if labels.min() == labels.max():
        raise TableError(f"every labelled lead in the store has outcome {labels[0]}: a model needs both")
    frame = pd.DataFrame(rows)
    kinds = {name: _kind_of(name, frame[name]) for name in frame.columns}
    window = {
        "from": min(times).isoformat(timespec="seconds"),
        "to": max(times).isoformat(timespec="seconds"),
        "min_age_days": min_age_days,
    }
    return frame, labels, kinds, window


def store_summary(store: Store) -> dict:
    with store.engine.connect() as connection:
        latest = _latest_scores(connection)
        converted = _converted(connection)
        said = connection.execute(select(feedback.c.tier, feedback.c.value)).all()
        kept = connection.execute(select(func.count()).select_from(scores)).scalar_one()
    groups: dict[str, dict] = {
        "scored": {"leads": 0, "converted": 0},
        "holdout": {"leads": 0, "converted": 0},
    }
    for row in latest:
        group = groups["holdout" if row["holdout"] else "scored"]
        group["leads"] += 1
        group["converted"] += (row["crm"], row["account_id"], row["lead_id"]) in converted
    for group in groups.values():
        group["rate"] = round(group["converted"] / group["leads"], 4) if group["leads"] else None
    by_tier: dict[str, dict[str, int]] = {}
    for tier, value in said:
        by_tier.setdefault(tier or "(none)", {}).setdefault(value, 0)
        by_tier[tier or "(none)"][value] += 1
    return {
        "scores": kept,
        "leads": len(latest),
        "converted": sum(g["converted"] for g in groups.values()),
        "holdout": groups,
        "feedback": dict(sorted(by_tier.items())),
    }
