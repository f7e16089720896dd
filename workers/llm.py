"""The LLM client side of propensity: asks an OpenAI-compatible endpoint, caches answers in Redis."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from datetime import UTC, datetime

import openai
from redis.exceptions import RedisError

from integration.lead import Lead
from integration.logs import REDACTED, redact
from integration.ratelimit import SharedPause
from integration.salesforce import full_id
from integration.settings import Settings
from workers.propensity import (
    ConversionPropensity,
    PropensityResult,
    build_messages,
    fallback,
    parse_reply,
    without_thinking,
)

log = logging.getLogger(__name__)

# Given to the client, so an OPENAI_BASE_URL set for another tool is not read.
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_PAUSE_S = 0.5  # before the one retry of a call the provider dropped or failed (5xx)
# How long every worker holds its LLM calls after a 429: as long as the provider asks, within bounds.
DEFAULT_LLM_PAUSE_S = 10.0  # a 429 that does not say
MIN_LLM_PAUSE_S = 1.0  # so a provider's "0" does not bring back every waiting call at once
MAX_LLM_PAUSE_S = 120.0
LLM_PAUSE = "llm"  # the SharedPause every worker's LLM calls wait for
# A refusal of a setting that can change while workers run: a key rotated (401), a gateway's credits
# spent (402), access blocked (403), a deployment or model retired (404). Its leads are rescored, so
# they recover once it is fixed; a refusal of the request itself (400, 422) would only repeat.
REFUSED_UNTIL_FIXED = frozenset({401, 402, 403, 404})
QUOTA_SPENT = "insufficient_quota"  # OpenAI's 429 for a plan or credit used up: refused until fixed
MAY_PASS = frozenset({408, 409})  # a timeout, a conflict; a 429 asks to wait (`asked_to_wait_s`)
# A made-up lead the worker asks about once at start, so a request the LLM refuses shows then.
PROBE_LEAD = Lead(
    crm="hubspot", account_id="0", lead_id="leadscore-start-check", title="VP of Sales", company="Example Co",
    company_size="100-500", source="ORGANIC_SEARCH", status="NEW", has_email=True,
)  # fmt: skip


MAX_PROVIDER_WORDS = 200  # characters kept of what a provider said when it refused a call
MIN_SECRET_CHARS = 8  # a shorter "key" (a local server's placeholder) is no secret, and may be a word


def provider_said(exc: openai.APIStatusError, secrets: tuple[str, ...] = ()) -> str:
    """What the provider said when it refused a call, masked and clipped: it names what to fix (a
    parameter the model does not take, a deployment not found). Logged, and said at start; never
    written to a lead, where reps would read it and its request ids would rewrite the lead each time."""
    body = exc.body
    if isinstance(body, dict):  # OpenAI's `error` object, as Azure, vLLM and gateways answer too
        message = body.get("message")
        said = message if isinstance(message, str) else json.dumps(body, ensure_ascii=False)  # `{"detail":…}`
    else:
        said = str(body or "")  # a plain-text or HTML body, or Ollama's `{"error": "..."}` string
    for secret in secrets:  # the key and headers it was sent, should a gateway quote them back
        said = said.replace(secret, REDACTED)
    return redact(" ".join(said[: MAX_PROVIDER_WORDS * 4].split()))[:MAX_PROVIDER_WORDS]


def _error_field(exc: openai.APIStatusError, key: str) -> str:
    """A field of the provider's error object (`code`, `param`), "" where it has none."""
    return str(exc.body.get(key) or "") if isinstance(exc.body, dict) else ""


def http_error(exc: openai.APIStatusError) -> str:
    """The error a refused call keeps in the lead's details: its status, and the provider's error code
    and parameter where they are plain names (`unsupported_parameter`, `max_tokens`), so it is the same
    each time; the part before the first ":" is the fallback metric's label, one of a few."""
    fields = {key: _error_field(exc, key) for key in ("code", "param")}
    named = [f"{key} {value}" for key, value in fields.items() if _PLAIN_NAME.fullmatch(value)]
    return f"LLM answered HTTP {exc.status_code}" + (f": {', '.join(named)}" if named else "")


_PLAIN_NAME = re.compile(r"[\w.-]{1,64}")


