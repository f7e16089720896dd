"""The LLM client side of propensity: asks an OpenAI-compatible endpoint, caches answers in Redis."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import openai
from redis.exceptions import RedisError

from integration.lead import Lead
from integration.settings import Settings
from workers.propensity import PropensityResult, build_messages, fallback, parse_reply

log = logging.getLogger(__name__)


def _reply_content(completion) -> str | None:
    """The first choice's text; a proxy's HTML page or an empty body is not a reply."""
    choices = getattr(completion, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise ValueError(f"no choices in the reply: {str(completion)[:80]!r}")
    return choices[0].message.content


def cache_key(fingerprint: str) -> str:
    """Where an LLM answer is cached: by the lead's input fingerprint, which the store keeps too."""
    return f"leadscore:llm:{fingerprint}"


def answers_key(crm: str, account: str, lead_id: str) -> str:
    """The fingerprints a lead's LLM answers are cached under, so an erasure finds every one of them,
    whether or not a kept score names it."""
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
        self.cache_ttl_s = settings.llm_cache_ttl_s
        self.client: openai.OpenAI | None = None
        if settings.llm_enabled:
            self.client = openai.OpenAI(
                api_key=settings.llm_api_key,
                base_url=str(settings.llm_base_url) if settings.llm_base_url else None,
                timeout=settings.llm_timeout_s,
                max_retries=1,
            )

    def assess(self, lead: Lead) -> PropensityResult:
        if self.client is None:
            return fallback("LLM disabled: LLM_API_KEY is not set")
        try:
            completion = self.client.chat.completions.create(
                model=self.model,
                messages=build_messages(lead),
                temperature=0,
                response_format={"type": "json_object"},
                max_tokens=300,
            )
            reply = parse_reply(_reply_content(completion))
        except openai.APITimeoutError:
            return self._failed(lead, "LLM timed out")
        except openai.APIStatusError as exc:  # another 4xx: this request will not do, now or later
            retryable = exc.status_code >= 500 or exc.status_code in (408, 409, 429)
            return self._failed(lead, f"LLM answered HTTP {exc.status_code}", retryable)
        except openai.APIError as exc:
            return self._failed(lead, f"LLM call failed: {type(exc).__name__}")
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

    def assess_many(self, leads: list[Lead], fingerprints: list[str], redis=None) -> list[PropensityResult]:
        """Answers for many leads: cached ones from Redis, the rest concurrently from the LLM.

        Only real LLM answers are cached (by input fingerprint, which covers the prompt
        version), so a fallback is retried the next time the lead is scored.
        """
        cached: list[bytes | None] = [None] * len(leads)
        if redis is not None and self.cache_ttl_s and leads:
            try:
                cached = redis.mget([cache_key(fp) for fp in fingerprints])
            except RedisError:
                log.warning("LLM cache unavailable; asking the LLM")
        results: list[PropensityResult | None] = [_cached(c) for c in cached]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(missing))) as pool:
                for i, result in zip(
                    missing, pool.map(self.assess, [leads[i] for i in missing]), strict=True
                ):
                    results[i] = result
            fresh = [i for i in missing if not results[i].fallback]
            if redis is not None and self.cache_ttl_s and fresh:
                try:
                    with redis.pipeline(transaction=False) as pipe:
                        for i in fresh:
                            lead = answers_key(leads[i].crm, leads[i].account_id, leads[i].lead_id)
                            pipe.sadd(lead, fingerprints[i])
                            pipe.expire(lead, self.cache_ttl_s)
                            pipe.set(cache_key(fingerprints[i]), to_cache(results[i]), ex=self.cache_ttl_s)
                        pipe.execute()
                except RedisError:
                    log.warning("LLM cache unavailable; answers not kept")
        return results

    def _failed(self, lead: Lead, why: str, retryable: bool = True) -> PropensityResult:
        log.warning("propensity fallback for %s:%s: %s", lead.crm, lead.lead_id, why)
        return fallback(why, retryable=retryable)
