"""Decide what to write back; the CRM adapter does the writing.

Nothing is written when the score, tier, reason and provenance already in the
CRM are what we would write — so re-deliveries and our own echoes cost no write.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from workers.blend import ScoreResult

COMPARED = ("score", "tier", "reason")


def _same_details(current: str | None, new: str) -> bool:
    if not current:
        return False
    try:
        return json.loads(current) == json.loads(new)
    except json.JSONDecodeError:
        return False


def _same_number(current: str | None, new: str) -> bool:
    try:
        return current is not None and float(current) == float(new)
    except ValueError:
        return False


def fields_to_write(
    result: ScoreResult, current: dict[str, str], now: datetime | None = None
) -> dict[str, str] | None:
    """The fields to write, or None when the CRM already shows exactly this score."""
    new = result.fields()
    unchanged = (
        _same_number(current.get("score"), new["score"])
        and all(current.get(key) == new[key] for key in COMPARED if key != "score")
        and _same_details(current.get("details"), new["details"])
    )
    if unchanged:
        return None
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    return {**new, "scored_at": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