def asked_to_wait_s(exc: openai.APIStatusError) -> float:
    """How long a 429 asks to wait: Azure's `retry-after-ms`, else `retry-after` in seconds (an HTTP
    date is not read), else DEFAULT_LLM_PAUSE_S; within MIN_LLM_PAUSE_S and MAX_LLM_PAUSE_S."""
    headers = exc.response.headers
    for name, per_second in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            seconds = float(headers.get(name, "")) / per_second
        except ValueError:
            continue
        if math.isfinite(seconds):
            return min(max(seconds, MIN_LLM_PAUSE_S), MAX_LLM_PAUSE_S)
    return DEFAULT_LLM_PAUSE_S


MAX_BATCH_TIMEOUTS = 3  # LLM calls of a batch that may time out before it starts no more
# How long a batch's calls go by one reading of every worker's LLM pause: read by one thread for all,
# not by each call, so a batch's calls share one Redis connection rather than open one each.
SHARED_PAUSE_FRESH_S = 0.25


class _Throttle:
    """A batch's hold on its LLM calls while the LLM is paused: by this batch's 429s, and by any
    worker's through Redis (without Redis, by this batch's alone)."""

    def __init__(self, shared: SharedPause | None, deadline: float):
        self.shared, self.deadline = shared, deadline  # the deadline on time.monotonic()
        self.met = False  # the batch met a pause, which took time its unanswered leads could have had
        self.timeouts = 0  # calls that timed out: past MAX_BATCH_TIMEOUTS, no more start in this batch
        self._until = 0.0  # this batch's own pause, on time.monotonic()
        self._shared_until, self._read_again_at = 0.0, 0.0  # every worker's, as last read
        self._lock = threading.Lock()
        self._reading = threading.Lock()

    def timed_out(self) -> None:
        with self._lock:
            self.timeouts += 1

    @property
    def overloaded(self) -> bool:
        """The LLM timed out often enough in this batch that more calls would only queue behind the
        abandoned ones (a local server with a slot or two works on through each of them)."""
        return self.timeouts >= MAX_BATCH_TIMEOUTS

    def pause(self, seconds: float) -> None:
        with self._lock:
            self.met = True
            self._until = max(self._until, time.monotonic() + seconds)
            shared = self.shared
        if shared is not None:
            try:
                shared.pause(seconds)
            except RedisError:
                log.warning("LLM pause not shared (Redis unavailable): other workers may call it meanwhile")

    def left_s(self) -> float:
        # One thread reads Redis; the others wait for its reading (not `_lock`, which a 429 must not
        # wait behind a Redis that stalls), then go by it for SHARED_PAUSE_FRESH_S.
        with self._reading:
            now = time.monotonic()
            if (shared := self.shared) is not None and now >= self._read_again_at:
                try:
                    self._shared_until = now + shared.left_s()
                except RedisError:
                    self.shared = None  # not asked again for each lead of the batch
                self._read_again_at = now + SHARED_PAUSE_FRESH_S
        with self._lock:
            until = max(self._until, self._shared_until)
        return max(until - time.monotonic(), 0.0)

    def wait_out(self) -> bool:
        """Whether a call may be made now, having waited out a pause that ends before the deadline."""
        while (left := self.left_s()) > 0:
            self.met = True
            if time.monotonic() + left >= self.deadline:
                return False
            time.sleep(left)
        return True


class _Unusable(ValueError):
    """A reply that asking again would repeat: cut off at the token limit, filtered, or refused."""


# Not the LLM's answer but leadscore's setting, so it is not cached: once the limit is raised, the
# lead's next event or a rescore gets an answer.
TOKEN_LIMIT_SPENT = (
    "LLM token limit spent before the answer: raise max_completion_tokens (or max_tokens) in LLM_EXTRA_PARAMS"
)


class _TokenLimitSpent(Exception):
    """Cut off at the token limit before a word of the answer: a reasoning model spent it thinking."""


