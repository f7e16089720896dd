"""Error types shared by every CRM adapter: one class per failure, chosen by status.

The web layer turns a `WebhookError` into its HTTP status and message; callers
decide what to do by the error's class, never by parsing its text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from integration.crm import WriteResult


class WebhookError(Exception):
    """A delivery was refused; `status` is what the sender gets back."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SignatureError(WebhookError):
    """The delivery does not prove it came from the CRM (missing, stale or wrong signature)."""

    status = 401


class PayloadError(WebhookError):
    """The body is not the shape the CRM sends; retrying the same body cannot succeed."""

    status = 400


class BodyTooLarge(WebhookError):
    """The body is over MAX_BODY_BYTES; refused before it is read."""

    status = 413

    def __init__(self, limit: int):
        super().__init__(f"body exceeds the {limit}-byte limit (MAX_BODY_BYTES)")


class QueueUnavailable(WebhookError):
    """Redis could not durably take the events; the sender must retry later."""

    status = 503


class RateLimited(Exception):
    """No call may be made for a while: no slot in the shared rate limiter soon enough, HubSpot's daily
    limit, its 429s or locks past every try, a portal moving between data centres, or a Salesforce
    org's API limit (its REQUEST_LIMIT_EXCEEDED, or leadscore's own stop short of the daily budget).
    The job is put off by `retry_after_s`, not failed."""

    def __init__(self, message: str, retry_after_s: float = 60.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.written: list[str] = []  # lead ids a write of several calls had written before it stopped


class CRMError(Exception):
    """A CRM API call failed; subclasses say whether retrying can help."""

    def __init__(self, *args: object):
        super().__init__(*args)
        self.written: list[str] = []  # lead ids a write of several calls had written before it failed


class CRMUnavailable(CRMError):
    """The CRM did not answer, or answered 5xx (an outage, maintenance): the same call can succeed
    later, so a batch waits for it rather than spending its retries."""


class LeadGone(CRMError):
    """The lead was deleted, merged away or archived before it could be scored."""


class WriteRejected(CRMError):
    """The CRM refused one record's write; `code` is its own error code."""

    def __init__(self, crm: str, result: WriteResult):
        super().__init__(f"{crm} refused the write of {result.lead_id}: {result.code}: {result.message}")
        self.result = result

    @property
    def permanent(self) -> bool:
        return self.result.permanent


class WritesRefusedAlike(CRMError):
    """The CRM refused every write of a batch, and for the same reason: a setting of the CRM (a
    property deleted or made read-only, a field's security), not any one lead. The batch fails as
    one, retried as any batch is, rather than as one job a lead, each refused again."""

    def __init__(self, crm: str, results: list[WriteResult]):
        first = results[0]
        super().__init__(
            f"{crm} refused all {len(results)} writes of the batch alike, so the CRM's set-up is at fault, "
            f"not a lead: {first.code}: {first.message} (once fixed, the batch's retry or `leadscore "
            "requeue` scores them)"
        )
        self.results = results


class UserError(Exception):
    """Something the user gave (a file, a flag, a store, a model) cannot be used as given: the CLI
    prints the message, which says what to fix, in one line. Anything else keeps its traceback."""


class TableError(UserError):
    """A data file or mapping that cannot be used as given; the message says what to fix."""


def first_problem(exc, within: int | str | None = None) -> str:
    """'at <where>: <what>' for the first error of a pydantic ValidationError; `within` is where the
    validated value sits in the body (an array index), when it was validated on its own."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in (() if within is None else (within,)) + first["loc"]) or "body"
    return f"at {where}: {first['msg']}"
