"""One lead's kept history, as `leadscore history` prints it: every score with what made it, what
changed between one score and the next, and the outcomes and feedback between them.

An admin asked "why was this lead a D on Tuesday and an A today?" answers it here, from the store,
without SQL over JSON columns. Pure; no I/O.
"""

from __future__ import annotations

from datetime import datetime

from workers.store import HISTORY_CUT, as_utc
from workers.tabular import LLM_FEATURE

# What a score was made with, besides the lead's inputs: a change of one moves scores of every lead.
MADE_WITH = (
    ("scorer", "scorer"), ("model_version", "model"), ("config_version", "rules version"),
    ("config_digest", "rules file"), ("prompt_version", "prompt"), ("reason_version", "reasons"),
)  # fmt: skip


def _when(moment: datetime) -> str:
    return f"{as_utc(moment):%Y-%m-%d %H:%M:%S} UTC"


def _made_with(row: dict) -> dict[str, object]:
    details = row["details"] or {}
    return {
        "scorer": row["scorer"],
        "model_version": row["model_version"],
        **{
            key: details.get(key)
            for key in ("config_version", "config_digest", "prompt_version", "reason_version")
        },
    }


def _inputs(row: dict, with_ages: bool) -> dict[str, object]:
    """The lead's inputs as the score saw them: the fields read, and how long ago its dated moments
    were (`with_ages`: scores kept before their details held these have none to compare)."""
    ages = (row["details"] or {}).get("ages") or {} if with_ages else {}
    features = {name: value for name, value in (row["features"] or {}).items() if name != LLM_FEATURE}
    return {**features, **ages}  # the LLM's answer is said apart, with its confidence


def _llm(row: dict) -> str:
    told = (row["details"] or {}).get("propensity")
    if not told:
        return ""
    if row["fallback"]:
        stood = (
            f"its last answer stood in, {told.get('value'):.2f} at confidence {told.get('confidence'):.2f}"
            if told.get("previous")
            else "neutral prior"
        )
        return f"LLM unanswered ({told.get('error') or 'no reason kept'}): {stood}"
    return f"LLM {told.get('value'):.2f} at confidence {told.get('confidence'):.2f}"


def changes(before: dict, after: dict) -> list[str]:
    """What differs between two kept scores of a lead: its inputs, what scored it, the LLM's answer."""
    said = []
    with_ages = all("ages" in (row["details"] or {}) for row in (before, after))
    old, new = _inputs(before, with_ages), _inputs(after, with_ages)
    for name in sorted(old.keys() | new.keys()):
        if old.get(name) != new.get(name):
            said.append(f"{name} {old.get(name)!r} → {new.get(name)!r}")
    old_made, new_made = _made_with(before), _made_with(after)
    for key, label in MADE_WITH:
        if old_made[key] != new_made[key]:
            said.append(f"{label} {old_made[key]} → {new_made[key]}")
    if (was := _llm(before)) != (now := _llm(after)) and was and now:
        said.append(f"{was} → {now}")
    return said


def history_lines(kept: dict[str, list[dict]]) -> list[str]:
    """Scores, outcomes and feedback of one lead, oldest first, each score with what made it and what
    changed since the one before."""
    events: list[tuple[datetime, int, list[str]]] = []
    previous = None
    for row in kept["scores"]:
        flags = [
            flag
            for flag, on in (
                ("held out: not shown", row["holdout"]),
                ("kept after its write", (row["details"] or {}).get("kept_late")),
                ("put back over an edit in the CRM", (row["details"] or {}).get("put_back")),
                (f"kept of lead {row.get('merged_from')}, merged into this one", row.get("merged_from")),
            )
            if on
        ]
        made = _made_with(row)
        rules = f"rules {made['config_version']} ({made['config_digest'] or 'file not kept'})"
        lines = [
            f"{_when(row['scored_at'])}  score {row['score']} {row['tier']}  {row['scorer']} "
            f"{made['model_version'] or ''}, {rules}" + "".join(f"; {flag}" for flag in flags),
            f"    {row['reason']}",
        ]
        if llm := _llm(row):
            lines.append(f"    {llm}")
        if previous is not None:
            said = changes(previous, row) or [
                "notes or emails the LLM read (not kept)"
                if row["fingerprint"] != previous["fingerprint"]
                else "nothing: scored again for the same inputs (put back, forced, or reasons reworded)"
            ]
            lines.append("    changed: " + "; ".join(said))
        events.append((as_utc(row["scored_at"]), 0, lines))
        previous = row
    for row in kept["outcomes"]:
        said = (
            f"scores kept before {_when(row['reached_at'])} deleted by `db prune`"
            if row["kind"] == HISTORY_CUT
            else f"outcome {row['kind']} ({row['source']}), reached {_when(row['reached_at'])}"
        )
        events.append((as_utc(row["recorded_at"]), 1, [f"{_when(row['recorded_at'])}  {said}"]))
    for row in kept["feedback"]:
        about = f" on {row['score']} {row['tier']}" if row["score"] is not None else ""
        origin = f"; on lead {row['merged_from']}, merged into this one" if row.get("merged_from") else ""
        events.append(
            (
                as_utc(row["recorded_at"]),
                2,
                [f"{_when(row['recorded_at'])}  feedback {row['value']}{about}{origin}"],
            )
        )
    return [line for _, _, lines in sorted(events, key=lambda e: (e[0], e[1])) for line in lines]