def _reply_content(completion) -> str | None:
    """The first choice's text; a proxy's HTML page or an empty body is not a reply."""
    choices = getattr(completion, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise ValueError(f"no choices in the reply: {str(completion)[:80]!r}")
    choice = choices[0]
    if getattr(choice.message, "refusal", None):
        raise _Unusable(f"the LLM refused: {str(choice.message.refusal)[:80]!r}")
    finish_reason = getattr(choice, "finish_reason", None)
    if finish_reason == "length" and not without_thinking(choice.message.content or ""):
        raise _TokenLimitSpent
    if finish_reason in ("length", "content_filter"):
        raise _Unusable(f"reply cut off ({finish_reason})")
    return choice.message.content


CACHE_PREFIX = "leadscore:llm:"
REQUEST = {"temperature": 0, "response_format": {"type": "json_object"}, "max_tokens": 300}


def effective_request(extra_params: dict) -> dict:
    """REQUEST with LLM_EXTRA_PARAMS merged in, a null taking its key out: a reasoning model takes no
    `max_tokens` nor `temperature` 0, LM Studio no JSON mode."""
    return {key: value for key, value in {**REQUEST, **extra_params}.items() if value is not None}


def answer_id(base_url: str, model: str, request: dict, messages: list[dict]) -> str:
    """What an LLM answer is cached by: what was asked, and of whom (endpoint, model, request and
    messages), so an edit the LLM never sees (rules, tiers, the reasons' wording, a trained model)
    reuses every answer. A lead's answers set lists these ids, as older releases listed the input
    fingerprint the answer was cached by then: `cached_answer_key` reads both alike."""
    asked = [base_url, model, request, messages]
    return hashlib.sha256(json.dumps(asked, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def cached_answer_key(answer: str) -> str:
    return CACHE_PREFIX + answer.removeprefix(CACHE_PREFIX)


ANSWERS_LISTED = "leadscore:llm-answers:"  # sorted sets: answer id → when it expires
ANSWERS_LISTED_BEFORE = "leadscore:llm-of:"  # plain sets, never trimmed, of older releases


def answers_keys(crm: str, account: str, lead_id: str) -> list[str]:
    """The keys listing a lead's cached answers, so an erasure finds every one of them: the first is
    where answers are listed now (a Salesforce org and lead by their 18-character ids, whichever form
    the caller holds); then where older releases listed them, in sets that kept the id of every answer
    a lead ever had, and a Salesforce lead's under the org id as the worker held it, 15 characters."""
    if crm != "salesforce":
        lead = f"{crm}:{account}:{lead_id}"
        return [ANSWERS_LISTED + lead, ANSWERS_LISTED_BEFORE + lead]
    account, lead_id = full_id(account), full_id(lead_id)
    return [ANSWERS_LISTED + f"{crm}:{account}:{lead_id}"] + [
        f"{ANSWERS_LISTED_BEFORE}{crm}:{org}:{lead_id}" for org in (account, account[:15])
    ]


def listed_answers(pipe, key: str) -> None:
    """Queue the read of one listing key's answer ids, of either kind."""
    if key.startswith(ANSWERS_LISTED):
        pipe.zrange(key, 0, -1)
    else:
        pipe.smembers(key)


# A fallback the LLM's own reply made (a refusal, a reply cut off): asked again, it would be the same,
# so it is cached like an answer.
ANSWERED = {"answered": True}


def to_cache(result: PropensityResult) -> str:
    if result.fallback:
        return json.dumps({"unusable": result.error})
    return json.dumps(
        {
            "propensity": result.propensity,
            "confidence": result.confidence,
            "reason": result.reason,
            "evidence": list(result.evidence),
            "model": result.model,
        }
    )


def from_cache(raw: bytes | str) -> PropensityResult:
    """A cached answer, checked again as a reply is (a reason cached before a check changed)."""
    data = json.loads(raw)
    if "unusable" in data:
        return replace(fallback(str(data["unusable"])), extra={**ANSWERED, "cached": True})
    return _result(ConversionPropensity.model_validate(data), data["model"], extra={"cached": True})


def _result(reply: ConversionPropensity, model: str, extra: dict | None = None) -> PropensityResult:
    return PropensityResult(
        propensity=reply.propensity,
        confidence=reply.confidence,
        reason=reply.reason,
        evidence=tuple(reply.evidence),
        model=model,
        extra=extra or {},
    )


def _cached(raw: bytes | None) -> PropensityResult | None:
    """A cached answer, or None when there is none or it cannot be read (then the LLM is asked)."""
    if not raw:
        return None
    try:
        return from_cache(raw)
    except (ValueError, KeyError, TypeError):  # a ValidationError is a ValueError
        log.warning("ignoring an unreadable LLM cache entry")
        return None


class PropensityReasoner:
    """Asks the LLM for a `ConversionPropensity`; never raises."""

    def __init__(self, settings: Settings):
        self.model = settings.llm_model
        self.base_url = str(settings.llm_base_url) if settings.llm_base_url else DEFAULT_BASE_URL
        self.concurrency = settings.llm_concurrency
        self.deadline_s = settings.llm_batch_deadline_s
        self.cache_ttl_s = settings.llm_cache_ttl_s
        self.request = effective_request(settings.llm_extra_params)
        self.secrets = tuple(
            s
            for s in (settings.llm_api_key, *settings.llm_extra_headers.values())
            if len(s) >= MIN_SECRET_CHARS
        )
        self._client_options = dict(
            api_key=settings.llm_api_key,
            base_url=self.base_url,
            default_headers=settings.llm_extra_headers,
            timeout=settings.llm_timeout_s,
            max_retries=0,  # the client would wait out a Retry-After of up to two minutes per call
        )
        self.client: openai.OpenAI | None = (
            openai.OpenAI(**self._client_options) if settings.llm_enabled else None
        )

    def assess(
        self,
        lead: Lead,
        messages: list[dict],
        throttle: _Throttle | None = None,
        client: openai.OpenAI | None = None,
    ) -> PropensityResult:
        """The LLM's answer for one lead, or the fallback; a dropped call or a 5xx is tried once more.
        A 429 pauses `throttle` for as long as the provider asks: no call starts until it ends."""
        client = client or self.client
        if client is None:
            return fallback("LLM disabled: LLM_API_KEY is not set")
        for attempt in (1, 2):
            try:
                # The request as JSON, so a provider's own parameters (vLLM's `top_k`) pass as OpenAI's do.
                completion = client.chat.completions.create(
                    model=self.model, messages=messages, extra_body=self.request
                )
                reply = parse_reply(_reply_content(completion))
                break
            except openai.APITimeoutError:
                if throttle is not None:
                    throttle.timed_out()
                return self._failed(lead, "LLM timed out")
            except openai.APIStatusError as exc:
                if exc.status_code >= 500 and attempt == 1:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                quota_spent = _error_field(exc, "code") == QUOTA_SPENT  # a 429 that no wait ends: billing
                if exc.status_code == 429 and not quota_spent:
                    if throttle is not None:
                        throttle.pause(asked_to_wait_s(exc))
                    return self._failed(
                        lead, http_error(exc), throttled=True, said=provider_said(exc, self.secrets)
                    )
                status = exc.status_code
                retryable = status >= 500 or status in MAY_PASS | REFUSED_UNTIL_FIXED or quota_spent
                refused = status < 500 and status not in MAY_PASS
                failed = self._failed(lead, http_error(exc), retryable, said=provider_said(exc, self.secrets))
                return replace(failed, refused=refused)
            except openai.APIConnectionError as exc:
                if attempt == 1:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                return self._failed(lead, f"LLM call failed: {type(exc).__name__}")
            except openai.APIError as exc:
                return self._failed(lead, f"LLM call failed: {type(exc).__name__}")
            except _TokenLimitSpent:  # said once a batch, by `assess_many`, and at start
                return fallback(TOKEN_LIMIT_SPENT, retryable=False)
            except _Unusable as exc:  # an answer of its own: kept as one, so it is not asked again
                return replace(
                    self._failed(lead, f"LLM reply unusable: {exc}", retryable=False), extra=ANSWERED
                )
            except ValueError as exc:
                return self._failed(lead, f"LLM reply unusable: {exc}")
            except Exception as exc:  # fail open is the contract: no reply may stop scoring
                return self._failed(lead, f"LLM reply unusable: {type(exc).__name__}")
        return _result(reply, completion.model or self.model)

    def assess_many(self, leads: list[Lead], now: datetime, redis=None) -> list[PropensityResult]:
        """Answers for many leads, asked as of `now`: cached ones from Redis, the rest concurrently
        from the LLM.

        Only the LLM's answers are cached (by what was asked: `answer_id`), its refusals and replies
        cut off among them, but not one cut off before a word of the answer (the token limit is
        leadscore's setting); any other fallback (a timeout, a 5xx, a 429) is asked again the next time
        the lead is scored. No call is made while the LLM is paused after a 429 (`_ask_all`).
        """
        messages = [build_messages(lead, now) for lead in leads]
        answers = [answer_id(self.base_url, self.model, self.request, asked) for asked in messages]
        keys = [cached_answer_key(answer) for answer in answers]
        cached: list[bytes | None] = [None] * len(leads)
        if redis is not None and self.cache_ttl_s and leads:
            try:
                cached = redis.mget(keys)
            except RedisError:
                log.warning("LLM cache unavailable; asking the LLM")
        results: list[PropensityResult | None] = [_cached(c) for c in cached]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            paused = SharedPause(redis, LLM_PAUSE) if redis is not None else None
            asked = self._ask_all([leads[i] for i in missing], [messages[i] for i in missing], paused)
            if spent := sum(result.error == TOKEN_LIMIT_SPENT for result in asked):
                log.error(
                    "the LLM spent its whole token limit before answering %d of %d leads (a reasoning model "
                    "thinks at length): they are scored on the rules alone until max_completion_tokens (or "
                    "max_tokens) is raised in LLM_EXTRA_PARAMS", spent, len(asked),
                )  # fmt: skip
            for i, result in zip(missing, asked, strict=True):
                results[i] = result
            fresh = [i for i in missing if not results[i].fallback or results[i].extra.get("answered")]
            if redis is not None and self.cache_ttl_s and fresh:
                try:
                    now = time.time()
                    with redis.pipeline(transaction=False) as pipe:
                        for i in fresh:  # each id scored by when its answer expires, whatever TTL cached it
                            lead = answers_keys(leads[i].crm, leads[i].account_id, leads[i].lead_id)[0]
                            pipe.zadd(lead, {answers[i]: now + self.cache_ttl_s})
                            pipe.zremrangebyscore(lead, "-inf", now)  # ids of expired answers
                            pipe.expire(lead, self.cache_ttl_s, gt=True)
                            pipe.expire(lead, self.cache_ttl_s, nx=True)
                            pipe.set(keys[i], to_cache(results[i]), ex=self.cache_ttl_s)
                        pipe.execute()
                except RedisError:
                    log.warning("LLM cache unavailable; answers not kept")
        return results

    def check(self) -> str | None:
        """Why the LLM refuses leadscore's request, asked about a made-up lead; None when it answers,
        or fails in a way that may pass (a 5xx, a 429, a timeout). A model that does not take a
        parameter (`max_tokens`, `temperature` 0, JSON mode), a wrong model name or key would make every
        lead fall back to the rules, a warning a lead: the worker says it once, at start. A refusal
        that starts later (a key rotated) shows in the fallback metrics, and its leads are rescored."""
        if self.client is None:
            return None
        with openai.OpenAI(
            **self._client_options
        ) as client:  # no connection left for a work horse to inherit
            result = self.assess(PROBE_LEAD, build_messages(PROBE_LEAD, datetime.now(UTC)), client=client)
        if not (result.fallback and (result.refused or not result.retryable)):
            return None
        return f"{result.error} ({result.said})" if result.said else result.error

    def _ask_all(
        self, leads: list[Lead], messages: list[list[dict]], paused: SharedPause | None
    ) -> list[PropensityResult]:
        """Ask for every lead, `concurrency` at a time, within the batch's deadline: a slow or
        throttling provider costs a batch at most LLM_BATCH_DEADLINE_S (and the CRM writes wait for
        it). While the LLM is paused after a 429 (`paused`, every worker's), no call starts: a pause
        that ends before the deadline is waited out, else the leads not yet asked fall back. Leads not
        answered fall back and are rescored later, those of a pause without spending a rescore round."""
        throttle = _Throttle(paused, time.monotonic() + self.deadline_s)

        def ask(lead: Lead, asked: list[dict]) -> PropensityResult:
            if not throttle.wait_out():
                return self._failed(lead, "LLM rate-limited (429): not asked in this batch", throttled=True)
            if throttle.overloaded:
                return self._failed(lead, f"LLM timed out {throttle.timeouts} times: not asked in this batch")
            return self.assess(lead, asked, throttle)

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(leads)))
        futures = [pool.submit(ask, lead, asked) for lead, asked in zip(leads, messages, strict=True)]
        done, _ = wait(futures, timeout=max(throttle.deadline - time.monotonic(), 0))
        pool.shutdown(wait=False, cancel_futures=True)  # a call still in flight ends with its timeout
        late = f"LLM gave no answer within the batch's {self.deadline_s:g}s"
        return [
            future.result() if future in done else self._failed(lead, late, throttled=throttle.met)
            for future, lead in zip(futures, leads, strict=True)
        ]

    def _failed(
        self, lead: Lead, why: str, retryable: bool = True, throttled: bool = False, said: str = ""
    ) -> PropensityResult:
        """`said`: the provider's own words, logged beside `why`, which the lead keeps."""
        log.warning(
            "propensity fallback for %s:%s: %s%s", lead.crm, lead.lead_id, why, f" ({said})" if said else ""
        )
        return replace(fallback(why, retryable=retryable, throttled=throttled), said=said)
