"""The LLM client side of propensity: asks an OpenAI-compatible endpoint, caches answers in Redis."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import openai
from redis.exceptions import RedisError

from integration.lead import Lead
from integration.salesforce import full_id
from integration.settings import Settings
from workers.propensity import PropensityResult, build_messages, fallback, parse_reply

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = (
    "https://api.openai.com/v1"  # given, so an OPENAI_BASE_URL set for another tool is not read
)


RETRY_PAUSE_S = 0.5  # before the one retry of a call the provider dropped or failed (5xx)
# A made-up lead the worker asks about once at start, so a request the LLM refuses shows then.
PROBE_LEAD = Lead(
    crm="hubspot", account_id="0", lead_id="leadscore-start-check", title="VP of Sales", company="Example Co",
    company_size="100-500", source="ORGANIC_SEARCH", status="NEW", has_email=True,
)  # fmt: skip


class _Unusable(ValueError):
    """A reply that asking again would repeat: cut off at the token limit, filtered, or refused."""


def _reply_content(completion) -> str | None:
    """The first choice's text; a proxy's HTML page or an empty body is not a reply."""
    choices = getattr(completion, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise ValueError(f"no choices in the reply: {str(completion)[:80]!r}")
    choice = choices[0]
    if getattr(choice.message, "refusal", None):
        raise _Unusable(f"the LLM refused: {str(choice.message.refusal)[:80]!r}")
    if getattr(choice, "finish_reason", None) in ("length", "content_filter"):
        raise _Unusable(f"reply cut off ({choice.finish_reason})")
    return choice.message.content


CACHE_PREFIX = "leadscore:llm:"
REQUEST = {"temperature": 0, "response_format": {"type": "json_object"}, "max_tokens": 300}


def cache_key(model: str, messages: list[dict]) -> str:
    """Where an LLM answer is cached: by what the LLM was asked (model, request and messages), so an
    edit it never sees (rules, tiers, the reasons' wording, a trained model) reuses every answer."""
    asked = json.dumps([model, REQUEST, messages], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return CACHE_PREFIX + hashlib.sha256(asked.encode()).hexdigest()[:32]


def cached_answer_key(member: str) -> str:
    """The cache key a lead's answers set names; older releases named the input fingerprint instead,
    and cached the answer under it."""
    return member if member.startswith(CACHE_PREFIX) else CACHE_PREFIX + member


def answers_key(crm: str, account: str, lead_id: str) -> str:
    """The cache keys of a lead's LLM answers, so an erasure finds every one of them; a Salesforce
    org and lead by their 18-character ids, whichever form the caller holds."""
    if crm == "salesforce":
        account, lead_id = full_id(account), full_id(lead_id)
    return f"leadscore:llm-of:{crm}:{account}:{lead_id}"


def to_cache(result: PropensityResult) -> str:
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
    data = json.loads(raw)
    return PropensityResult(
        propensity=data["propensity"],
        confidence=data["confidence"],
        reason=data["reason"],
        evidence=tuple(data["evidence"]),
        model=data["model"],
        extra={"cached": True},
    )


def _cached(raw: bytes | None) -> PropensityResult | None:
    """A cached answer, or None when there is none or it cannot be read (then the LLM is asked)."""
    if not raw:
        return None
    try:
        return from_cache(raw)
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable LLM cache entry")
        return None


class PropensityReasoner:
    """Asks the LLM for a `ConversionPropensity`; never raises."""

    def __init__(self, settings: Settings):
        self.model = settings.llm_model
        self.concurrency = settings.llm_concurrency
        self.deadline_s = settings.llm_batch_deadline_s
        self.cache_ttl_s = settings.llm_cache_ttl_s
        self.client: openai.OpenAI | None = None
        if settings.llm_enabled:
            self.client = openai.OpenAI(
                api_key=settings.llm_api_key,
                base_url=str(settings.llm_base_url) if settings.llm_base_url else DEFAULT_BASE_URL,
                timeout=settings.llm_timeout_s,
                max_retries=0,  # the client would wait out a Retry-After of up to two minutes per call
            )

    def assess(
        self, lead: Lead, throttled: threading.Event | None = None, messages: list[dict] | None = None
    ) -> PropensityResult:
        """The LLM's answer for one lead, or the fallback; a dropped call or a 5xx is tried once more.
        A 429 sets `throttled`, so the batch starts no more calls: the provider asked to wait."""
        if self.client is None:
            return fallback("LLM disabled: LLM_API_KEY is not set")
        for attempt in (1, 2):
            try:
                completion = self.client.chat.completions.create(
                    model=self.model, messages=messages or build_messages(lead), **REQUEST
                )
                reply = parse_reply(_reply_content(completion))
                break
            except openai.APITimeoutError:
                return self._failed(lead, "LLM timed out")
            except openai.APIStatusError as exc:  # another 4xx: this request will not do, now or later
                if exc.status_code >= 500 and attempt == 1:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                if exc.status_code == 429 and throttled is not None:
                    throttled.set()
                retryable = exc.status_code >= 500 or exc.status_code in (408, 409, 429)
                return self._failed(lead, f"LLM answered HTTP {exc.status_code}", retryable)
            except openai.APIConnectionError as exc:
                if attempt == 1:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                return self._failed(lead, f"LLM call failed: {type(exc).__name__}")
            except openai.APIError as exc:
                return self._failed(lead, f"LLM call failed: {type(exc).__name__}")
            except _Unusable as exc:
                return self._failed(lead, f"LLM reply unusable: {exc}", retryable=False)
            except ValueError as exc:
                return self._failed(lead, f"LLM reply unusable: {exc}")
            except Exception as exc:  # fail open is the contract: no reply may stop scoring
                return self._failed(lead, f"LLM reply unusable: {type(exc).__name__}")
        return PropensityResult(
            propensity=reply.propensity,
            confidence=reply.confidence,
            reason=reply.reason,
            evidence=tuple(reply.evidence),
            model=completion.model or self.model,
        )

    def assess_many(self, leads: list[Lead], redis=None) -> list[PropensityResult]:
        """Answers for many leads: cached ones from Redis, the rest concurrently from the LLM.

        Only real LLM answers are cached (by what was asked: `cache_key`), so a fallback is
        retried the next time the lead is scored.
        """
        messages = [build_messages(lead) for lead in leads]
        keys = [cache_key(self.model, asked) for asked in messages]
        cached: list[bytes | None] = [None] * len(leads)
        if redis is not None and self.cache_ttl_s and leads:
            try:
                cached = redis.mget(keys)
            except RedisError:
                log.warning("LLM cache unavailable; asking the LLM")
        results: list[PropensityResult | None] = [_cached(c) for c in cached]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            asked = self._ask_all([leads[i] for i in missing], [messages[i] for i in missing])
            for i, result in zip(missing, asked, strict=True):
                results[i] = result
            fresh = [i for i in missing if not results[i].fallback]
            if redis is not None and self.cache_ttl_s and fresh:
                try:
                    with redis.pipeline(transaction=False) as pipe:
                        for i in fresh:
                            lead = answers_key(leads[i].crm, leads[i].account_id, leads[i].lead_id)
                            pipe.sadd(lead, keys[i])
                            pipe.expire(lead, self.cache_ttl_s)
                            pipe.set(keys[i], to_cache(results[i]), ex=self.cache_ttl_s)
                        pipe.execute()
                except RedisError:
                    log.warning("LLM cache unavailable; answers not kept")
        return results

    def check(self) -> str | None:
        """Why the LLM refuses leadscore's request, asked about a made-up lead; None when it answers,
        or fails in a way that may pass (a 5xx, a 429, a timeout). A model that does not take a
        parameter (`max_tokens`, `temperature` 0, JSON mode), a wrong model name or key would make every
        lead fall back to the rules, a warning a lead: the worker says it once, at start."""
        if self.client is None:
            return None
        result = self.assess(PROBE_LEAD)
        return result.error if result.fallback and not result.retryable else None

    def _ask_all(self, leads: list[Lead], messages: list[list[dict]]) -> list[PropensityResult]:
        """Ask for every lead, `concurrency` at a time, within the batch's deadline: a slow or
        throttling provider costs a batch at most LLM_BATCH_DEADLINE_S (and the CRM writes wait for
        it). Leads not answered by then, or not asked after a 429, fall back and are rescored later."""
        throttled = threading.Event()

        def ask(lead: Lead, asked: list[dict]) -> PropensityResult:
            if throttled.is_set():
                return self._failed(lead, "LLM rate-limited (429): not asked in this batch")
            return self.assess(lead, throttled, asked)

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(leads)))
        futures = [pool.submit(ask, lead, asked) for lead, asked in zip(leads, messages, strict=True)]
        done, _ = wait(futures, timeout=self.deadline_s)
        pool.shutdown(wait=False, cancel_futures=True)  # a call still in flight ends with its timeout
        return [
            future.result()
            if future in done
            else self._failed(lead, f"LLM gave no answer within the batch's {self.deadline_s:g}s")
            for future, lead in zip(futures, leads, strict=True)
        ]

    def _failed(self, lead: Lead, why: str, retryable: bool = True) -> PropensityResult:
        log.warning("propensity fallback for %s:%s: %s", lead.crm, lead.lead_id, why)
        return fallback(why, retryable=retryable)
