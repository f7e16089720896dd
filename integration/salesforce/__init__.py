"""Salesforce adapter: Outbound Messages and signed change events in, Lead fields out."""

import re

BATCH_LIMIT = 200  # records an sObject Collections call takes, and ids a SOQL `IN` is given
OUTPUT_FIELDS = {
    "score": "Leadscore_Score__c",
    "tier": "Leadscore_Tier__c",
    "reason": "Leadscore_Reason__c",
    "scored_at": "Leadscore_Scored_At__c",
    "details": "Leadscore_Details__c",
    "holdout": "Leadscore_Holdout__c",  # written only while HOLDOUT_SHARE > 0
}
FEEDBACK_FIELD = "Leadscore_Feedback__c"  # set by reps: too_high, too_low, right
# What a write may carry: the feedback only to clear it, when the score it was about changes.
WRITTEN_FIELDS = {**OUTPUT_FIELDS, "feedback": FEEDBACK_FIELD}
_RECORD_ID = re.compile(r"[a-zA-Z0-9]{15}(?:[A-Z0-5]{3})?")
_ORG_ID = re.compile(r"00D[a-zA-Z0-9]{12}(?:[A-Z0-5]{3})?")
_SUFFIX_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def id_suffix(base: str) -> str:
    """The three characters Salesforce appends to a 15-character id, which say which of its
    characters are upper case (so the 18-character form survives case-insensitive systems)."""
    return "".join(
        _SUFFIX_CHARS[sum(1 << i for i, ch in enumerate(base[start : start + 5]) if ch.isupper())]
        for start in (0, 5, 10)
    )


def _checks_out(value: str) -> bool:
    return len(value) == 15 or value[15:] == id_suffix(value[:15])


def is_org_id(value: str) -> bool:
    return bool(_ORG_ID.fullmatch(value)) and _checks_out(value)


def is_record_id(value: str) -> bool:
    return bool(_RECORD_ID.fullmatch(value)) and _checks_out(value)  # `$` alone lets a newline through


def full_id(value: str) -> str:
    """A checked id in its 18-character form, so a record or org is keyed one way whichever form
    an event gave."""
    return value[:15] + id_suffix(value[:15])


# Salesforce stamps these on every change, ours included; alone they are no reason to rescore.
SYSTEM_FIELDS = frozenset({"LastModifiedDate", "LastModifiedById", "SystemModstamp", "LastReferencedDate"})
# The Lead picklists the scoring config's tables look values up from (a Lead's Rating is its stage).
SCORED_PICKLISTS = {"LeadSource": "source", "Status": "status", "Rating": "stage"}
