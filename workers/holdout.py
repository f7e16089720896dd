"""The randomised holdout: a stable share of leads whose score reps do not see.

Propensity is not uplift: only by comparing leads reps saw a score for with leads they did
not can a team see what the score changes. Membership is a hash of the lead, so it never
flips between scorings and needs no state. Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import json

from workers.blend import ScoreResult

# What a held-out lead shows instead of a score: a deliberate blank, not a lead that failed or is
# not scored yet, and to be worked as if leadscore were not there (so the comparison holds).
HOLDOUT_REASON = "Held out: no score on purpose; work it as you normally would"
# What a held-out lead's details keep: enough for the next event to see nothing changed (so it is not
# scored again) and for anyone to see which scorer, model and rules judged it.
PROVENANCE_KEPT = (
    "fingerprint", "fallback", "scorer", "model", "config_version", "config_digest", "prompt_version",
    "reason_version", "ages",
)  # fmt: skip


def in_holdout(lead_key: str, share: float) -> bool:
    if share <= 0:
        return False
    digest = hashlib.sha256(f"leadscore-holdout:{lead_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def shown_fields(result: ScoreResult, holdout: bool, write_flag: bool) -> dict[str, str]:
    """What the CRM shows: the score, or for a holdout lead a blank score and tier, a reason saying the
    blank is on purpose, and details saying why.
    `write_flag`: also set the holdout flag (while a holdout runs, or to clear it once it stops)."""
    if not holdout:
        fields = result.fields()
    else:
        details = {key: result.details[key] for key in PROVENANCE_KEPT if key in result.details}
        details["holdout"] = True
        fields = {"score": "", "tier": "", "reason": HOLDOUT_REASON,
                  "details": json.dumps(details, sort_keys=True, separators=(",", ":"))}  # fmt: skip
    if write_flag:
        fields["holdout"] = "true" if holdout else "false"
    return fields
