"""Error types shared by every CRM adapter: one class per failure, chosen by status.

The web layer turns a `WebhookError` into its HTTP status and message; callers
decide what to do by the error's class, never by parsing its text.
"""


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


class QueueUnavailable(WebhookError):
    """Redis could not durably take the events; the sender must retry later."""

    status = 503


class CRMError(Exception):
    """A CRM API call failed; subclasses say whether retrying can help."""


class CRMUnavailable(CRMError):
    """The CRM did not answer, or answered 5xx (an outage, maintenance): the same call can succeed
    later, so a batch waits for it rather than spending its retries."""


class LeadGone(CRMError):
    """The lead was deleted, merged away or archived before it could be scored."""


class UserError(Exception):
    """Something the user gave (a file, a flag, a store, a model) cannot be used as given: the CLI
    prints the message, which says what to fix, in one line. Anything else keeps its traceback."""


class TableError(UserError):
    """A data file or mapping that cannot be used as given; the message says what to fix."""


def first_problem(exc) -> str:
    """'at <where>: <what>' for the first error of a pydantic ValidationError."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"at {where}: {first['msg']}"
