"""Decide what to write back; the CRM adapter does the writing.

Nothing is written when the score, tier, reason and provenance already in the
CRM are what we would write — so re-deliveries and our own echoes cost no write.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime


def _same_details(current: str | None, new: str) -> bool:
    if not current:
        return False
    try:
        return json.loads(current) == json.loads(new)
    except json.JSONDecodeError:
        return False


def _same_number(current: str | None, new: str) -> bool:
    if not new:
        return not current  # both blank (a holdout lead)
    try:
        return current is not None and float(current) == float(new)
    except ValueError:
        return False


def _same(key: str, current: str | None, new: str) -> bool:
    if key == "score":
        return _same_number(current, new)
    if key == "details":
        return _same_details(current, new)
    return (current or "").lower() == new.lower() if key == "holdout" else (current or "") == new


def shows(current: dict[str, str], fields: dict[str, str]) -> bool:
    """The CRM already shows these fields' values."""
    return all(_same(key, current.get(key), value) for key, value in fields.items())


def fields_to_write(
    new: dict[str, str],
    current: dict[str, str],
    feedback: str | None = None,
    about: dict[str, str] | None = None,
    now: datetime | None = None,
) -> dict[str, str] | None:
    """The fields to write, or None when the CRM already shows exactly these.

    A rep's `feedback` was about the score and tier leadscore wrote (`about`; what the CRM shows when
    not given): when either changes, it is cleared in the same write, so it never stands beside a score
    it was not about, and the rep can say it again of the new one. A value someone typed over the score
    and leadscore puts back is no change of it."""
    if shows(current, new):
        return None
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    fields = {**new, "scored_at": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    if feedback and not shows(about or current, {key: new[key] for key in ("score", "tier")}):
        fields["feedback"] = ""
    return fields
