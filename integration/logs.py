"""Structured JSON logs, one object a line, without secrets, email addresses or phone numbers.

Names, job titles and companies are not masked: a log line about a lead may carry them (an LLM
reply it could not use, a value a model never saw, what a CRM said when it refused a write).

`configure()` gives the root logger one StreamHandler whose JSON lines carry `timestamp` (ISO 8601,
UTC), `level`, `logger`, `message`, any `extra=` fields (event_id, lead_id, job_id, crm, account_id,
...) and `exc_info` for exceptions. Its `RedactingFilter` runs on every record the handler emits:

- `job_id` is set from `rq.get_current_job()` when the record comes from inside an RQ job and the
  caller did not set one.
- The final message (after %-formatting) and every string extra (also inside dicts/lists) are
  redacted (the formatter applies the same to exception and stack texts):
  * email addresses, accented ones too -> `[email]`;
  * phone numbers -> `[phone]`: 9 to 15 digits that either start with `+` (`+1 415 555 0143`,
    `+44 20 7946 0958`, `+14155550143`) or are split into groups by phone-style separators
    (space, `-`, `.`, a parenthesised first group; after a first group starting with the trunk 0, `/`
    too, and a last group of up to 8 digits): `(415) 555-0143`,
    `415-555-0143`, `415.555.0143`, `020 7946 0958`, `0151 23456789`, `030/12345678`. A bare run
    of digits is never a phone, so HubSpot ids (`74300000101`), epoch timestamps (`1795251603`,
    `1795251603.123`), scores and Salesforce ids (`00Q5g00000Ls001EAB`) stay; nor is a phone
    number written as one (`4155550143`). Dates (`2025-01-31 12:00:00`, `11/22/2026`) and dotted
    IPv4 addresses are not phones either. Runs glued to letters, `.` or other digits (or by a `-` to
    a word, as in a UUID) are left alone;
  * `Authorization: <scheme> <credentials>` / `authorization=...`, `Bearer <token>`, `key=value`
    or `"key": "value"` pairs whose key mentions token/secret/password/api_key, OpenAI-style
    `sk-...` keys, HubSpot `pat-...` tokens and the token segment of `/webhooks/salesforce/<token>`
    -> `[redacted]`.
- Any extra whose key contains "token", "secret", "password", "passwd", "api_key", "apikey" or
  "authorization" (any case) becomes `[redacted]` whatever its type; the one exception is a number
  under a key ending in "tokens" (LLM usage counts such as `total_tokens`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, Sized
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from integration.text import WORD_CHAR, narrow

# openai 3 sends through httpx2, which logs each request at INFO, as httpx did: a line a lead.
QUIET_LOGGERS = ("werkzeug", "urllib3", "httpx", "httpcore", "httpx2", "httpcore2", "openai")
SENSITIVE_KEYS = ("token", "secret", "password", "passwd", "api_key", "apikey", "authorization")
REDACTED = "[redacted]"

_STANDARD_ATTRS = frozenset(RESERVED_ATTRS) | {"message", "asctime", "taskName"}
_HANDLER_MARK = "_leadscore_json_handler"
_MAX_DEPTH = 6

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}\b")  # \w: "jöhn@exämple.de"
_PHONE = re.compile(
    rf"(?<![.+])(?<!{WORD_CHAR})(?<!{WORD_CHAR}-)"  # not glued to a word (no script without spaces glues)
    r"""
    (?:                                             # separators: space . - and the figure and en dashes
        \+\d(?:[\ .\-()‒–]{0,2}\d){8,16}               # +<country>...: any phone separators
      |
        (?:\(\d{1,5}\)[\ .\-‒–]?|\d{1,5}[\ .\-‒–])      # first group: "(415) " or "415-"
        (?:\d{1,5}[\ .\-‒–]){0,4}                     # middle groups
        \d{2,7}                                     # last group
      |
        0\d{1,4}[\ .\-/‒–](?:\d{1,5}[\ .\-‒–]){0,4}\d{2,8}   # a trunk 0 first: "030/12345678"
    )
    """
    rf"(?!{WORD_CHAR}|:|[.,]\d|-{WORD_CHAR})",
    re.VERBOSE,
)
_NOT_PHONE = re.compile(r"^\d{4}-\d{2}-\d{2}|^\d{1,3}(?:\.\d{1,3}){3}$")
_AUTH = re.compile(
    r"""(?ix)
    \b((?:proxy-)?authorization["']?\s*[:=]\s*["']?)
    (?:(?:bearer|basic|token|digest|negotiate)\s+)?[^\s,;"'&}]+
    """
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*")
_KEY_VALUE = re.compile(  # a key is tried once, whole (possessive): else time grows as n² or worse
    r"""(?ix)
    ((?<![\w-])(?=[\w-]*?(?:token|secret|password|passwd|api[_-]?key|apikey))[\w-]++["']?\s*+[:=]\s*+["']?)
    (?!\[redacted\])[^\s,;"'&}]+
    """
)
# An OpenAI key, whole or as its 401 quotes it (stars between its ends), a HubSpot token, and any key
# quoted back with its middle starred (Groq's `gsk_AbCd****WxYz`).
_KNOWN_SECRETS = re.compile(
    r"\b(?:sk-[A-Za-z0-9_*-]{16,}|pat-[a-z]{2}\d-[0-9a-f-]{20,}|[A-Za-z0-9_-]{2,16}\*{6,}[A-Za-z0-9_-]{0,8})"
)  # the last: any key as providers quote it back, its middle starred
_SF_WEBHOOK_TOKEN = re.compile(  # any path segment but the change-events endpoint's own
    r"(/webhooks/salesforce/)(?!events(?:[/?#\s\"']|$))(?!\[redacted\])[^\s/?#\"']+"
)


def redact(text: str) -> str:
    """The text with emails, phone numbers and credentials replaced (see the module docstring), made
    `narrow` first, so a full-width "０３－１２３４" or a no-break space is masked as "03-1234" is."""
    if not text:
        return text
    text = narrow(text)
    text = _AUTH.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    text = _KEY_VALUE.sub(_key_value, text)
    text = _KNOWN_SECRETS.sub(REDACTED, text)
    text = _SF_WEBHOOK_TOKEN.sub(lambda m: m.group(1) + REDACTED, text)
    text = _EMAIL.sub("[email]", text)
    return _PHONE.sub(_phone, text)


def _key_value(match: re.Match[str]) -> str:
    key, value = match.group(1), match.group(0)[len(match.group(1)) :]
    if re.match(r"[\w-]*tokens\b", key, re.I) and re.fullmatch(r"\d+", value):
        return match.group(0)  # an LLM usage count such as total_tokens=512
    return key + REDACTED


def _phone(match: re.Match[str]) -> str:
    found = match.group(0)
    digits = sum(c.isdigit() for c in found)
    if not 9 <= digits <= 15 or _NOT_PHONE.match(found):
        return found
    return "[phone]"


def _sensitive_key(key: object) -> bool:
    lowered = str(key).lower()
    return any(word in lowered for word in SENSITIVE_KEYS)


def _clean(key: object, value: Any, depth: int = 0) -> Any:
    if _sensitive_key(key) and not (
        str(key).lower().endswith("tokens") and isinstance(value, int | float) and not isinstance(value, bool)
    ):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if depth >= _MAX_DEPTH and isinstance(value, Mapping | list | tuple | set):
        return REDACTED  # too deep to look through: shown as nothing rather than unmasked
    if isinstance(value, Mapping):
        return {k: _clean(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_clean("", v, depth + 1) for v in value]
    return value


def _current_job_id() -> str | None:
    try:
        from rq import get_current_job

        job = get_current_job()
    except Exception:  # outside a worker, or no Redis context: no job id
        return None
    return job.id if job is not None else None


# What RQ logs with a failed job: its arguments, a batch's every lead and event (36 KB a 100-lead batch,
# at ERROR, at each retry). Short texts (the CRM, the account) are kept; collections are counted. The
# job id names the job; `leadscore failed` shows its leads.
JOB_ARGUMENT_EXTRAS = ("arguments", "kwargs")


def _summary(value: Any) -> str:
    items = (
        value.values()
        if isinstance(value, Mapping)
        else value
        if isinstance(value, list | tuple)
        else [value]
    )
    said = [
        redact(item) if isinstance(item, str) and len(item) <= 64
        else f"{len(item)} items" if isinstance(item, Sized) else type(item).__name__
        for item in items
    ]  # fmt: skip
    return ", ".join(said) + " (the rest: see the job)"


class RedactingFilter(logging.Filter):
    """Adds `job_id` inside RQ jobs and redacts the message and extras in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._process(record)
        except Exception:  # a log line must never be lost to the filter itself
            record.msg, record.args = "[log message dropped: redaction failed]", None
        return True

    def _process(self, record: logging.LogRecord) -> None:
        if getattr(record, "job_id", None) is None:
            job_id = _current_job_id()
            if job_id is not None:
                record.job_id = job_id
        if not getattr(record, "_leadscore_redacted", False):
            record.msg, record.args = redact(record.getMessage()), None
            for key, value in list(record.__dict__.items()):
                if key in JOB_ARGUMENT_EXTRAS and value:
                    record.__dict__[key] = _summary(value)
                elif key not in _STANDARD_ATTRS and not key.startswith("_"):
                    record.__dict__[key] = _clean(key, value)
            record._leadscore_redacted = True


class RepeatedJobSuccess(logging.Filter):
    """RQ says each job succeeded twice at INFO, "Job OK" and then "Successfully completed … in 0.3s";
    the first is dropped unless logging is at DEBUG (a collect job, every other job, says nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno != logging.INFO
            or "Job OK" not in record.getMessage()
            or logging.getLogger().isEnabledFor(logging.DEBUG)
        )


class RedactingJsonFormatter(JsonFormatter):
    """JsonFormatter whose exception and stack texts are redacted too (the filter leaves exc_info
    untouched so other handlers still get the live exception)."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return redact(super().formatException(ei))

    def formatStack(self, stack_info) -> str:  # noqa: N802
        return redact(super().formatStack(stack_info))


def _formatter() -> JsonFormatter:
    return RedactingJsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,  # datetime.fromtimestamp(record.created, tz=UTC).isoformat()
        reserved_attrs=[*RESERVED_ATTRS, "_leadscore_redacted"],
        json_ensure_ascii=False,
    )


def configure(level: str | int = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records, as redacted JSON lines, to `stream` (stderr by default).

    Idempotent: a second call replaces the handler the first installed (and any plain
    StreamHandler left by `logging.basicConfig`); other handlers, such as pytest's, are kept.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(_formatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    rq_worker = logging.getLogger("rq.worker")
    if not any(isinstance(f, RepeatedJobSuccess) for f in rq_worker.filters):
        rq_worker.addFilter(RepeatedJobSuccess())
    return handler
